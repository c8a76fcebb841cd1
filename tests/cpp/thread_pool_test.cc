#include "thread_pool.h"

#include <gtest/gtest.h>

#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <string>
#include <thread>
#include <utility>
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
// The calling thread's scheduling policy and name.
std::pair<int, std::string> this_thread_identity() {
    int policy = -1;
    char name[16] = {};
    struct sched_param param {};
    ::pthread_getschedparam(::pthread_self(), &policy, &param);
    ::pthread_getname_np(::pthread_self(), name, sizeof(name));
    return {policy, name};
}

TEST(ThreadPool, WorkersRunAtNormalPriorityUnderTheirName) {
    ThreadPool pool(1, "a-name-longer-than-fifteen");
    std::pair<int, std::string> identity;
    pool.parallel_for(2, 2, [&](size_t begin, size_t) {
        if (begin != 0) identity = this_thread_identity();  // the caller runs the first range itself
    });
    EXPECT_EQ(identity, std::make_pair(int{SCHED_OTHER}, std::string("a-name-longer-t")));
}

TEST(ThreadPool, ABackgroundThreadRunsAtIdlePriority) {
    std::pair<int, std::string> identity;
    bool lowered = false;
    std::thread thread([&] {
        name_this_thread("ucm-test-idle");
        lowered = make_this_thread_background();
        identity = this_thread_identity();
    });
    thread.join();
    EXPECT_TRUE(lowered);
    EXPECT_EQ(identity, std::make_pair(int{SCHED_IDLE}, std::string("ucm-test-idle")));
}
#endif

}  // namespace
}  // namespace ucm
