#include "checksum.h"

#include <gtest/gtest.h>

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
