// A fixed set of worker threads running queued jobs in submission order.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace ucm {

class ThreadPool {
public:
    explicit ThreadPool(size_t threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    size_t size() const { return workers_.size(); }
    void submit(std::function<void()> job);

    // Runs body(begin, end) over [0, count) split into about `chunks` contiguous ranges
    // (at most one per item), in the pool; returns at once.
    void for_ranges(size_t count, size_t chunks, const std::function<void(size_t, size_t)>& body);

    // Like for_ranges, but blocks until every range has run; the caller runs one range itself.
    void parallel_for(size_t count, size_t chunks, const std::function<void(size_t, size_t)>& body);

    // Waits for every queued and running job, then joins the workers. Idempotent.
    void shutdown();

private:
    void run();

    std::mutex mutex_;
    std::condition_variable cv_;
    std::deque<std::function<void()>> jobs_;
    std::vector<std::thread> workers_;
    bool stopping_ = false;
};

}  // namespace ucm
