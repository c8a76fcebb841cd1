// The CUDA transfer path: chunks between a paged KV cache in device memory and pinned host
// memory in the chunk format (docs/format.md), converting the page layout in the same pass.
//
// One kernel moves every row (one token of one head: head_size elements, contiguous on both
// sides) of every chunk of a layer range. The host side is read or written directly over the
// bus (pinned memory is mapped into the device's address space), so no device staging memory
// is used and one launch replaces a copy per page.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace ucm::cuda {

struct DeviceLayer {
    uint8_t* key;    // element [0, 0, 0, 0] of K viewed as [blocks, heads, block_tokens, head_size]
    uint8_t* value;  // the same for V; null for a single-plane cache (MLA's latent)
};

struct DeviceGeometry {
    int64_t key_strides[4];  // element strides: block, head, token, dim (dim must be 1)
    int64_t value_strides[4];
    size_t heads;
    size_t chunk_tokens;
    size_t head_size;
    size_t elem_bytes;
    size_t planes;  // 2 (K and V) or 1 (MLA)
};

// Moves chunks of layers [layer_begin, layer_end) between the device cache and `host`, a pinned
// buffer holding [layers][planes][count][heads][chunk_tokens][head_size] for *all* layers (the
// layer range selects a slice of it). Chunk i is tokens [token_offsets[i], + chunk_tokens) of
// block blocks[i]. Enqueued on `stream`; returns at once. `max_blocks` caps the thread blocks
// (0: enough to fill the device), which leaves room for compute running beside it.
// Returns an error text, empty on success.
std::string copy_chunks(bool to_host, const std::vector<DeviceLayer>& layers, const DeviceGeometry& geometry,
                        const std::vector<int64_t>& blocks, const std::vector<int64_t>& token_offsets, uint8_t* host,
                        size_t layer_begin, size_t layer_end, cudaStream_t stream, unsigned max_blocks);

}  // namespace ucm::cuda
