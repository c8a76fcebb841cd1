// The block checksum: a 64-bit sum over 32 lanes of 64-bit words, with a running second-order
// sum per lane (so reordered words change it too), finished by mixing every lane and the length.
// It is built to detect accidental corruption (flipped bits, torn or truncated writes, misplaced
// pages) at memory speed; it is not a defence against deliberate tampering.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ucm {

class Checksum {
public:
    static constexpr size_t kLanes = 32;
    static constexpr size_t kStripeBytes = kLanes * sizeof(uint64_t);

    void update(const void* data, size_t size);
    uint64_t finish() const;

    static uint64_t of(const void* data, size_t size) {
        Checksum c;
        c.update(data, size);
        return c.finish();
    }

private:
    uint64_t first_[kLanes] = {};
    uint64_t second_[kLanes] = {};
    uint8_t tail_[kStripeBytes] = {};
    size_t tail_size_ = 0;
    uint64_t length_ = 0;
};

// A small, fast 64-bit hash of a short key (used to spread ids over directories).
uint64_t hash_key(const void* data, size_t size);

}  // namespace ucm
