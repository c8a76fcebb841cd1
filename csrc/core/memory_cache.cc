#include "memory_cache.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <unordered_set>

namespace ucm {
namespace {

std::string taken_key(const std::string& id, uint32_t shard) {
    std::string key = id;
    key.append(reinterpret_cast<const char*>(&shard), sizeof(shard));
    return key;
}

}  // namespace

MemoryCache::MemoryCache(MemoryConfig config) : config_(config), pool_(config.threads, "ucm-memory") {}

MemoryCache::~MemoryCache() {
    close();
    pool_.shutdown();
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [id, entry] : entries_) {
        for (Slot& slot : entry->slots) std::free(slot.data);
    }
    for (auto& [size, list] : free_) {
        for (uint8_t* data : list) std::free(data);
    }
}

void MemoryCache::close() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        closing_ = true;
    }
    dirty_cv_.notify_all();
}

uint64_t MemoryCache::used_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return used_bytes_;
}

// ---- memory ----------------------------------------------------------------------------------

uint8_t* MemoryCache::allocate(size_t size) {
    auto it = free_.find(size);
    if (it != free_.end() && !it->second.empty()) {
        uint8_t* data = it->second.back();
        it->second.pop_back();
        free_bytes_ -= size;
        return data;
    }
    // Keep reusable allocations only while they fit beside what is in use.
    for (auto other = free_.begin(); other != free_.end() && used_bytes_ + free_bytes_ + size > config_.capacity_bytes;
         ++other) {
        for (uint8_t* data : other->second) std::free(data);
        free_bytes_ -= other->first * other->second.size();
        other->second.clear();
    }
    return static_cast<uint8_t*>(std::aligned_alloc(64, (size + 63) / 64 * 64));
}

void MemoryCache::release(Entry& entry) {
    for (Slot& slot : entry.slots) {
        if (slot.data == nullptr) continue;
        free_[slot.size].push_back(slot.data);
        free_bytes_ += slot.size;
        used_bytes_ -= slot.size;
        slot = Slot{};
    }
    entry.filled = 0;
}

void MemoryCache::unpin(const EntryPtr& entry) {
    if (--entry->pins == 0 && entry->dropped) release(*entry);
}

void MemoryCache::drop(std::unordered_map<std::string, EntryPtr>::iterator it) {
    EntryPtr entry = it->second;
    lru_.erase(entry->lru);
    entries_.erase(it);
    entry->dropped = true;
    if (entry->pins == 0) release(*entry);
}

void MemoryCache::evict() {
    auto next = lru_.end();  // stays valid while the node before it is erased
    while (used_bytes_ > config_.capacity_bytes && next != lru_.begin()) {
        auto candidate = std::prev(next);
        auto found = entries_.find(*candidate);
        if (found->second->pins > 0) {
            next = candidate;
            continue;
        }
        drop(found);
    }
}

// ---- lookups ---------------------------------------------------------------------------------

std::vector<uint8_t> MemoryCache::lookup(const std::vector<std::string>& ids) {
    std::vector<uint8_t> found(ids.size(), 0);
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = 0; i < ids.size(); ++i) {
        auto it = entries_.find(ids[i]);
        found[i] = it != entries_.end() && visible(*it->second) ? 1 : 0;
    }
    return found;
}

size_t MemoryCache::lookup_prefix(const std::vector<std::string>& ids) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = 0; i < ids.size(); ++i) {
        auto it = entries_.find(ids[i]);
        if (it == entries_.end() || !visible(*it->second)) return i;
    }
    return ids.size();
}

// ---- dump ------------------------------------------------------------------------------------

TaskPtr MemoryCache::dump(std::vector<ShardIO> items, bool dirty) {
    return run_items(pool_, std::move(items), [this, dirty](const ShardIO& item) { return dump_one(item, dirty); });
}

std::string MemoryCache::dump_one(const ShardIO& item, bool dirty) {
    size_t size = item.total_bytes();
    if (size > config_.capacity_bytes) return "shard is larger than the memory store's capacity";
    std::unique_lock<std::mutex> lock(mutex_);
    if (dirty && config_.write_behind_bytes > 0) {
        // Back-pressure: the background writer must catch up before more is queued for it.
        room_cv_.wait(lock, [&] { return dirty_bytes_ == 0 || dirty_bytes_ + size <= config_.write_behind_bytes; });
        dirty_bytes_ += size;  // reserved now, so concurrent dumps respect the bound
    }
    auto [it, inserted] = entries_.try_emplace(item.id);
    if (inserted) {
        it->second = std::make_shared<Entry>();
        it->second->slots.resize(config_.num_shards);
        lru_.push_front(item.id);
        it->second->lru = lru_.begin();
    }
    EntryPtr entry = it->second;
    Slot& slot = entry->slots[item.shard];
    if (slot.state != SlotState::kEmpty) {  // stored already, or being stored by another task
        if (dirty && config_.write_behind_bytes > 0) {
            dirty_bytes_ -= size;
            room_cv_.notify_all();
        }
        return {};
    }
    slot.data = allocate(size);
    if (slot.data == nullptr) {
        if (dirty && config_.write_behind_bytes > 0) dirty_bytes_ -= size;
        room_cv_.notify_all();
        return "out of host memory";
    }
    slot.size = size;
    slot.state = SlotState::kWriting;
    used_bytes_ += size;
    ++entry->pins;
    lock.unlock();

    uint8_t* out = slot.data;
    for (const Buffer& b : item.buffers) {
        std::memcpy(out, b.data, b.size);
        out += b.size;
    }

    lock.lock();
    slot.state = SlotState::kFilled;
    ++entry->filled;
    if (dirty && config_.write_behind_bytes > 0) {
        ++entry->pins;  // held until the backend has the shard
        dirty_.push_back({entry, DirtyShard{item.id, item.shard, slot.data, size}});
        dirty_cv_.notify_one();
    }
    unpin(entry);
    evict();
    return {};
}

