// A host-memory block cache with least-recently-used eviction. With a slower store behind it
// (composed in Python), newly dumped shards are queued as "dirty" and handed to a write-behind
// thread; a dirty shard stays pinned in memory until the backend has it.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "buffer.h"
#include "task.h"
#include "thread_pool.h"

namespace ucm {

struct MemoryConfig {
    uint64_t capacity_bytes = 0;
    uint32_t num_shards = 1;
    size_t threads = 8;
    uint64_t write_behind_bytes = 0;  // bound on dirty bytes; 0 when nothing is behind the cache
};

// A shard waiting to be written to the backend; `data` stays valid until finish_dirty().
struct DirtyShard {
    std::string id;
    uint32_t shard;
    uint8_t* data;
    size_t size;
};

class MemoryCache {
public:
    explicit MemoryCache(MemoryConfig config);
    ~MemoryCache();
    MemoryCache(const MemoryCache&) = delete;
    MemoryCache& operator=(const MemoryCache&) = delete;

    std::vector<uint8_t> lookup(const std::vector<std::string>& ids);
    size_t lookup_prefix(const std::vector<std::string>& ids);
    // `dirty`: queue the new shards for the backend (a dump); false for blocks promoted from it.
    TaskPtr dump(std::vector<ShardIO> items, bool dirty);
    // Starts copying the blocks that are in memory; `missing` receives the indices of the others.
    TaskPtr load(std::vector<ShardIO> items, std::vector<size_t>* missing);
    // Drops the blocks and cancels their shards still queued for the backend.
    void remove(const std::vector<std::string>& ids);
    // Blocks until no shard taken by take_dirty() is still being written.
    void wait_in_flight();

    // Waits up to `timeout_s` for dirty shards and returns at most `max_items` of them.
    std::vector<DirtyShard> take_dirty(size_t max_items, double timeout_s);
    void finish_dirty(const std::vector<DirtyShard>& shards);
    // Blocks until every dirty shard has been handed back through finish_dirty().
    void wait_clean();
    // Wakes take_dirty() callers for good; pending work still completes.
    void close();

    uint64_t used_bytes();

private:
    enum class SlotState { kEmpty, kWriting, kFilled };
    struct Slot {
        uint8_t* data = nullptr;
        size_t size = 0;
        SlotState state = SlotState::kEmpty;
    };
    struct Entry {
        std::vector<Slot> slots;
        uint32_t filled = 0;
        uint32_t pins = 0;
        bool dropped = false;  // no longer in the map; memory is released at the last unpin
        std::list<std::string>::iterator lru;
    };
    using EntryPtr = std::shared_ptr<Entry>;

    std::string dump_one(const ShardIO& item, bool dirty);
    bool visible(const Entry& entry) const { return entry.filled == config_.num_shards; }
    uint8_t* allocate(size_t size);  // mutex_ held
    void release(Entry& entry);      // mutex_ held; entry unpinned
    void unpin(const EntryPtr& entry);  // mutex_ held
    void drop(std::unordered_map<std::string, EntryPtr>::iterator it);  // mutex_ held
    void evict();                    // mutex_ held

    MemoryConfig config_;
    std::mutex mutex_;
    std::condition_variable dirty_cv_;  // dirty shards queued, or closing
    std::condition_variable room_cv_;   // dirty bytes went down
    std::unordered_map<std::string, EntryPtr> entries_;
    std::list<std::string> lru_;  // front: most recently used
    std::unordered_map<size_t, std::vector<uint8_t*>> free_;  // reusable allocations by size
    uint64_t used_bytes_ = 0;
    uint64_t free_bytes_ = 0;
    std::list<std::pair<EntryPtr, DirtyShard>> dirty_;  // queued, not yet taken
    std::unordered_map<std::string, std::vector<EntryPtr>> taken_;  // handed out by take_dirty()
    uint64_t dirty_bytes_ = 0;  // queued plus taken and not yet finished
    bool closing_ = false;
    ThreadPool pool_;
};

}  // namespace ucm
