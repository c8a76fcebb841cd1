// A minimal blocking client of the Redis serialization protocol (RESP2), for Redis and Valkey
// servers: commands are pipelined (many sent with one writev, replies read in order), and a
// large bulk reply is read straight into the caller's memory in few large reads.
//
// One connection is used by one thread at a time. Any I/O error or timeout closes the
// connection (its stream position is lost); the next ensure() opens a new one. With TLS, the same
// protocol runs over an OpenSSL session (builds with OpenSSL only).
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace ucm {

struct RedisEndpoint {
    std::string host = "127.0.0.1";
    int port = 6379;
    std::string unix_socket;  // used instead of host:port when set
    std::string username;     // ACL user (Redis 6+); empty: the default user
    std::string password;     // empty: no AUTH
    int db = 0;
    double timeout_s = 5.0;  // connect, send and each wait for reply bytes
    // TLS (a build with OpenSSL): the server's certificate is verified against tls_ca_file (or the
    // system's CAs) and the host name (tls_server_name, default: host) unless tls_verify is off.
    bool tls = false;
    bool tls_verify = true;
    std::string tls_ca_file;
    std::string tls_cert_file;  // client certificate and key, for servers that require them
    std::string tls_key_file;
    std::string tls_server_name;

    std::string describe() const;
};

// A RESP reply: status, error, integer, nil, a short bulk string, or an array of replies.
struct RedisReply {
    char type = 0;  // '+', '-', ':', '$' (bulk), '*' (array) or 'n' (nil)
    int64_t integer = 0;
    std::string text;  // status, error message or bulk bytes
    std::vector<RedisReply> elements;
};

class RedisConnection {
public:
    explicit RedisConnection(RedisEndpoint endpoint);
    ~RedisConnection();
    RedisConnection(const RedisConnection&) = delete;
    RedisConnection& operator=(const RedisConnection&) = delete;

    // Opens (connect, AUTH, SELECT) when not open, or when the server has closed the idle
    // connection since its last use; returns an empty string or why it failed.
    std::string ensure();
    bool is_open() const { return fd_ >= 0; }
    void close();

    // Sends every byte described by `iov` (any count; split for the kernel's IOV_MAX).
    std::string send(const std::vector<iovec>& iov);
    // Reads one reply (arrays nested up to a few levels); bulk strings longer than `max_bulk` are an error.
    std::string read_reply(RedisReply* reply, size_t max_bulk = 1 << 20);
    // Reads the header of a reply expected to be a bulk string: `*length` is its size, or -1
    // for nil. An error reply sets `*server_error` (length untouched) and returns empty.
    std::string read_bulk_header(int64_t* length, std::string* server_error);
    // Reads exactly `size` bytes of a bulk body into `out`.
    std::string read_exact(uint8_t* out, size_t size);
    // Reads and drops `size` bytes (a bulk body nobody wants, and its CRLF).
    std::string skip(size_t size);
    // Reads the CRLF that ends a bulk body.
    std::string read_crlf();

    // RESP encoding of a command whose arguments are all short.
    static void append_command(std::string& out, const std::vector<std::string_view>& args);
    // The start of a command whose last argument, `last_bytes` long, the caller sends itself
    // (followed by "\r\n").
    static void append_command_head(std::string& out, const std::vector<std::string_view>& args,
                                    size_t last_bytes);

private:
    std::string fail(const std::string& what);
    std::string fill();  // reads more bytes into the buffer
    std::string read_line(std::string* line);
    std::string handshake();
    std::string start_tls();
    // Reads up to `size` bytes (at least one; with `all`, as many as arrive before a timeout);
    // returns the count, or 0 with `*error` set.
    size_t receive(uint8_t* out, size_t size, std::string* error, bool all = false);
    std::string send_tls(const std::vector<iovec>& iov);

    RedisEndpoint endpoint_;
    int fd_ = -1;
    void* tls_context_ = nullptr;  // SSL_CTX*, SSL* (opaque here: OpenSSL stays out of this header)
    void* tls_ = nullptr;
    std::vector<char> buffer_;
    size_t begin_ = 0;
    size_t end_ = 0;
};

}  // namespace ucm