// ---- load ------------------------------------------------------------------------------------

TaskPtr MemoryCache::load(std::vector<ShardIO> items, std::vector<size_t>* missing) {
    struct Hit {
        size_t index;
        EntryPtr entry;
    };
    auto hits = std::make_shared<std::vector<Hit>>();
    auto task = std::make_shared<Task>(0);
    {
        std::lock_guard<std::mutex> lock(mutex_);
        for (size_t i = 0; i < items.size(); ++i) {
            auto it = entries_.find(items[i].id);
            if (it == entries_.end() || !visible(*it->second)) {
                missing->push_back(i);
                continue;
            }
            EntryPtr entry = it->second;
            size_t stored = entry->slots[items[i].shard].size;
            if (stored != items[i].total_bytes()) {
                task->fail(i, items[i].id, "stored shard holds " + std::to_string(stored) +
                                            " bytes but the buffers hold " + std::to_string(items[i].total_bytes()));
                continue;
            }
            ++entry->pins;
            lru_.splice(lru_.begin(), lru_, entry->lru);
            hits->push_back({i, entry});
        }
    }
    task->add_pending(hits->size());
    auto shared = std::make_shared<std::vector<ShardIO>>(std::move(items));
    pool_.for_ranges(hits->size(), pool_.size() * 4, [this, task, shared, hits](size_t begin, size_t end) {
        for (size_t h = begin; h < end; ++h) {
            const Hit& hit = (*hits)[h];
            const ShardIO& item = (*shared)[hit.index];
            const uint8_t* in = hit.entry->slots[item.shard].data;
            for (const Buffer& b : item.buffers) {
                std::memcpy(b.data, in, b.size);
                in += b.size;
            }
            {
                std::lock_guard<std::mutex> lock(mutex_);
                unpin(hit.entry);
            }
            task->finish_one();
        }
    });
    return task;
}

void MemoryCache::remove(const std::vector<std::string>& ids) {
    std::lock_guard<std::mutex> lock(mutex_);
    std::unordered_set<std::string> removed(ids.begin(), ids.end());
    // Shards still queued for the backend must not reach it after the removal.
    for (auto it = dirty_.begin(); it != dirty_.end();) {
        if (removed.count(it->second.id) == 0) {
            ++it;
            continue;
        }
        dirty_bytes_ -= it->second.size;
        unpin(it->first);
        it = dirty_.erase(it);
    }
    for (const std::string& id : removed) {
        auto it = entries_.find(id);
        if (it != entries_.end()) drop(it);
    }
    room_cv_.notify_all();
}

void MemoryCache::wait_in_flight() {
    std::unique_lock<std::mutex> lock(mutex_);
    room_cv_.wait(lock, [this] { return taken_.empty(); });
}

// ---- write-behind ----------------------------------------------------------------------------

std::vector<DirtyShard> MemoryCache::take_dirty(size_t max_items, double timeout_s) {
    std::unique_lock<std::mutex> lock(mutex_);
    dirty_cv_.wait_for(lock, std::chrono::duration<double>(timeout_s), [this] { return closing_ || !dirty_.empty(); });
    std::vector<DirtyShard> taken;
    while (!dirty_.empty() && taken.size() < max_items) {
        auto& [entry, shard] = dirty_.front();
        taken_[taken_key(shard.id, shard.shard)].push_back(entry);
        taken.push_back(std::move(shard));
        dirty_.pop_front();
    }
    return taken;
}

void MemoryCache::finish_dirty(const std::vector<DirtyShard>& shards) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const DirtyShard& shard : shards) {
        auto it = taken_.find(taken_key(shard.id, shard.shard));
        if (it == taken_.end() || it->second.empty()) continue;
        EntryPtr entry = it->second.back();
        it->second.pop_back();
        if (it->second.empty()) taken_.erase(it);
        dirty_bytes_ -= shard.size;
        unpin(entry);
    }
    evict();
    room_cv_.notify_all();
}

void MemoryCache::wait_clean() {
    std::unique_lock<std::mutex> lock(mutex_);
    room_cv_.wait(lock, [this] { return dirty_bytes_ == 0; });
}

}  // namespace ucm
