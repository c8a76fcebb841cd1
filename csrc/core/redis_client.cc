#include "redis_client.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>

#if defined(UCM_HAVE_TLS)
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#endif

#include "file_io.h"

namespace ucm {

namespace {

constexpr size_t kBufferBytes = 64 << 10;

std::string errno_text(int err) { return std::strerror(err); }

timeval to_timeval(double seconds) {
    timeval tv{};
    if (seconds <= 0) return tv;  // no timeout
    tv.tv_sec = static_cast<time_t>(seconds);
    tv.tv_usec = static_cast<suseconds_t>((seconds - std::floor(seconds)) * 1e6);
    return tv;
}

// Connects `fd` to `addr` within `timeout_s`; returns 0 or an errno value.
int connect_within(int fd, const sockaddr* addr, socklen_t len, double timeout_s) {
    int flags = ::fcntl(fd, F_GETFL, 0);
    ::fcntl(fd, F_SETFL, flags | O_NONBLOCK);
    int rc = ::connect(fd, addr, len);
    int err = rc == 0 ? 0 : errno;
    if (err == EINPROGRESS) {
        pollfd p{fd, POLLOUT, 0};
        int waited = ::poll(&p, 1, timeout_s > 0 ? static_cast<int>(timeout_s * 1000) : -1);
        if (waited == 0) {
            err = ETIMEDOUT;
        } else if (waited < 0) {
            err = errno;
        } else {
            socklen_t size = sizeof(err);
            if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &size) != 0) err = errno;
        }
    }
    ::fcntl(fd, F_SETFL, flags);
    return err;
}

void append_bulk(std::string& out, std::string_view arg) {
    out += '$';
    out += std::to_string(arg.size());
    out += "\r\n";
    out.append(arg.data(), arg.size());
    out += "\r\n";
}

}  // namespace

std::string RedisEndpoint::describe() const {
    return unix_socket.empty() ? host + ":" + std::to_string(port) : "unix:" + unix_socket;
}

RedisConnection::RedisConnection(RedisEndpoint endpoint) : endpoint_(std::move(endpoint)), buffer_(kBufferBytes) {}

RedisConnection::~RedisConnection() { close(); }

void RedisConnection::close() {
#if defined(UCM_HAVE_TLS)
    if (tls_ != nullptr) SSL_free(static_cast<SSL*>(tls_));
    if (tls_context_ != nullptr) SSL_CTX_free(static_cast<SSL_CTX*>(tls_context_));
#endif
    tls_ = tls_context_ = nullptr;
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    begin_ = end_ = 0;
}

std::string RedisConnection::fail(const std::string& what) {
    close();
    return "redis " + endpoint_.describe() + ": " + what;
}

std::string RedisConnection::ensure() {
    if (fd_ >= 0 && begin_ == end_) {
        // An idle connection has nothing to read. End of stream means the server closed it (a
        // restart, a timeout, CLIENT KILL); stray bytes mean the stream is out of step: reconnect.
        char byte;
        ssize_t n = ::recv(fd_, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
        bool hard_error = n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR;
        // Over TLS, bytes may be the server's session tickets, read later by OpenSSL: only an
        // end of stream or an error says the connection is gone.
        bool stray = n > 0 && tls_ == nullptr;
        if (n == 0 || hard_error || stray) close();
    }
    if (fd_ >= 0) return {};
    int err = 0;
    if (!endpoint_.unix_socket.empty()) {
        sockaddr_un addr{};
        addr.sun_family = AF_UNIX;
        if (endpoint_.unix_socket.size() >= sizeof(addr.sun_path)) return fail("unix socket path is too long");
        std::memcpy(addr.sun_path, endpoint_.unix_socket.c_str(), endpoint_.unix_socket.size() + 1);
        fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd_ < 0) return fail("socket: " + errno_text(errno));
        err = connect_within(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr), endpoint_.timeout_s);
    } else {
        addrinfo hints{};
        hints.ai_family = AF_UNSPEC;
        hints.ai_socktype = SOCK_STREAM;
        addrinfo* found = nullptr;
        std::string port = std::to_string(endpoint_.port);
        int rc = ::getaddrinfo(endpoint_.host.c_str(), port.c_str(), &hints, &found);
        if (rc != 0) return fail(std::string("cannot resolve host: ") + ::gai_strerror(rc));
        err = ECONNREFUSED;
        for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
            fd_ = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
            if (fd_ < 0) {
                err = errno;
                continue;
            }
            err = connect_within(fd_, a->ai_addr, a->ai_addrlen, endpoint_.timeout_s);
            if (err == 0) break;
            ::close(fd_);
            fd_ = -1;
        }
        ::freeaddrinfo(found);
        if (fd_ >= 0) {
            int one = 1;
            ::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        }
    }
    if (err != 0 || fd_ < 0) return fail("cannot connect: " + errno_text(err));
    timeval tv = to_timeval(endpoint_.timeout_s);
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    ::setsockopt(fd_, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    if (endpoint_.tls) {
        std::string error = start_tls();
        if (!error.empty()) return error;
    }
    return handshake();
}

