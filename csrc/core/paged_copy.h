// The host transfer path: copies KV chunks between a paged cache in host memory and a staging
// buffer in the chunk format (docs/format.md), converting the page layout in the same pass.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "sink.h"
#include "thread_pool.h"

namespace ucm {

// One layer's K and V as strided views [blocks, heads, block_tokens, head_size]: the address of
// element [0, 0, 0, 0] and the element strides of the four dimensions.
struct PagedLayer {
    uint8_t* key;
    uint8_t* value;
};

// How the tokens and dims of one (block, head) page of N tokens and D dims are laid out.
enum class Packing {
    // Element strides: token and dim strides of key_strides / value_strides ([2] and [3]).
    kStrided,
    // vLLM's CPU pages for AMX tiles (bf16; N and D multiples of 16). K is [N/16][D/2][16][2]: per
    // 16-token group, pairs of dims token by token. V is [D/16][N/2][16][2]: per 16-dim group,
    // pairs of tokens dim by dim. Pages start at block * strides[0] + head * strides[1].
    kAmx,
};

struct PagedGeometry {
    int64_t key_strides[4];
    int64_t value_strides[4];
    size_t heads;
    size_t chunk_tokens;
    size_t head_size;
    size_t elem_bytes;  // 1, 2, 4 or 8
    Packing packing = Packing::kStrided;
    size_t block_tokens = 0;  // N: needed by kAmx (its V groups are 16 * N elements apart)
};

// Why chunks at `token_offsets` cannot be copied with `geometry` (its packing's conditions), or ""
// when they can. copy_chunks and PagedScatter throw std::invalid_argument with it.
std::string geometry_error(const PagedGeometry& geometry, const std::vector<int64_t>& token_offsets);

// Chunk i is tokens [token_offsets[i], + chunk_tokens) of cache block blocks[i]. The staging
// buffer is [layers][2: K, V][count][heads][chunk_tokens][head_size], C-contiguous.
// `to_staging` gathers from the cache; otherwise the staging buffer is scattered into it.
void copy_chunks(bool to_staging, const std::vector<PagedLayer>& layers, const PagedGeometry& geometry,
                 const std::vector<int64_t>& blocks, const std::vector<int64_t>& token_offsets, uint8_t* staging,
                 ThreadPool& pool);

// Scatters loaded chunks straight into the cache, as a store's sink: item i is the chunk that
// goes to tokens [token_offsets[i], + chunk_tokens) of block blocks[i]. Its bytes arrive in the
// chunk format, one head's [chunk_tokens][head_size] tile (the granule) after another.
class PagedScatter final : public ChunkSink {
public:
    // Throws std::invalid_argument when the geometry or the lists are inconsistent.
    PagedScatter(std::vector<PagedLayer> layers, const PagedGeometry& geometry, std::vector<int64_t> blocks,
                 std::vector<int64_t> token_offsets);

    size_t granule() const override { return tile_bytes_; }
    size_t chunk_bytes() const { return tile_bytes_ * geometry_.heads * 2 * layers_.size(); }
    size_t count() const { return blocks_.size(); }
    void consume(size_t item, size_t offset, const uint8_t* data, size_t size) override;

private:
    std::vector<PagedLayer> layers_;
    PagedGeometry geometry_;
    std::vector<int64_t> blocks_;
    std::vector<int64_t> token_offsets_;
    size_t tile_bytes_;
};

}  // namespace ucm
