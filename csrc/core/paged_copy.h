// The host transfer path: copies KV chunks between a paged cache in host memory and a staging
// buffer in the chunk format (docs/format.md), converting the page layout in the same pass.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "thread_pool.h"

namespace ucm {

// One layer's K and V as strided views [blocks, heads, block_tokens, head_size]: the address of
// element [0, 0, 0, 0] and the element strides of the four dimensions.
struct PagedLayer {
    uint8_t* key;
    uint8_t* value;
};

struct PagedGeometry {
    int64_t key_strides[4];
    int64_t value_strides[4];
    size_t heads;
    size_t chunk_tokens;
    size_t head_size;
    size_t elem_bytes;  // 1, 2, 4 or 8
};

// Chunk i is tokens [token_offsets[i], + chunk_tokens) of cache block blocks[i]. The staging
// buffer is [layers][2: K, V][count][heads][chunk_tokens][head_size], C-contiguous.
// `to_staging` gathers from the cache; otherwise the staging buffer is scattered into it.
void copy_chunks(bool to_staging, const std::vector<PagedLayer>& layers, const PagedGeometry& geometry,
                 const std::vector<int64_t>& blocks, const std::vector<int64_t>& token_offsets, uint8_t* staging,
                 ThreadPool& pool);

}  // namespace ucm
