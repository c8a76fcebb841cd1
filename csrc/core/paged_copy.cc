#include "paged_copy.h"

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace ucm {
namespace {

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }
inline bool aligned32(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 31) == 0; }

#if defined(__SSE2__)
#if defined(__GNUC__) && defined(__x86_64__)
// The same with 32-byte AVX2 streaming stores, for CPUs that have them (picked at run time; the
// library itself is built for the x86-64 baseline). On the 2-core AMD EPYC (Zen 3) of
// docs/benchmarks/connector.md, a store load of 186 MiB of fp32 chunks from the page cache into
// a vLLM-shaped CPU cache took 29-31 ms against 33-34 ms with 16-byte stores (scatter alone: 23-25
// against 28 ms).
__attribute__((target("avx2"))) void stream_copy_avx2(void* dst, const void* src, size_t size) {
    auto* out = static_cast<__m256i*>(dst);
    const auto* in = static_cast<const __m256i*>(src);
    for (size_t i = 0; i < size / 32; ++i) _mm256_stream_si256(out + i, _mm256_loadu_si256(in + i));
}

const bool kStreamAvx2 = __builtin_cpu_supports("avx2");
#endif

// Streaming (non-temporal) copy of `size` bytes, whole 16-byte pieces, to a 16-byte aligned `dst`.
inline void stream_copy(void* dst, const void* src, size_t size) {
#if defined(__GNUC__) && defined(__x86_64__)
    if (kStreamAvx2 && size % 32 == 0 && aligned32(dst)) {
        stream_copy_avx2(dst, src, size);
        return;
    }
#endif
    auto* out = static_cast<__m128i*>(dst);
    const auto* in = static_cast<const __m128i*>(src);
    for (size_t i = 0; i < size / 16; ++i) _mm_stream_si128(out + i, _mm_loadu_si128(in + i));
}
#endif

// Copies into the paged cache. Its lines are written whole and not read again before the next
// forward pass, so streaming (non-temporal) stores skip reading each destination line first and
// leave the CPU cache to the data being copied: a third less memory traffic than a plain copy.
// Callers issue store_fence() before the copied bytes may be read by another thread.
inline void copy_into_cache(void* dst, const void* src, size_t size) {
#if defined(__SSE2__)
    if (size >= 256 && aligned16(dst) && size % 64 == 0) {
        stream_copy(dst, src, size);
        return;
    }
#endif
    std::memcpy(dst, src, size);
}

inline void store_fence() {
#if defined(__SSE2__)
    _mm_sfence();
#endif
}

#if defined(__SSE2__)
// One row of a transposed tile into the cache: streaming stores when it is at least a cache
// line of whole 16-byte pieces on a 16-byte boundary (they fill its lines one after another),
// a plain copy otherwise.
inline void copy_row_into_cache(void* dst, const void* src, size_t size) {
    if (size >= 64 && size % 16 == 0 && aligned16(dst)) {
        stream_copy(dst, src, size);
        return;
    }
    std::memcpy(dst, src, size);
}

// out row d = column d of the 8 x 8 block of 16-bit elements at in (rows `in_stride` apart).
inline void transpose_8x8(const uint16_t* in, int64_t in_stride, uint16_t* out, int64_t out_stride) {
    __m128i r[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i * in_stride));
    __m128i a[8];
    for (int i = 0; i < 4; ++i) {
        a[2 * i] = _mm_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
    }
    // a[0] = (0,0)(1,0)(0,1)(1,1)..(1,3); a[1] the same for columns 4..7; a[2], a[3] rows 2 and 3; ...
    __m128i b[8];
    for (int half = 0; half < 2; ++half) {
        for (int pair = 0; pair < 2; ++pair) {
            __m128i x = a[4 * half + pair];
            __m128i y = a[4 * half + pair + 2];
            b[4 * half + 2 * pair] = _mm_unpacklo_epi32(x, y);
            b[4 * half + 2 * pair + 1] = _mm_unpackhi_epi32(x, y);
        }
    }
    // b[0] = rows 0..3 of columns 0, 1; b[1] columns 2, 3; b[2] columns 4, 5; b[3] columns 6, 7;
    // b[4..7] the same for rows 4..7.
    for (int i = 0; i < 4; ++i) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + (2 * i) * out_stride), _mm_unpacklo_epi64(b[i], b[4 + i]));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + (2 * i + 1) * out_stride),
                         _mm_unpackhi_epi64(b[i], b[4 + i]));
    }
}

