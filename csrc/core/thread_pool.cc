#include "thread_pool.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <memory>

namespace ucm {

void name_this_thread(const std::string& name) {
#if defined(__linux__)
    ::pthread_setname_np(::pthread_self(), name.substr(0, 15).c_str());
#elif defined(__APPLE__)
    ::pthread_setname_np(name.c_str());
#endif
}

bool make_this_thread_background() {
#if defined(SCHED_IDLE)
    struct sched_param idle {};
    return ::pthread_setschedparam(::pthread_self(), SCHED_IDLE, &idle) == 0;
#else
    return false;
#endif
}

ThreadPool::ThreadPool(size_t threads, std::string name) : name_(std::move(name)) {
    threads = std::max<size_t>(threads, 1);
    workers_.reserve(threads);
    for (size_t i = 0; i < threads; ++i) workers_.emplace_back([this] { run(); });
}

ThreadPool::~ThreadPool() { shutdown(); }

void ThreadPool::submit(std::function<void()> job) {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        jobs_.push_back(std::move(job));
    }
    cv_.notify_one();
}

void ThreadPool::for_ranges(size_t count, size_t chunks, const std::function<void(size_t, size_t)>& body) {
    if (count == 0) return;
    chunks = std::clamp<size_t>(chunks, 1, count);
    size_t step = (count + chunks - 1) / chunks;
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t begin = 0; begin < count; begin += step) {
        size_t end = std::min(count, begin + step);
        jobs_.push_back([body, begin, end] { body(begin, end); });
    }
    cv_.notify_all();
}

void ThreadPool::parallel_for(size_t count, size_t chunks, const std::function<void(size_t, size_t)>& body) {
    if (count == 0) return;
    chunks = std::clamp<size_t>(chunks, 1, count);
    size_t step = (count + chunks - 1) / chunks;
    size_t ranges = (count + step - 1) / step;
    struct Latch {
        std::mutex mutex;
        std::condition_variable cv;
        size_t left;
    };
    auto latch = std::make_shared<Latch>();
    latch->left = ranges - 1;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        for (size_t begin = step; begin < count; begin += step) {
            size_t end = std::min(count, begin + step);
            jobs_.push_back([&body, latch, begin, end] {
                body(begin, end);
                std::lock_guard<std::mutex> guard(latch->mutex);
                if (--latch->left == 0) latch->cv.notify_all();
            });
        }
    }
    cv_.notify_all();
    body(0, std::min(count, step));
    std::unique_lock<std::mutex> lock(latch->mutex);
    latch->cv.wait(lock, [&] { return latch->left == 0; });
}

void ThreadPool::shutdown() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        if (stopping_) return;
        stopping_ = true;
    }
    cv_.notify_all();
    for (std::thread& worker : workers_) worker.join();
}

void ThreadPool::run() {
    name_this_thread(name_);
    for (;;) {
        std::function<void()> job;
        {
            std::unique_lock<std::mutex> lock(mutex_);
            cv_.wait(lock, [this] { return stopping_ || !jobs_.empty(); });
            if (jobs_.empty()) return;  // stopping, and every queued job has run
            job = std::move(jobs_.front());
            jobs_.pop_front();
        }
        job();
    }
}

}  // namespace ucm
