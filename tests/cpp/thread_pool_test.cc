#include "thread_pool.h"

#include <gtest/gtest.h>

#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <cstring>
#include <string>
#include <vector>

namespace ucm {
namespace {

TEST(ThreadPool, ParallelForCoversEveryIndexOnce) {
    ThreadPool pool(3);
    std::vector<std::atomic<int>> hits(1001);
    pool.parallel_for(hits.size(), 7, [&](size_t begin, size_t end) {
        for (size_t i = begin; i < end; ++i) hits[i]++;
    });
    for (auto& h : hits) EXPECT_EQ(h.load(), 1);
}

TEST(ThreadPool, ShutdownRunsEveryQueuedJob) {
    std::atomic<int> ran{0};
    {
        ThreadPool pool(2);
        for (int i = 0; i < 100; ++i) pool.submit([&] { ran++; });
        pool.shutdown();
    }
    EXPECT_EQ(ran.load(), 100);
}

#if defined(__linux__)
// What a worker of `pool` reports about itself: its scheduling policy and its name.
std::pair<int, std::string> worker_identity(ThreadPool& pool) {
    int policy = -1;
    char name[16] = {};
    pool.parallel_for(2, 2, [&](size_t begin, size_t) {
        if (begin == 0) return;  // the caller runs the first range; the second runs on a worker
        struct sched_param param {};
        ::pthread_getschedparam(::pthread_self(), &policy, &param);
        ::pthread_getname_np(::pthread_self(), name, sizeof(name));
    });
    return {policy, name};
}

TEST(ThreadPool, BackgroundWorkersRunAtIdlePriorityUnderTheirName) {
    ThreadPool background(1, "ucm-test-save", true);
    EXPECT_EQ(worker_identity(background), std::make_pair(int{SCHED_IDLE}, std::string("ucm-test-save")));
    ThreadPool normal(1, "a-name-longer-than-fifteen");
    EXPECT_EQ(worker_identity(normal), std::make_pair(int{SCHED_OTHER}, std::string("a-name-longer-t")));
}
#endif

}  // namespace
}  // namespace ucm
