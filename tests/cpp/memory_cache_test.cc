#include "memory_cache.h"

#include <gtest/gtest.h>

#include "test_util.h"

namespace ucm {
namespace {

std::vector<Failure> dump(MemoryCache& cache, const std::string& id, std::vector<uint8_t>& bytes, bool dirty = false) {
    std::vector<ShardIO> items{test::shard(id, bytes)};
    return cache.dump(std::move(items), dirty)->wait();
}

TEST(MemoryCache, EvictsLeastRecentlyUsedFirst) {
    MemoryCache cache({3000, 1, 2, 0});
    auto a = test::random_bytes(1000, 1), b = test::random_bytes(1000, 2), c = test::random_bytes(1000, 3);
    ASSERT_TRUE(dump(cache, "a", a).empty());
    ASSERT_TRUE(dump(cache, "b", b).empty());
    std::vector<uint8_t> out(1000);
    std::vector<size_t> missing;
    std::vector<ShardIO> items{test::shard("a", out)};
    ASSERT_TRUE(cache.load(std::move(items), &missing)->wait().empty());  // "a" is now the most recent
    ASSERT_EQ(out, a);
    ASSERT_TRUE(dump(cache, "c", c).empty());
    auto d = test::random_bytes(1000, 4);
    ASSERT_TRUE(dump(cache, "d", d).empty());
    EXPECT_EQ(cache.lookup({"a", "b", "c", "d"}), (std::vector<uint8_t>{1, 0, 1, 1}));
    EXPECT_LE(cache.used_bytes(), 3000u);
}

TEST(MemoryCache, DirtyShardsStayUntilFinished) {
    MemoryCache cache({2000, 1, 2, 2000});
    auto a = test::random_bytes(1000, 1);
    ASSERT_TRUE(dump(cache, "a", a, true).empty());
    auto dirty = cache.take_dirty(10, 1.0);
    ASSERT_EQ(dirty.size(), 1u);
    EXPECT_EQ(std::vector<uint8_t>(dirty[0].data, dirty[0].data + dirty[0].size), a);
    auto b = test::random_bytes(1000, 2), c = test::random_bytes(1000, 3);
    ASSERT_TRUE(dump(cache, "b", b).empty());
    ASSERT_TRUE(dump(cache, "c", c).empty());
    EXPECT_EQ(cache.lookup({"a"})[0], 1) << "a pinned shard was evicted";
    cache.finish_dirty(dirty);
    cache.wait_clean();
}

TEST(MemoryCache, BlockVisibleOnlyWithAllShards) {
    MemoryCache cache({1 << 20, 2, 2, 0});
    auto s0 = test::random_bytes(100, 1), s1 = test::random_bytes(100, 2);
    std::vector<ShardIO> first{test::shard("k", s0, 0)};
    ASSERT_TRUE(cache.dump(std::move(first), false)->wait().empty());
    EXPECT_EQ(cache.lookup({"k"})[0], 0);
    std::vector<ShardIO> second{test::shard("k", s1, 1)};
    ASSERT_TRUE(cache.dump(std::move(second), false)->wait().empty());
    EXPECT_EQ(cache.lookup({"k"})[0], 1);
}

}  // namespace
}  // namespace ucm
