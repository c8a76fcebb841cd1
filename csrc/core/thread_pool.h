// A fixed set of worker threads running queued jobs in submission order.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace ucm {

// Names the calling thread (as `top -H` and `ps -L` show it; cut to 15 characters).
void name_this_thread(const std::string& name);

// Moves the calling thread to the lowest CPU priority (SCHED_IDLE where the OS has it): it runs
// only on a core that nothing else wants, so background work never slows a forward pass that
// needs every core. Lowering is always allowed; returns whether it took effect.
bool make_this_thread_background();

class ThreadPool {
public:
    // `name`: the workers' thread name. Workers run at normal priority: callers wait on their jobs.
    explicit ThreadPool(size_t threads, std::string name = "ucm-pool");
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
    std::string name_;
    bool stopping_ = false;
};

}  // namespace ucm
