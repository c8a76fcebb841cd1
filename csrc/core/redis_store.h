// The `redis` store: blocks in a Redis or Valkey server, shared by every process and host that
// reaches it.
//
// A block is one hash, key = prefix + the id's bytes; field "<shard>" holds that shard as in
// block_format.h (payload, then the 128-byte trailer with its checksum). HSET of one field is
// atomic, so a reader never sees part of a shard, and a block counts as present only once its
// hash has all num_shards fields. The server's own eviction (maxmemory with an LRU or LFU
// policy) removes whole keys, hence whole blocks.
//
// Transfers run on a pool of threads, each with its own connection: a range of blocks is sent
// in pipelined windows (one writev of the command heads and the caller's buffers as they are,
// one window ahead of the replies being read), and the replies are read in order, each payload
// straight into the caller's memory (or in cache-sized pieces into a sink). A connection that fails is closed and reopened on next use;
// the blocks it was carrying fail their task, and lookups that cannot reach the server report
// misses.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "buffer.h"
#include "redis_client.h"
#include "task.h"
#include "thread_pool.h"

namespace ucm {

struct RedisStoreConfig {
    RedisEndpoint endpoint;  // the server; in cluster mode, any node (the others are discovered)
    bool cluster = false;
    std::string prefix = "ucm:";
    uint32_t num_shards = 1;
    size_t threads = 4;
    uint64_t ttl_s = 0;  // 0: keys do not expire (the server's eviction policy governs)
};

// The hash slot of a key in Redis Cluster: CRC16 of the key, or of its {hash tag}, modulo 16384.
uint16_t redis_cluster_slot(const std::string& key);

class RedisStore {
public:
    // Connects once to check the endpoint and credentials (and in cluster mode reads the slot map);
    // throws std::runtime_error saying why not.
    explicit RedisStore(RedisStoreConfig config);
    ~RedisStore();
    RedisStore(const RedisStore&) = delete;
    RedisStore& operator=(const RedisStore&) = delete;

    // Unreachable server: every id is reported absent and `*error` says why.
    std::vector<uint8_t> lookup(const std::vector<std::string>& ids, std::string* error);
    size_t lookup_prefix(const std::vector<std::string>& ids, std::string* error);
    TaskPtr dump(std::vector<ShardIO> items);
    TaskPtr load(std::vector<ShardIO> items);
    std::string remove(const std::vector<std::string>& ids);
    void close();
    // The nodes transfers go to (one without cluster mode), as host:port.
    std::vector<std::string> nodes();

private:
    struct Node {
        RedisEndpoint endpoint;
        std::vector<std::unique_ptr<RedisConnection>> idle;
    };
    // An idle connection to `node`, or a new one, opened (connected, authenticated) when it was not;
    // `*error` says why it could not be. Hand it back with release(), which drops a failed one.
    std::unique_ptr<RedisConnection> acquire(size_t node, std::string* error);
    void release(size_t node, std::unique_ptr<RedisConnection> connection);
    std::string key_of(const std::string& id) const { return config_.prefix + id; }
    // Cluster mode: reads the slot map from any reachable node; returns why it could not.
    std::string refresh_slots();
    // The node holding each id's key, refreshing the slot map first where a reply said it moved.
    std::vector<size_t> route(const std::vector<std::string>& ids);
    void note_moved(const std::string& server_error);
    // Sends `command key` for the ids at `picks` to one node (pipelined) and hands each reply to
    // on_reply(index into picks); returns why not every reply came.
    std::string for_each_key(size_t node, const std::vector<std::string>& ids, const std::vector<size_t>& picks,
                             const char* command, const std::function<void(size_t, const RedisReply&)>& on_reply);
    // Runs `work` over a few groups of the items, each group on one node, on the pool.
    using GroupWork = std::vector<std::string> (RedisStore::*)(size_t, std::vector<ShardIO>&,
                                                                const std::vector<size_t>&);
    TaskPtr in_groups(std::vector<ShardIO> items, GroupWork work);
    std::vector<std::string> dump_group(size_t node, std::vector<ShardIO>& items, const std::vector<size_t>& picks);
    std::vector<std::string> load_group(size_t node, std::vector<ShardIO>& items, const std::vector<size_t>& picks);
    std::string read_shard(RedisConnection& connection, const ShardIO& item, bool* damaged);

    RedisStoreConfig config_;
    std::mutex mutex_;
    std::vector<Node> nodes_;
    std::vector<uint16_t> slot_node_;  // cluster mode: the node of each of the 16384 slots
    bool slots_stale_ = false;
    ThreadPool pool_;
};

}  // namespace ucm
