// A batch of block transfers that completes in the background.
#pragma once

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "buffer.h"
#include "thread_pool.h"

namespace ucm {

class Task {
public:
    explicit Task(size_t pending) : pending_(pending) {}

    // Record that `count` more units of work belong to this task (before they are started).
    void add_pending(size_t count);
    // Item `index` (block `id`) of the batch finished; `error` is empty on success.
    void finish(size_t index, const std::string& id, std::string error);
    void finish_one() { finish(0, {}, {}); }
    void fail(size_t index, std::string id, std::string reason);

    bool done() const;
    // Blocks until every unit has finished; returns the failures in batch order.
    std::vector<Failure> wait();

private:
    mutable std::mutex mutex_;
    std::condition_variable cv_;
    size_t pending_;
    std::vector<std::pair<size_t, Failure>> failures_;  // with the item's index in the batch
};

using TaskPtr = std::shared_ptr<Task>;

// Runs `work(item) -> error` (empty on success) for every item on `pool`, in a few ranges of
// consecutive items; returns at once with the task that finishes when every item has.
template <typename Work>
TaskPtr run_items(ThreadPool& pool, std::vector<ShardIO> items, Work work) {
    auto task = std::make_shared<Task>(items.size());
    auto shared = std::make_shared<std::vector<ShardIO>>(std::move(items));
    pool.for_ranges(shared->size(), pool.size() * 4, [task, shared, work](size_t begin, size_t end) {
        for (size_t i = begin; i < end; ++i) task->finish(i, (*shared)[i].id, work((*shared)[i]));
    });
    return task;
}

}  // namespace ucm