// out row d = column d of the 4 x 4 block of 32-bit elements at in (rows `in_stride` apart).
inline void transpose_4x4(const uint32_t* in, int64_t in_stride, uint32_t* out, int64_t out_stride) {
    __m128i r[4];
    for (int i = 0; i < 4; ++i) r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i * in_stride));
    __m128i lo01 = _mm_unpacklo_epi32(r[0], r[1]);  // (0,0)(1,0)(0,1)(1,1)
    __m128i hi01 = _mm_unpackhi_epi32(r[0], r[1]);  // (0,2)(1,2)(0,3)(1,3)
    __m128i lo23 = _mm_unpacklo_epi32(r[2], r[3]);
    __m128i hi23 = _mm_unpackhi_epi32(r[2], r[3]);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_unpacklo_epi64(lo01, lo23));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + out_stride), _mm_unpackhi_epi64(lo01, lo23));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * out_stride), _mm_unpacklo_epi64(hi01, hi23));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 3 * out_stride), _mm_unpackhi_epi64(hi01, hi23));
}

// The square block of one 16-byte vector per row: 8 x 8 for 16-bit elements, 4 x 4 for 32-bit.
template <typename T>
inline void transpose_block(const T* in, int64_t in_stride, T* out, int64_t out_stride) {
    if constexpr (sizeof(T) == 2) {
        transpose_8x8(reinterpret_cast<const uint16_t*>(in), in_stride, reinterpret_cast<uint16_t*>(out), out_stride);
    } else {
        transpose_4x4(reinterpret_cast<const uint32_t*>(in), in_stride, reinterpret_cast<uint32_t*>(out), out_stride);
    }
}
#endif

// Transposed tiles of 16-bit elements (fp16/bf16) in 8 x 8 vector blocks and of 32-bit elements
// (fp32) in 4 x 4 ones; returns false where that does not apply.
//
// Into the cache, a band of 8 (or 4) cache rows (dims) by up to 256 tokens is transposed into a
// small buffer that stays in the L1 cache, and each row of it then goes out in one run of
// streaming stores. Streaming each block straight from the transpose writes 16 bytes into each
// of its rows in turn, so 8 cache lines are being filled at once, each over 4 blocks; on the
// 2-core machine of docs/benchmarks/connector.md that made the scatter into a vLLM-shaped CPU
// cache 3 times slower than this one (93 MiB of bf16 chunks: 21 ms against 7, a plain copy 7).
// fp32 caches (CPUs without native 16-bit float arithmetic) took an element-by-element loop
// before the 4 x 4 blocks.
template <typename T>
bool copy_transposed_fast(bool to_staging, T* cache, int64_t dim_stride, T* tile, size_t tokens, size_t dims) {
#if defined(__SSE2__)
    if constexpr (sizeof(T) == 2 || sizeof(T) == 4) {
        constexpr size_t kLanes = 16 / sizeof(T);
        if (tokens % kLanes != 0 || dims % kLanes != 0) return false;
        int64_t row = static_cast<int64_t>(dims);
        if (to_staging) {
            for (size_t d = 0; d < dims; d += kLanes) {
                for (size_t t = 0; t < tokens; t += kLanes) {
                    transpose_block(cache + d * dim_stride + t, dim_stride, tile + t * dims + d, row);
                }
            }
            return true;
        }
        constexpr size_t kBandTokens = 256;
        alignas(64) T band[kLanes * kBandTokens];
        for (size_t t0 = 0; t0 < tokens; t0 += kBandTokens) {
            size_t width = tokens - t0 < kBandTokens ? tokens - t0 : kBandTokens;
            for (size_t d = 0; d < dims; d += kLanes) {
                for (size_t t = 0; t < width; t += kLanes) {
                    transpose_block(tile + (t0 + t) * dims + d, row, band + t, static_cast<int64_t>(width));
                }
                for (size_t i = 0; i < kLanes; ++i) {
                    copy_row_into_cache(cache + (d + i) * dim_stride + t0, band + i * width, width * sizeof(T));
                }
            }
        }
        return true;
    }
#endif
    (void)to_staging, (void)cache, (void)dim_stride, (void)tile, (void)tokens, (void)dims;
    return false;
}

