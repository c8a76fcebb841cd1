#include "checksum.h"

#include <algorithm>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

namespace ucm {
namespace {

// The portable form. Compilers keep its 64 running sums in memory rather than in registers, even
// when they vectorize it (GCC's AVX2 and AVX-512 builds of it did), which held the checksum to
// 23-30 GB/s from the L2 cache on the machine of docs/benchmarks/connector.md.
void add_stripes_portable(uint64_t* first, uint64_t* second, const uint8_t* data, size_t stripes) {
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

#if defined(__GNUC__) && defined(__x86_64__)
// The same sums with AVX2, all 64 of them in the 16 vector registers (four 64-bit lanes each;
// the loops are unrolled so that the arrays become registers, and the stripe's words are added
// straight from memory): 61-84 GB/s from the L2 cache on that machine, and 9.8-10.3 GB/s from
// memory against 6.5.
__attribute__((target("avx2"))) void add_stripes_avx2(uint64_t* first, uint64_t* second, const uint8_t* data,
                                                      size_t stripes) {
    constexpr int kVectors = Checksum::kLanes / 4;  // 8 registers of running sums, 8 of sums of sums
    __m256i a[kVectors];
    __m256i b[kVectors];
#pragma GCC unroll 8
    for (int i = 0; i < kVectors; ++i) {
        a[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(first) + i);
        b[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(second) + i);
    }
    for (size_t s = 0; s < stripes; ++s) {
        const auto* words = reinterpret_cast<const __m256i*>(data + s * Checksum::kStripeBytes);
#pragma GCC unroll 8
        for (int i = 0; i < kVectors; ++i) {
            a[i] = _mm256_add_epi64(a[i], _mm256_loadu_si256(words + i));
            b[i] = _mm256_add_epi64(b[i], a[i]);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < kVectors; ++i) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(first) + i, a[i]);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(second) + i, b[i]);
    }
}

const bool kChecksumAvx2 = __builtin_cpu_supports("avx2");
#endif

void add_stripes(uint64_t* first, uint64_t* second, const uint8_t* data, size_t stripes) {
#if defined(__GNUC__) && defined(__x86_64__)
    if (kChecksumAvx2) {
        add_stripes_avx2(first, second, data, stripes);
        return;
    }
#endif
    add_stripes_portable(first, second, data, stripes);
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
