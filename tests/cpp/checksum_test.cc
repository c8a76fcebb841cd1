#include "checksum.h"

#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "block_format.h"
#include "test_util.h"

namespace ucm {
namespace {

TEST(Checksum, IncrementalEqualsOneShotAtEverySplit) {
    auto bytes = test::random_bytes(3000, 1);
    uint64_t whole = Checksum::of(bytes.data(), bytes.size());
    for (size_t split : {0, 1, 7, 255, 256, 257, 1000, 2999, 3000}) {
        Checksum c;
        c.update(bytes.data(), split);
        c.update(bytes.data() + split, bytes.size() - split);
        EXPECT_EQ(c.finish(), whole) << "split at " << split;
    }
}

// The checksum as checksum.h defines it, one word at a time: stored shards written by any build
// (vectorized or not, on any CPU) must verify on every other.
uint64_t mix(uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

uint64_t reference_checksum(const std::vector<uint8_t>& bytes) {
    constexpr size_t kLanes = Checksum::kLanes;
    std::vector<uint8_t> padded(bytes);
    padded.resize((bytes.size() + Checksum::kStripeBytes - 1) / Checksum::kStripeBytes * Checksum::kStripeBytes, 0);
    uint64_t first[kLanes] = {};
    uint64_t second[kLanes] = {};
    for (size_t w = 0; w < padded.size() / 8; ++w) {
        uint64_t word;
        std::memcpy(&word, padded.data() + 8 * w, 8);
        first[w % kLanes] += word;
        second[w % kLanes] += first[w % kLanes];
    }
    uint64_t h = mix(static_cast<uint64_t>(bytes.size()) ^ 0x5543'4d4b'5631'0001ULL);
    for (size_t lane = 0; lane < kLanes; ++lane) {
        h = mix(h ^ first[lane]) + lane;
        h = mix(h ^ second[lane]);
    }
    return h;
}

TEST(Checksum, EqualsTheDefinitionAtEverySize) {
    for (size_t size : {0, 1, 8, 255, 256, 257, 4096, 100000, 262144 + 24}) {
        auto bytes = test::random_bytes(size, static_cast<uint32_t>(size) + 11);
        EXPECT_EQ(Checksum::of(bytes.data(), bytes.size()), reference_checksum(bytes)) << size << " bytes";
    }
}

TEST(Checksum, IsTheValueStoredShardsCarry) {
    // Pinned: a change here means shards already on disk would no longer verify.
    auto bytes = test::random_bytes(100000, 7);
    EXPECT_EQ(Checksum::of(bytes.data(), bytes.size()), 0x5c72a5a1bc8e5738ULL);
}

TEST(Checksum, EverySingleByteFlipChangesIt) {
    auto bytes = test::random_bytes(4096 + 77, 2);
    uint64_t original = Checksum::of(bytes.data(), bytes.size());
    for (size_t i = 0; i < bytes.size(); ++i) {
        bytes[i] ^= 0x01;
        ASSERT_NE(Checksum::of(bytes.data(), bytes.size()), original) << "flip at " << i;
        bytes[i] ^= 0x01;
    }
}

TEST(Checksum, SwappedWordsAndTrailingZerosChangeIt) {
    auto bytes = test::random_bytes(8192, 3);
    uint64_t original = Checksum::of(bytes.data(), bytes.size());
    auto swapped = bytes;
    std::swap_ranges(swapped.begin(), swapped.begin() + 8, swapped.begin() + 256 * 3);
    EXPECT_NE(Checksum::of(swapped.data(), swapped.size()), original);
    auto longer = bytes;
    longer.push_back(0);
    EXPECT_NE(Checksum::of(longer.data(), longer.size()), original);
}

TEST(BlockFormat, TrailerRoundTripsAndRejectsDamage) {
    Trailer t;
    t.payload_bytes = 123456;
    t.checksum = 0xdeadbeef;
    t.shard = 3;
    t.num_shards = 4;
    t.id = std::string("\x00\x01key", 5);
    uint8_t raw[kTrailerBytes];
    encode_trailer(t, raw);
    Trailer back;
    ASSERT_EQ(decode_trailer(raw, &back), "");
    EXPECT_EQ(back.payload_bytes, t.payload_bytes);
    EXPECT_EQ(back.checksum, t.checksum);
    EXPECT_EQ(back.shard, 3u);
    EXPECT_EQ(back.num_shards, 4u);
    EXPECT_EQ(back.id, t.id);
    raw[20] ^= 0x40;
    EXPECT_EQ(decode_trailer(raw, &back), "shard trailer is corrupt");
}

}  // namespace
}  // namespace ucm