// Copies one [tokens][dims] tile between the cache (element strides per token and per dim) and
// a contiguous staging tile. Specialised for rows that are contiguous in the cache (a memcpy
// each, or one for the whole tile) and for the transposed case (tokens contiguous).
template <typename T>
void copy_tile(bool to_staging, T* cache, int64_t token_stride, int64_t dim_stride, T* tile, size_t tokens,
               size_t dims) {
    if (dim_stride == 1) {
        if (token_stride == static_cast<int64_t>(dims)) {
            if (to_staging) {
                std::memcpy(tile, cache, tokens * dims * sizeof(T));
            } else {
                copy_into_cache(cache, tile, tokens * dims * sizeof(T));
            }
            return;
        }
        for (size_t t = 0; t < tokens; ++t) {
            T* row = cache + t * token_stride;
            if (to_staging) {
                std::memcpy(tile + t * dims, row, dims * sizeof(T));
            } else {
                copy_into_cache(row, tile + t * dims, dims * sizeof(T));
            }
        }
        return;
    }
    if (token_stride == 1 && copy_transposed_fast(to_staging, cache, dim_stride, tile, tokens, dims)) return;
    // Blocks of 16 x 16 keep both sides of the transpose within a few cache lines.
    constexpr size_t kBlock = 16;
    for (size_t t0 = 0; t0 < tokens; t0 += kBlock) {
        size_t t1 = t0 + kBlock < tokens ? t0 + kBlock : tokens;
        for (size_t d0 = 0; d0 < dims; d0 += kBlock) {
            size_t d1 = d0 + kBlock < dims ? d0 + kBlock : dims;
            for (size_t t = t0; t < t1; ++t) {
                T* row = tile + t * dims;
                T* column = cache + t * token_stride;
                if (to_staging) {
                    for (size_t d = d0; d < d1; ++d) row[d] = column[d * dim_stride];
                } else {
                    for (size_t d = d0; d < d1; ++d) column[d * dim_stride] = row[d];
                }
            }
        }
    }
}

// vLLM's AMX page layout (Packing::kAmx), 16-bit elements. K: each 16-token group is [D/2][16]
// words of two elements (a pair of dims), so the group is a transposed tile of 32-bit words.
template <typename T>
void copy_amx_key(bool to_staging, T* page, size_t token_offset, T* tile, size_t tokens, size_t dims) {
    static_assert(sizeof(T) == 2, "the AMX page layout holds 16-bit elements");
    for (size_t group = 0; group < tokens; group += 16) {
        auto* cache = reinterpret_cast<uint32_t*>(page + (token_offset + group) * dims);
        auto* rows = reinterpret_cast<uint32_t*>(tile + group * dims);
        copy_tile<uint32_t>(to_staging, cache, 1, 16, rows, 16, dims / 2);
    }
}

// V: each 16-dim group holds, per pair of tokens, 16 dims with the two tokens' elements side by
// side (one 64-byte line); the pair's rows of the tile are its even and odd elements.
#if defined(__SSE2__)
// 8 (even, odd) pairs of 16-bit elements at `pair` -> 8 evens and 8 odds.
inline void split_pairs(const void* pair, __m128i* even, __m128i* odd) {
    const auto* in = static_cast<const __m128i*>(pair);
    __m128i x = _mm_loadu_si128(in);      // e0 o0 e1 o1 e2 o2 e3 o3
    __m128i y = _mm_loadu_si128(in + 1);  // e4 o4 ... e7 o7
    // Within each 64-bit half: e e o o; then the 32-bit lanes ordered evens first.
    x = _mm_shuffle_epi32(_mm_shufflehi_epi16(_mm_shufflelo_epi16(x, 0xD8), 0xD8), 0xD8);  // e0-e3 | o0-o3
    y = _mm_shuffle_epi32(_mm_shufflehi_epi16(_mm_shufflelo_epi16(y, 0xD8), 0xD8), 0xD8);  // e4-e7 | o4-o7
    *even = _mm_unpacklo_epi64(x, y);
    *odd = _mm_unpackhi_epi64(x, y);
}
#endif

