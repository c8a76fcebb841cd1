// The shared tier's slot protocol under threads: readers racing a writer that keeps replacing a
// shard get one version whole or a failed read, never a mix.
#include "shared_tier.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "checksum.h"
#include "test_util.h"

namespace ucm {
namespace {

TEST(SharedTier, ReadersRacingAWriterGetOneVersionWholeOrAFailure) {
    test::TempDir dir;
    const size_t size = 1 << 20;
    std::vector<uint8_t> versions[2] = {test::random_bytes(size, 1), test::random_bytes(size, 2)};
    uint64_t sums[2] = {Checksum::of(versions[0].data(), size), Checksum::of(versions[1].data(), size)};
    FileIdentity file{42, 7};
    SharedTier tier(dir.path.string(), "race", 8 * size);
    tier.write("block", 0, {Buffer{versions[0].data(), size}}, sums[0], file);

    std::atomic<bool> stop{false};
    std::thread writer([&] {
        for (int i = 1; !stop.load(); ++i) {
            tier.write("block", 0, {Buffer{versions[i % 2].data(), size}}, sums[i % 2], file);
            std::this_thread::sleep_for(std::chrono::microseconds(200));  // as saves come, not back to back
        }
    });
    std::atomic<int> hits{0}, failed{0}, mixed{0};
    auto reader = [&] {
        std::vector<uint8_t> out(size);
        auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(300);
        while (std::chrono::steady_clock::now() < end) {
            ShardIO item{"block", 0, {Buffer{out.data(), size}}};
            SharedTier::Read result = tier.read(item, file);
            if (result == SharedTier::Read::kHit) {
                hits += 1;
                if (out != versions[0] && out != versions[1]) mixed += 1;
            } else if (result == SharedTier::Read::kFailed) {
                failed += 1;
            }
        }
    };
    std::thread r1(reader), r2(reader);
    r1.join();
    r2.join();
    stop.store(true);
    writer.join();
    EXPECT_EQ(mixed.load(), 0) << hits.load() << " hits, " << failed.load() << " overlapped a write";
    EXPECT_GT(hits.load(), 0);
}

TEST(SharedTier, ACopyOfAnotherFileOrSizeIsNotServed) {
    test::TempDir dir;
    std::vector<uint8_t> bytes = test::random_bytes(10000, 3);
    SharedTier tier(dir.path.string(), "identity", 1 << 20);
    tier.write("block", 1, {Buffer{bytes.data(), bytes.size()}}, Checksum::of(bytes.data(), bytes.size()),
               {5, 9});
    std::vector<uint8_t> out(bytes.size());
    ShardIO item{"block", 1, {Buffer{out.data(), out.size()}}};
    EXPECT_EQ(tier.read(item, {5, 9}), SharedTier::Read::kHit);
    EXPECT_EQ(out, bytes);
    EXPECT_EQ(tier.read(item, {5, 10}), SharedTier::Read::kStale);
    ShardIO other_shard{"block", 0, {Buffer{out.data(), out.size()}}};
    EXPECT_EQ(tier.read(other_shard, {5, 9}), SharedTier::Read::kMiss);
    std::vector<uint8_t> longer(bytes.size() + 1);
    ShardIO other_size{"block", 1, {Buffer{longer.data(), longer.size()}}};
    EXPECT_EQ(tier.read(other_size, {5, 9}), SharedTier::Read::kMiss);
    tier.invalidate("block", 2);
    EXPECT_EQ(tier.read(item, {5, 9}), SharedTier::Read::kMiss);
}

}  // namespace
}  // namespace ucm
