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
    RedisEndpoint endpoint;
    std::string prefix = "ucm:";
    uint32_t num_shards = 1;
    size_t threads = 4;
    uint64_t ttl_s = 0;  // 0: keys do not expire (the server's eviction policy governs)
};

class RedisStore {
public:
    // Connects once to check the endpoint and credentials; throws std::runtime_error saying why not.
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

private:
    class Lease;
    std::unique_ptr<RedisConnection> acquire();
    void release(std::unique_ptr<RedisConnection> connection);
    std::string key_of(const std::string& id) const { return config_.prefix + id; }
    // Sends `command key` for every id (pipelined) and hands each reply to on_reply; returns why
    // not every reply came.
    std::string for_each_key(const std::vector<std::string>& ids, const char* command,
                             const std::function<void(size_t, const RedisReply&)>& on_reply);
    // Runs `work` over a few ranges of the items on the pool (one connection each).
    using RangeWork = std::vector<std::string> (RedisStore::*)(std::vector<ShardIO>&, size_t, size_t);
    TaskPtr in_ranges(std::vector<ShardIO> items, RangeWork work);
    std::vector<std::string> dump_range(std::vector<ShardIO>& items, size_t begin, size_t end);
    std::vector<std::string> load_range(std::vector<ShardIO>& items, size_t begin, size_t end);
    std::string read_shard(RedisConnection& connection, const ShardIO& item, bool* damaged);

    RedisStoreConfig config_;
    std::mutex mutex_;
    std::vector<std::unique_ptr<RedisConnection>> idle_;
    ThreadPool pool_;
};

}  // namespace ucm