template <typename T>
void copy_amx_value(bool to_staging, T* page, size_t block_tokens, size_t token_offset, T* tile, size_t tokens,
                    size_t dims) {
    static_assert(sizeof(T) == 2, "the AMX page layout holds 16-bit elements");
    for (size_t first_dim = 0; first_dim < dims; first_dim += 16) {
        T* group = page + first_dim * block_tokens + token_offset * 16;
        for (size_t t = 0; t < tokens; t += 2) {
            T* pair = group + t * 16;
            T* even = tile + t * dims + first_dim;
            T* odd = even + dims;
#if defined(__SSE2__)
            {
                auto* e = reinterpret_cast<__m128i*>(even);
                auto* o = reinterpret_cast<__m128i*>(odd);
                if (to_staging) {
                    __m128i e0, o0, e1, o1;
                    split_pairs(pair, &e0, &o0);
                    split_pairs(pair + 16, &e1, &o1);
                    _mm_storeu_si128(e, e0);
                    _mm_storeu_si128(e + 1, e1);
                    _mm_storeu_si128(o, o0);
                    _mm_storeu_si128(o + 1, o1);
                    continue;
                }
                __m128i e0 = _mm_loadu_si128(e), e1 = _mm_loadu_si128(e + 1);
                __m128i o0 = _mm_loadu_si128(o), o1 = _mm_loadu_si128(o + 1);
                __m128i lines[4] = {_mm_unpacklo_epi16(e0, o0), _mm_unpackhi_epi16(e0, o0),
                                    _mm_unpacklo_epi16(e1, o1), _mm_unpackhi_epi16(e1, o1)};
                // The pair fills one line of the cache: streaming stores when it is aligned.
                auto* out = reinterpret_cast<__m128i*>(pair);
                if (aligned16(pair)) {
                    for (int i = 0; i < 4; ++i) _mm_stream_si128(out + i, lines[i]);
                } else {
                    for (int i = 0; i < 4; ++i) _mm_storeu_si128(out + i, lines[i]);
                }
                continue;
            }
#endif
            if (to_staging) {
                for (size_t d = 0; d < 16; ++d) {
                    even[d] = pair[2 * d];
                    odd[d] = pair[2 * d + 1];
                }
            } else {
                for (size_t d = 0; d < 16; ++d) {
                    pair[2 * d] = even[d];
                    pair[2 * d + 1] = odd[d];
                }
            }
        }
    }
}

// Copies the [chunk_tokens][head_size] tile of one head of K (kv 0) or V (1) of one layer, for
// the chunk at (block, token_offset).
template <typename T>
void copy_head(bool to_staging, const PagedLayer& layer, const PagedGeometry& g, size_t kv, int64_t block,
               int64_t token_offset, size_t head, T* tile) {
    const int64_t* s = kv == 0 ? g.key_strides : g.value_strides;
    T* base = reinterpret_cast<T*>(kv == 0 ? layer.key : layer.value);
    T* page = base + block * s[0] + static_cast<int64_t>(head) * s[1];
    if constexpr (sizeof(T) == 2) {
        if (g.packing == Packing::kAmx) {
            auto offset = static_cast<size_t>(token_offset);
            if (kv == 0) {
                copy_amx_key(to_staging, page, offset, tile, g.chunk_tokens, g.head_size);
            } else {
                copy_amx_value(to_staging, page, g.block_tokens, offset, tile, g.chunk_tokens, g.head_size);
            }
            return;
        }
    }
    copy_tile(to_staging, page + token_offset * s[2], s[2], s[3], tile, g.chunk_tokens, g.head_size);
}

template <typename T>
void scatter_tiles(const std::vector<PagedLayer>& layers, const PagedGeometry& g, int64_t block, int64_t token_offset,
                   size_t first_tile, size_t tiles, const uint8_t* data) {
    size_t tile_elems = g.chunk_tokens * g.head_size;
    for (size_t t = 0; t < tiles; ++t) {
        // Tile i of a chunk in the chunk format is head (i % heads) of K or V ((i / heads) % 2) of
        // layer i / (2 * heads).
        size_t i = first_tile + t;
        T* tile = const_cast<T*>(reinterpret_cast<const T*>(data)) + t * tile_elems;
        copy_head(false, layers[i / g.heads / 2], g, (i / g.heads) % 2, block, token_offset, i % g.heads, tile);
    }
    store_fence();
}

template <typename T>
void copy_all(bool to_staging, const std::vector<PagedLayer>& layers, const PagedGeometry& g,
              const std::vector<int64_t>& blocks, const std::vector<int64_t>& offsets, uint8_t* staging,
              ThreadPool& pool) {
    size_t count = blocks.size();
    size_t tile = g.chunk_tokens * g.head_size;
    size_t items = layers.size() * 2 * count;  // one work item per (layer, K/V, chunk)
    pool.parallel_for(items, pool.size() + 1, [&](size_t begin, size_t end) {
        for (size_t item = begin; item < end; ++item) {
            size_t chunk = item % count;
            size_t kv = (item / count) % 2;
            size_t layer = item / count / 2;
            T* out = reinterpret_cast<T*>(staging) + item * g.heads * tile;
            for (size_t h = 0; h < g.heads; ++h) {
                copy_head(to_staging, layers[layer], g, kv, blocks[chunk], offsets[chunk], h, out + h * tile);
            }
        }
        store_fence();
    });
}

