// A block store on a POSIX directory: a local disk or a network mount shared by many
// processes and hosts. See docs/store.md for the layout and its guarantees.
#pragma once

#include <sys/stat.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "buffer.h"
#include "shared_tier.h"
#include "task.h"
#include "thread_pool.h"

namespace ucm {

struct PosixConfig {
    std::string root;
    uint32_t num_shards = 1;
    size_t threads = 8;
    bool direct_io = false;
    uint64_t capacity_bytes = 0;  // 0: unbounded
    bool fsync = false;
    uint64_t shared_memory_bytes = 0;  // 0: no shared host-memory tier (shared_tier.h)
    std::string shared_memory_dir = "/dev/shm";
    std::string shared_memory_name;  // the arena files' prefix, one per store root
};

// Progress of PosixStore::prewarm.
struct PrewarmStats {
    bool running = false;
    uint64_t files = 0;
    uint64_t bytes = 0;
    double seconds = 0;
};

class PosixStore {
public:
    // Throws std::invalid_argument naming what is wrong with the configuration or the root.
    explicit PosixStore(PosixConfig config);
    ~PosixStore();
    PosixStore(const PosixStore&) = delete;
    PosixStore& operator=(const PosixStore&) = delete;

    std::vector<uint8_t> lookup(const std::vector<std::string>& ids);
    size_t lookup_prefix(const std::vector<std::string>& ids);
    TaskPtr dump(std::vector<ShardIO> items);
    TaskPtr load(std::vector<ShardIO> items);
    void prefetch(const std::vector<std::string>& ids);
    void remove(const std::vector<std::string>& ids);

    // One pass over the root: removes temporary files of dead writers and, when a capacity is
    // set, the least recently used blocks until the total is at most 90% of it. Returns bytes freed.
    uint64_t evict_now();
    // Starts reading the store's most recently used shard files back into the OS page cache, newest
    // first, until `budget_bytes` are read (shard: that shard's files only when num_shards > 1; -1:
    // all). A background thread at the lowest CPU priority does it; returns at once. Ignored while
    // one is running.
    void prewarm(uint64_t budget_bytes, int shard);
    PrewarmStats prewarm_stats() const;
    // The shared host-memory tier's counters (all zero when it is off).
    SharedTierStats shared_memory_stats();
    // Just the loads the shared tier served, cheaply (0 when it is off).
    uint64_t shared_memory_hits() const;
    // Blocks until the copies queued for the shared tier (files just written or loaded) are made.
    void wait_fills();
    void close();

private:
    struct EvictStats;

    std::string block_dir(const std::string& id) const;
    std::string block_base(const std::string& id) const;  // dir/hex
    std::string shard_path(const std::string& id, uint32_t shard) const;
    std::string visible_path(const std::string& id) const;  // the file whose presence commits the block
    bool exists(const std::string& path) const;
    bool present(const std::string& id) const;

    std::string dump_one(const ShardIO& item);
    std::string load_one(const ShardIO& item);
    std::string write_shard(int fd, const ShardIO& item, uint64_t* checksum);
    std::string read_shard(int fd, const ShardIO& item);
    std::string read_shard_to_sink(int fd, const ShardIO& item);
    std::string read_shard_direct(int fd, const ShardIO& item);
    std::string explain_size_mismatch(int fd, size_t expected) const;
    // The trailer read after a shard's payload, checked against the item and the payload checksum.
    std::string check_trailer(int fd, const uint8_t* raw, const ShardIO& item, size_t total, uint64_t checksum) const;
    void commit_marker_if_complete(const std::string& id);
    int open_tmp(const std::string& dir, std::string* tmp_name);

    void note_written(uint64_t bytes);
    void evictor_loop();
    uint64_t evict_pass(bool take, bool wait_for_lease);
    bool take_lease();
    bool loaded_since(const std::vector<std::string>& files, int64_t since_ns) const;
    // Calls visit(path under blocks/, file name, its stat) for every regular file of the store.
    // With create_missing, a fan-out directory that does not exist yet is created on the way.
    // Stops early once *stop is set.
    void for_each_file(
        const std::function<void(const std::string&, const std::string&, const struct stat&)>& visit,
        bool create_missing = false, const std::atomic<bool>* stop = nullptr) const;
    void prewarm_loop(uint64_t budget_bytes, int shard);
    static bool touched_recently(int64_t mtime_s);
    static void touch(int fd);
    void touch_path(const std::string& path, int64_t mtime_s) const;
    // Copies a verified shard file into the shared tier (after a load that missed the tier, or for
    // prewarm; a dump copies its own bytes); returns the file's size (0: it is gone).
    uint64_t fill_tier(const std::string& path);
    void queue_fill(const std::string& path);
    void fill_loop();
    static bool is_damage(const std::string& error);
    void discard_damaged(int fd, const std::string& path, const std::string& id);
    bool tmp_is_abandoned(const std::string& name, int64_t mtime_s) const;

    PosixConfig config_;
    int blocks_fd_ = -1;
    int root_fd_ = -1;
    std::string tmp_prefix_;
    std::atomic<uint64_t> tmp_seq_{0};
    ThreadPool pool_;       // loads, lookups, removals
    ThreadPool save_pool_;  // dumps

    std::mutex evict_mutex_;
    std::condition_variable evict_cv_;
    bool evict_requested_ = false;
    bool stopping_ = false;
    std::atomic<uint64_t> written_since_evict_{0};
    std::thread evictor_;
    std::atomic<bool> prewarm_running_{false};
    std::atomic<uint64_t> prewarm_files_{0};
    std::atomic<uint64_t> prewarm_bytes_{0};
    std::atomic<double> prewarm_seconds_{0};
    std::atomic<bool> prewarm_stop_{false};
    std::thread prewarmer_;
    std::unique_ptr<SharedTier> tier_;
    std::mutex fill_mutex_;
    std::condition_variable fill_cv_;
    std::vector<std::string> fill_queue_;  // files to copy into the tier, in the background
    std::atomic<bool> fill_stopping_{false};
    bool fill_busy_ = false;
    std::thread filler_;
    std::mutex close_mutex_;
    bool closed_ = false;
};

}  // namespace ucm