#if defined(UCM_HAVE_TLS)
namespace {

std::string tls_error_text() {
    unsigned long code = ERR_get_error();
    if (code == 0) return errno != 0 ? errno_text(errno) : "unknown TLS error";
    char text[256];
    ERR_error_string_n(code, text, sizeof(text));
    ERR_clear_error();
    return text;
}

}  // namespace

std::string RedisConnection::start_tls() {
    SSL_CTX* context = SSL_CTX_new(TLS_client_method());
    tls_context_ = context;
    if (context == nullptr) return fail("TLS: " + tls_error_text());
    SSL_CTX_set_min_proto_version(context, TLS1_2_VERSION);
    if (endpoint_.tls_verify) {
        SSL_CTX_set_verify(context, SSL_VERIFY_PEER, nullptr);
        int loaded = endpoint_.tls_ca_file.empty()
                         ? SSL_CTX_set_default_verify_paths(context)
                         : SSL_CTX_load_verify_locations(context, endpoint_.tls_ca_file.c_str(), nullptr);
        if (loaded != 1) return fail("TLS: cannot load CA certificates: " + tls_error_text());
    }
    if (!endpoint_.tls_cert_file.empty()) {
        if (SSL_CTX_use_certificate_chain_file(context, endpoint_.tls_cert_file.c_str()) != 1 ||
            SSL_CTX_use_PrivateKey_file(context, endpoint_.tls_key_file.c_str(), SSL_FILETYPE_PEM) != 1) {
            return fail("TLS: cannot load the client certificate or key: " + tls_error_text());
        }
    }
    SSL* tls = SSL_new(context);
    tls_ = tls;
    if (tls == nullptr || SSL_set_fd(tls, fd_) != 1) return fail("TLS: " + tls_error_text());
    SSL_set_mode(tls, SSL_MODE_AUTO_RETRY);
    const std::string& name = endpoint_.tls_server_name.empty() ? endpoint_.host : endpoint_.tls_server_name;
    SSL_set_tlsext_host_name(tls, name.c_str());
    if (endpoint_.tls_verify) {
        X509_VERIFY_PARAM* param = SSL_get0_param(tls);
        if (X509_VERIFY_PARAM_set1_ip_asc(param, name.c_str()) != 1) SSL_set1_host(tls, name.c_str());
    }
    errno = 0;
    if (SSL_connect(tls) != 1) {
        long verify = SSL_get_verify_result(tls);
        std::string why = verify != X509_V_OK ? std::string("certificate verification failed: ") +
                                                    X509_verify_cert_error_string(verify)
                                              : tls_error_text();
        return fail("TLS handshake failed: " + why);
    }
    return {};
}

std::string RedisConnection::send_tls(const std::vector<iovec>& iov) {
    // Small pieces (command heads, trailers) are gathered so that a TLS record carries many.
    constexpr size_t kGather = 16 << 10;
    SSL* tls = static_cast<SSL*>(tls_);
    std::string gathered;
    auto write = [&](const char* data, size_t size) -> std::string {
        while (size > 0) {
            int chunk = static_cast<int>(std::min<size_t>(size, 1 << 30));
            errno = 0;
            int n = SSL_write(tls, data, chunk);
            if (n <= 0) {
                int code = SSL_get_error(tls, n);
                if (code == SSL_ERROR_SYSCALL && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                    return fail("timed out sending");
                }
                return fail("TLS write failed: " + tls_error_text());
            }
            data += n;
            size -= static_cast<size_t>(n);
        }
        return {};
    };
    for (const iovec& v : iov) {
        const char* data = static_cast<const char*>(v.iov_base);
        if (v.iov_len < kGather) {
            gathered.append(data, v.iov_len);
            if (gathered.size() < kGather) continue;
        }
        if (!gathered.empty()) {
            std::string error = write(gathered.data(), gathered.size());
            if (!error.empty()) return error;
            gathered.clear();
        }
        if (v.iov_len >= kGather) {
            std::string error = write(data, v.iov_len);
            if (!error.empty()) return error;
        }
    }
    return gathered.empty() ? std::string() : write(gathered.data(), gathered.size());
}
#else
std::string RedisConnection::start_tls() {
    return fail("this build of ucm-store has no TLS support (OpenSSL was not found when it was built)");
}

