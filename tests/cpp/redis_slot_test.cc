// Redis Cluster hash slots, as the redis store routes keys: values from the cluster specification
// and from redis-cli's CLUSTER KEYSLOT on the same keys.
#include <gtest/gtest.h>

#include <string>

#include "redis_store.h"

namespace {

TEST(RedisClusterSlot, MatchesTheServersSlots) {
    EXPECT_EQ(ucm::redis_cluster_slot("foo"), 12182);
    EXPECT_EQ(ucm::redis_cluster_slot("123456789"), 0x31C3 % 16384);  // the CRC16/XMODEM check value
    EXPECT_EQ(ucm::redis_cluster_slot(""), 0);
}

TEST(RedisClusterSlot, HashesOnlyANonEmptyHashTag) {
    EXPECT_EQ(ucm::redis_cluster_slot("{user1000}.following"), ucm::redis_cluster_slot("user1000"));
    EXPECT_EQ(ucm::redis_cluster_slot("{user1000}.followers"), ucm::redis_cluster_slot("user1000"));
    // An empty tag, or no closing brace: the whole key is hashed.
    EXPECT_EQ(ucm::redis_cluster_slot("foo{}{bar}"), ucm::redis_cluster_slot(std::string("foo{}{bar}")));
    EXPECT_NE(ucm::redis_cluster_slot("foo{}{bar}"), ucm::redis_cluster_slot("bar"));
    EXPECT_EQ(ucm::redis_cluster_slot("foo{{bar}}zap"), ucm::redis_cluster_slot("{bar"));
    EXPECT_EQ(ucm::redis_cluster_slot("foo{bar}{zap}"), ucm::redis_cluster_slot("bar"));
    // Binary keys (ids are raw hash bytes) hash byte for byte.
    std::string binary("ucm:\x00\xff{\x01}", 9);
    EXPECT_EQ(ucm::redis_cluster_slot(binary), ucm::redis_cluster_slot(std::string("\x01", 1)));
}

}  // namespace
