#include "thread_pool.h"

#include <gtest/gtest.h>

#include <atomic>
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

}  // namespace
}  // namespace ucm