std::string RedisConnection::send_tls(const std::vector<iovec>&) { return fail("no TLS support"); }
#endif

size_t RedisConnection::receive(uint8_t* out, size_t size, std::string* error, bool all) {
    if (tls_ == nullptr) {
        for (;;) {
            ssize_t n = ::recv(fd_, out, size, all ? MSG_WAITALL : 0);
            if (n > 0) return static_cast<size_t>(n);
            if (n < 0 && errno == EINTR) continue;
            *error = n == 0 ? fail("the server closed the connection")
                     : (errno == EAGAIN || errno == EWOULDBLOCK) ? fail("timed out waiting for a reply")
                                                                 : fail("receive failed: " + errno_text(errno));
            return 0;
        }
    }
#if defined(UCM_HAVE_TLS)
    SSL* tls = static_cast<SSL*>(tls_);
    int chunk = static_cast<int>(std::min<size_t>(size, 1 << 30));
    errno = 0;
    int n = SSL_read(tls, out, chunk);
    if (n > 0) return static_cast<size_t>(n);
    int code = SSL_get_error(tls, n);
    if (code == SSL_ERROR_ZERO_RETURN) {
        *error = fail("the server closed the connection");
    } else if (code == SSL_ERROR_SYSCALL && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        *error = fail("timed out waiting for a reply");
    } else if (code == SSL_ERROR_SYSCALL && errno == 0) {
        *error = fail("the server closed the connection");
    } else {
        *error = fail("TLS read failed: " + tls_error_text());
    }
    return 0;
#else
    *error = fail("no TLS support");
    return 0;
#endif
}

std::string RedisConnection::handshake() {
    std::string out;
    size_t replies = 0;
    if (!endpoint_.password.empty()) {
        if (endpoint_.username.empty()) {
            append_command(out, {"AUTH", endpoint_.password});
        } else {
            append_command(out, {"AUTH", endpoint_.username, endpoint_.password});
        }
        ++replies;
    }
    std::string db = std::to_string(endpoint_.db);
    if (endpoint_.db != 0) {
        append_command(out, {"SELECT", db});
        ++replies;
    }
    append_command(out, {"PING"});
    ++replies;
    std::string error = send({{out.data(), out.size()}});
    if (!error.empty()) return error;
    for (size_t i = 0; i < replies; ++i) {
        RedisReply reply;
        error = read_reply(&reply);
        if (!error.empty()) return error;
        if (reply.type == '-') return fail("the server refused the connection: " + reply.text);
    }
    return {};
}

std::string RedisConnection::send(const std::vector<iovec>& iov) {
    if (fd_ < 0) return fail("not connected");
    if (tls_ != nullptr) return send_tls(iov);
    std::vector<iovec> rest(iov);
    size_t first = 0;
    while (first < rest.size()) {
        msghdr msg{};
        msg.msg_iov = rest.data() + first;
        msg.msg_iovlen = std::min<size_t>(rest.size() - first, IOV_MAX);
        ssize_t n = ::sendmsg(fd_, &msg, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return fail("timed out sending");
            return fail("send failed: " + errno_text(errno));
        }
        first = advance_iov(rest, first, static_cast<size_t>(n));
    }
    return {};
}

std::string RedisConnection::fill() {
    if (fd_ < 0) return fail("not connected");
    if (begin_ == end_) begin_ = end_ = 0;
    if (end_ == buffer_.size()) {
        std::memmove(buffer_.data(), buffer_.data() + begin_, end_ - begin_);
        end_ -= begin_;
        begin_ = 0;
    }
    std::string error;
    size_t n = receive(reinterpret_cast<uint8_t*>(buffer_.data()) + end_, buffer_.size() - end_, &error);
    end_ += n;
    return error;
}

std::string RedisConnection::read_line(std::string* line) {
    for (;;) {
        const char* start = buffer_.data() + begin_;
        const void* lf = std::memchr(start, '\n', end_ - begin_);
        if (lf != nullptr) {
            size_t length = static_cast<const char*>(lf) - start;
            if (length == 0 || start[length - 1] != '\r') return fail("protocol error: a line without CR LF");
            line->assign(start, length - 1);
            begin_ += length + 1;
            return {};
        }
        if (end_ - begin_ == buffer_.size()) return fail("protocol error: reply line too long");
        std::string error = fill();
        if (!error.empty()) return error;
    }
}