// Calls body(T{}) with the unsigned integer type T of elem_bytes bytes (1, 2, 4 or 8): copies move
// elements as opaque words.
template <typename Body>
void with_element_type(size_t elem_bytes, Body body) {
    switch (elem_bytes) {
        case 1:
            return body(uint8_t{});
        case 2:
            return body(uint16_t{});
        case 4:
            return body(uint32_t{});
        default:
            return body(uint64_t{});
    }
}

}  // namespace

std::string geometry_error(const PagedGeometry& g, const std::vector<int64_t>& token_offsets) {
    if (g.packing != Packing::kAmx) return "";
    if (g.elem_bytes != 2) {
        return "the AMX page layout holds 16-bit elements, got elem_bytes " + std::to_string(g.elem_bytes);
    }
    if (g.chunk_tokens % 16 != 0 || g.head_size % 16 != 0 || g.block_tokens % 16 != 0) {
        return "the AMX page layout needs chunk_tokens, head_size and block_tokens in multiples of 16, got " +
               std::to_string(g.chunk_tokens) + ", " + std::to_string(g.head_size) + " and " +
               std::to_string(g.block_tokens);
    }
    if (g.chunk_tokens > g.block_tokens) {
        return "chunk_tokens " + std::to_string(g.chunk_tokens) + " exceeds block_tokens " +
               std::to_string(g.block_tokens);
    }
    for (int64_t offset : token_offsets) {
        if (offset < 0 || offset % 16 != 0) {
            return "token offset " + std::to_string(offset) + " is not a multiple of 16 (AMX page layout)";
        }
        if (static_cast<size_t>(offset) + g.chunk_tokens > g.block_tokens) {
            return "token offset " + std::to_string(offset) + " + chunk_tokens " + std::to_string(g.chunk_tokens) +
                   " runs past the block's " + std::to_string(g.block_tokens) + " tokens";
        }
    }
    return "";
}

PagedScatter::PagedScatter(std::vector<PagedLayer> layers, const PagedGeometry& geometry, std::vector<int64_t> blocks,
                           std::vector<int64_t> token_offsets)
    : layers_(std::move(layers)),
      geometry_(geometry),
      blocks_(std::move(blocks)),
      token_offsets_(std::move(token_offsets)),
      tile_bytes_(geometry.chunk_tokens * geometry.head_size * geometry.elem_bytes) {
    if (layers_.empty()) throw std::invalid_argument("need one key and one value per layer");
    if (blocks_.size() != token_offsets_.size()) {
        throw std::invalid_argument("blocks and token_offsets differ in length (" + std::to_string(blocks_.size()) +
                                    " and " + std::to_string(token_offsets_.size()) + ")");
    }
    if (tile_bytes_ == 0 || geometry_.heads == 0) throw std::invalid_argument("empty chunk geometry");
    std::string error = geometry_error(geometry_, token_offsets_);
    if (!error.empty()) throw std::invalid_argument(error);
}

void PagedScatter::consume(size_t item, size_t offset, const uint8_t* data, size_t size) {
    size_t first = offset / tile_bytes_;
    size_t tiles = size / tile_bytes_;
    int64_t block = blocks_[item];
    int64_t token_offset = token_offsets_[item];
    with_element_type(geometry_.elem_bytes, [&](auto type) {
        scatter_tiles<decltype(type)>(layers_, geometry_, block, token_offset, first, tiles, data);
    });
}

void copy_chunks(bool to_staging, const std::vector<PagedLayer>& layers, const PagedGeometry& geometry,
                 const std::vector<int64_t>& blocks, const std::vector<int64_t>& token_offsets, uint8_t* staging,
                 ThreadPool& pool) {
    std::string error = geometry_error(geometry, token_offsets);
    if (!error.empty()) throw std::invalid_argument(error);
    with_element_type(geometry.elem_bytes, [&](auto type) {
        copy_all<decltype(type)>(to_staging, layers, geometry, blocks, token_offsets, staging, pool);
    });
}

}  // namespace ucm
