// The CUDA transfer path: chunks between a paged KV cache in device memory and pinned host
// memory in the chunk format (docs/format.md), converting the page layout in the same pass.
//
// A kernel moves every row (one token of one head: head_size elements, contiguous on both sides)
// of every chunk of a layer range, converting the page layout; the bytes cross the bus either
// through the copy engines (by way of a small ring of device slots) or from the kernel itself.
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

// How the bytes cross the bus. kCopyEngine: a kernel resident on a few SMs converts pages into a
// ring of device slots (64 MiB in all, per device) and the copy engines move the slots (full bus
// bandwidth, and no SM ever writes to host memory). kKernel: one kernel reads or writes the pinned
// host memory directly (no device memory at all).
enum class Way { kCopyEngine, kKernel };

// Moves chunks of layers [layer_begin, layer_end) between the device cache and `host`, a pinned
// buffer holding [layers][planes][count][heads][chunk_tokens][head_size] for *all* layers (the
// layer range selects a slice of it). Chunk i is tokens [token_offsets[i], + chunk_tokens) of
// block blocks[i]. Enqueued on `stream` (the copy out of the cache runs after the work already
// there; `stream` is done when the bytes are); returns at once. `max_blocks` caps the thread
// blocks of the kernel (0: 8 for the ring, at most one per SM; enough to fill the device for kKernel).
// Returns an error text, empty on success.
std::string copy_chunks(bool to_host, const std::vector<DeviceLayer>& layers, const DeviceGeometry& geometry,
                        const std::vector<int64_t>& blocks, const std::vector<int64_t>& token_offsets, uint8_t* host,
                        size_t layer_begin, size_t layer_end, cudaStream_t stream, unsigned max_blocks,
                        Way way = Way::kCopyEngine);

}  // namespace ucm::cuda
