#include "checksum.h"

#include <algorithm>
#include <cstring>

namespace ucm {
namespace {

// Every lane is independent, so the compiler turns the inner loop into wide vector adds;
// one clone per instruction set is picked at load time.
__attribute__((target_clones("avx512f", "avx2", "default"))) void add_stripes(uint64_t* first, uint64_t* second,
                                                                              const uint8_t* data, size_t stripes) {
    uint64_t a[Checksum::kLanes];
    uint64_t b[Checksum::kLanes];
    std::memcpy(a, first, sizeof(a));
    std::memcpy(b, second, sizeof(b));
    for (size_t s = 0; s < stripes; ++s) {
        const uint8_t* stripe = data + s * Checksum::kStripeBytes;
        for (size_t lane = 0; lane < Checksum::kLanes; ++lane) {
            uint64_t word;
            std::memcpy(&word, stripe + lane * sizeof(uint64_t), sizeof(word));
            a[lane] += word;
            b[lane] += a[lane];
        }
    }
    std::memcpy(first, a, sizeof(a));
    std::memcpy(second, b, sizeof(b));
}

inline uint64_t mix(uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

}  // namespace

void Checksum::update(const void* data, size_t size) {
    const uint8_t* bytes = static_cast<const uint8_t*>(data);
    length_ += size;
    if (tail_size_ > 0) {
        size_t take = std::min(size, kStripeBytes - tail_size_);
        std::memcpy(tail_ + tail_size_, bytes, take);
        tail_size_ += take;
        bytes += take;
        size -= take;
        if (tail_size_ < kStripeBytes) return;
        add_stripes(first_, second_, tail_, 1);
        tail_size_ = 0;
    }
    size_t stripes = size / kStripeBytes;
    add_stripes(first_, second_, bytes, stripes);
    bytes += stripes * kStripeBytes;
    size -= stripes * kStripeBytes;
    std::memcpy(tail_, bytes, size);
    tail_size_ = size;
}

uint64_t Checksum::finish() const {
    uint64_t first[kLanes];
    uint64_t second[kLanes];
    std::memcpy(first, first_, sizeof(first));
    std::memcpy(second, second_, sizeof(second));
    if (tail_size_ > 0) {
        uint8_t padded[kStripeBytes] = {};
        std::memcpy(padded, tail_, tail_size_);
        add_stripes(first, second, padded, 1);
    }
    uint64_t h = mix(length_ ^ 0x5543'4d4b'5631'0001ULL);
    for (size_t lane = 0; lane < kLanes; ++lane) {
        h = mix(h ^ first[lane]) + lane;
        h = mix(h ^ second[lane]);
    }
    return h;
}

uint64_t hash_key(const void* data, size_t size) {
    // FNV-1a over the bytes, then a final mix so every output bit depends on every input bit.
    const uint8_t* bytes = static_cast<const uint8_t*>(data);
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < size; ++i) h = (h ^ bytes[i]) * 0x100000001b3ULL;
    return mix(h);
}

}  // namespace ucm
