#include "posix_store.h"

#include <gtest/gtest.h>

#include <fstream>

#include "test_util.h"

namespace ucm {
namespace {

namespace fs = std::filesystem;

fs::path only_file_named(const fs::path& root, const std::string& prefix) {
    for (const auto& entry : fs::recursive_directory_iterator(root / "blocks")) {
        if (entry.path().filename().string().rfind(prefix, 0) == 0) return entry.path();
    }
    return {};
}

TEST(PosixStore, RoundTripAcrossInstances) {
    test::TempDir dir;
    auto bytes = test::random_bytes(100000, 7);
    {
        PosixStore store({dir.path.string()});
        std::vector<ShardIO> items{test::shard("block", bytes)};
        ASSERT_TRUE(store.dump(std::move(items))->wait().empty());
    }
    PosixStore reopened({dir.path.string()});
    EXPECT_EQ(reopened.lookup({"block", "other"}), (std::vector<uint8_t>{1, 0}));
    std::vector<uint8_t> out(bytes.size());
    std::vector<ShardIO> items{test::shard("block", out)};
    ASSERT_TRUE(reopened.load(std::move(items))->wait().empty());
    EXPECT_EQ(out, bytes);
}

TEST(PosixStore, CorruptShardFailsWithItsId) {
    test::TempDir dir;
    PosixStore store({dir.path.string()});
    auto good = test::random_bytes(5000, 1), bad = test::random_bytes(5000, 2);
    std::vector<ShardIO> items{test::shard("good", good), test::shard("bad", bad)};
    ASSERT_TRUE(store.dump(std::move(items))->wait().empty());
    fs::path file = only_file_named(dir.path, "626164");  // hex of "bad"
    ASSERT_FALSE(file.empty());
    {
        std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
        f.seekp(1234);
        f.put(static_cast<char>(bad[1234] ^ 0x10));
    }
    std::vector<uint8_t> out_good(5000), out_bad(5000);
    std::vector<ShardIO> loads{test::shard("good", out_good), test::shard("bad", out_bad)};
    auto failures = store.load(std::move(loads))->wait();
    ASSERT_EQ(failures.size(), 1u);
    EXPECT_EQ(failures[0].id, "bad");
    EXPECT_NE(failures[0].reason.find("checksum"), std::string::npos) << failures[0].reason;
    EXPECT_EQ(out_good, good);
}

TEST(PosixStore, MultiShardBlockVisibleOnceComplete) {
    test::TempDir dir;
    PosixStore store({dir.path.string(), 2});
    auto s0 = test::random_bytes(4096, 1), s1 = test::random_bytes(4096, 2);
    std::vector<ShardIO> first{test::shard("k", s0, 0)};
    ASSERT_TRUE(store.dump(std::move(first))->wait().empty());
    EXPECT_EQ(store.lookup({"k"})[0], 0);
    std::vector<uint8_t> out(4096);
    std::vector<ShardIO> early{test::shard("k", out, 0)};
    EXPECT_EQ(store.load(std::move(early))->wait().size(), 1u);
    std::vector<ShardIO> second{test::shard("k", s1, 1)};
    ASSERT_TRUE(store.dump(std::move(second))->wait().empty());
    EXPECT_EQ(store.lookup({"k"})[0], 1);
    std::vector<ShardIO> late{test::shard("k", out, 1)};
    ASSERT_TRUE(store.load(std::move(late))->wait().empty());
    EXPECT_EQ(out, s1);
}

TEST(PosixStore, CapacityEvictsLeastRecentlyLoaded) {
    test::TempDir dir;
    PosixStore store({dir.path.string(), 1, 2, false, 0});
    std::vector<std::vector<uint8_t>> blocks;
    for (int i = 0; i < 10; ++i) blocks.push_back(test::random_bytes(10000, i));
    for (int i = 0; i < 10; ++i) {
        std::vector<ShardIO> items{test::shard("b" + std::to_string(i), blocks[i])};
        ASSERT_TRUE(store.dump(std::move(items))->wait().empty());
    }
    // Age every file, then load b0 so that it is the most recent.
    for (const auto& entry : fs::recursive_directory_iterator(dir.path / "blocks")) {
        if (entry.is_regular_file()) fs::last_write_time(entry.path(), fs::file_time_type::clock::now() - std::chrono::hours(1));
    }
    std::vector<uint8_t> out(10000);
    std::vector<ShardIO> items{test::shard("b0", out)};
    ASSERT_TRUE(store.load(std::move(items))->wait().empty());
    PosixStore bounded({dir.path.string(), 1, 2, false, 50000});
    bounded.evict_now();
    auto present = bounded.lookup({"b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7", "b8", "b9"});
    EXPECT_EQ(present[0], 1) << "the most recently loaded block was evicted";
    size_t kept = 0;
    for (uint8_t p : present) kept += p;
    EXPECT_LE(kept * (10000 + 128), 45000u);
}

}  // namespace
}  // namespace ucm