namespace {

bool parse_integer(const std::string& text, int64_t* value) {
    if (text.empty()) return false;
    char* end = nullptr;
    errno = 0;
    long long parsed = std::strtoll(text.c_str(), &end, 10);
    if (errno != 0 || end != text.c_str() + text.size()) return false;
    *value = parsed;
    return true;
}

}  // namespace

std::string RedisConnection::read_reply(RedisReply* reply, size_t max_bulk) {
    std::string line;
    std::string error = read_line(&line);
    if (!error.empty()) return error;
    if (line.empty()) return fail("protocol error: empty reply line");
    reply->type = line[0];
    reply->text.clear();
    switch (line[0]) {
        case '+':
        case '-':
            reply->text = line.substr(1);
            return {};
        case ':':
            if (!parse_integer(line.substr(1), &reply->integer)) return fail("protocol error: bad integer reply");
            return {};
        case '$': {
            int64_t length = 0;
            if (!parse_integer(line.substr(1), &length)) return fail("protocol error: bad bulk length");
            if (length < 0) {
                reply->type = 'n';
                return {};
            }
            if (static_cast<uint64_t>(length) > max_bulk) return fail("protocol error: unexpectedly large reply");
            reply->text.resize(static_cast<size_t>(length));
            error = read_exact(reinterpret_cast<uint8_t*>(reply->text.data()), reply->text.size());
            return error.empty() ? read_crlf() : error;
        }
        case '*': {
            int64_t count = 0;
            if (!parse_integer(line.substr(1), &count)) return fail("protocol error: bad array length");
            reply->elements.clear();
            if (count < 0) {
                reply->type = 'n';
                return {};
            }
            if (count > 1 << 20) return fail("protocol error: unexpectedly large array");
            reply->elements.resize(static_cast<size_t>(count));
            for (RedisReply& element : reply->elements) {
                error = read_reply(&element, max_bulk);
                if (!error.empty()) return error;
            }
            return {};
        }
        default:
            return fail("protocol error: unexpected reply type '" + line.substr(0, 1) + "'");
    }
}

std::string RedisConnection::read_bulk_header(int64_t* length, std::string* server_error) {
    std::string line;
    std::string error = read_line(&line);
    if (!error.empty()) return error;
    if (!line.empty() && line[0] == '-') {
        *server_error = line.substr(1);
        return {};
    }
    if (line.empty() || line[0] != '$' || !parse_integer(line.substr(1), length)) {
        return fail("protocol error: expected a bulk reply");
    }
    if (*length < 0) *length = -1;
    return {};
}

std::string RedisConnection::read_exact(uint8_t* out, size_t size) {
    size_t buffered = std::min(size, end_ - begin_);
    std::memcpy(out, buffer_.data() + begin_, buffered);
    begin_ += buffered;
    size_t done = buffered;
    // The rest arrives straight into `out`, in receives as large as the socket allows.
    while (done < size) {
        std::string error;
        size_t n = receive(out + done, size - done, &error, true);
        if (!error.empty()) return error;
        done += n;
    }
    return {};
}

std::string RedisConnection::skip(size_t size) {
    size_t left = size + 2;  // and the CRLF
    while (left > 0) {
        if (begin_ == end_) {
            std::string error = fill();
            if (!error.empty()) return error;
        }
        size_t take = std::min(left, end_ - begin_);
        begin_ += take;
        left -= take;
    }
    return {};
}

std::string RedisConnection::read_crlf() {
    uint8_t crlf[2];
    std::string error = read_exact(crlf, 2);
    if (!error.empty()) return error;
    if (crlf[0] != '\r' || crlf[1] != '\n') return fail("protocol error: bulk reply not ended by CR LF");
    return {};
}

void RedisConnection::append_command(std::string& out, const std::vector<std::string_view>& args) {
    out += '*';
    out += std::to_string(args.size());
    out += "\r\n";
    for (std::string_view arg : args) append_bulk(out, arg);
}

void RedisConnection::append_command_head(std::string& out, const std::vector<std::string_view>& args,
                                          size_t last_bytes) {
    out += '*';
    out += std::to_string(args.size() + 1);
    out += "\r\n";
    for (std::string_view arg : args) append_bulk(out, arg);
    out += '$';
    out += std::to_string(last_bytes);
    out += "\r\n";
}

}  // namespace ucm
