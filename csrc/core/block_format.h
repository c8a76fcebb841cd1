// The on-disk form of one stored shard: its payload bytes, then a 128-byte trailer.
//
//   offset 0            payload (the shard's bytes, exactly as dumped)
//   offset payload      trailer (little-endian):
//     0   u64  magic "UCMSHARD"
//     8   u32  format version (1)
//     12  u32  flags (0)
//     16  u64  payload bytes
//     24  u64  payload checksum (see checksum.h)
//     32  u32  shard index
//     36  u32  number of shards of the block
//     40  u32  id length (1..64)
//     44  u32  reserved (0)
//     48  u8[64] id, zero padded
//     112 u64  reserved (0)
//     120 u64  checksum of trailer bytes 0..119
//   (files written with O_DIRECT are zero padded after the trailer to a multiple of 4096 bytes)
//
// Keeping the trailer after the payload lets one vectored read fill the caller's buffers and the
// trailer together, and keeps the payload aligned for direct I/O.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace ucm {

constexpr size_t kTrailerBytes = 128;
constexpr uint32_t kFormatVersion = 1;

struct Trailer {
    uint64_t payload_bytes = 0;
    uint64_t checksum = 0;
    uint32_t shard = 0;
    uint32_t num_shards = 1;
    std::string id;
};

void encode_trailer(const Trailer& trailer, uint8_t out[kTrailerBytes]);

// Parses and checks the trailer's own integrity; returns an empty string on success, else why not.
std::string decode_trailer(const uint8_t in[kTrailerBytes], Trailer* trailer);

// Every store's message for a shard whose stored size is not what the caller's buffers hold;
// it starts with kSizeMismatchPrefix (a caller's mistake, not damage to the stored bytes).
extern const char kSizeMismatchPrefix[];
std::string size_mismatch(uint64_t stored_bytes, uint64_t buffer_bytes);

// Checks a decoded trailer against the shard a load asked for (id, shard, num_shards, size) and
// the checksum of the bytes read; returns an empty string when they match, else why not.
std::string verify_trailer(const Trailer& trailer, const std::string& id, uint32_t shard, uint32_t num_shards,
                           uint64_t payload_bytes, uint64_t checksum);

}  // namespace ucm
