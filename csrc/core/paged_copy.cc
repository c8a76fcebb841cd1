#include "paged_copy.h"

#include <cstring>

namespace ucm {
namespace {

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
                std::memcpy(cache, tile, tokens * dims * sizeof(T));
            }
            return;
        }
        for (size_t t = 0; t < tokens; ++t) {
            T* row = cache + t * token_stride;
            if (to_staging) {
                std::memcpy(tile + t * dims, row, dims * sizeof(T));
            } else {
                std::memcpy(row, tile + t * dims, dims * sizeof(T));
            }
        }
        return;
    }
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
            const int64_t* s = kv == 0 ? g.key_strides : g.value_strides;
            T* base = reinterpret_cast<T*>(kv == 0 ? layers[layer].key : layers[layer].value);
            T* cache = base + blocks[chunk] * s[0] + offsets[chunk] * s[2];
            T* out = reinterpret_cast<T*>(staging) + item * g.heads * tile;
            for (size_t h = 0; h < g.heads; ++h) {
                copy_tile(to_staging, cache + h * s[1], s[2], s[3], out + h * tile, g.chunk_tokens, g.head_size);
            }
        }
    });
}

}  // namespace

void copy_chunks(bool to_staging, const std::vector<PagedLayer>& layers, const PagedGeometry& geometry,
                 const std::vector<int64_t>& blocks, const std::vector<int64_t>& token_offsets, uint8_t* staging,
                 ThreadPool& pool) {
    switch (geometry.elem_bytes) {
        case 1:
            return copy_all<uint8_t>(to_staging, layers, geometry, blocks, token_offsets, staging, pool);
        case 2:
            return copy_all<uint16_t>(to_staging, layers, geometry, blocks, token_offsets, staging, pool);
        case 4:
            return copy_all<uint32_t>(to_staging, layers, geometry, blocks, token_offsets, staging, pool);
        default:
            return copy_all<uint64_t>(to_staging, layers, geometry, blocks, token_offsets, staging, pool);
    }
}

}  // namespace ucm
