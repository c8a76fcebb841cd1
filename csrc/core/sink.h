// A destination a load can hand a shard's bytes to, instead of copying them into caller buffers:
// the paged-cache scatter of the transfer path is one. The store reads each shard in pieces
// into a small per-thread buffer and passes every piece on while it is still in the CPU cache,
// so the bytes cross memory once.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ucm {

class ChunkSink {
public:
    virtual ~ChunkSink() = default;

    // Pieces handed to consume() start at multiples of this and are multiples of it in size.
    virtual size_t granule() const = 0;

    // Bytes [offset, offset + size) of item `item`'s shard. Called from store threads, several
    // items at once but each item's pieces in order from one thread. The pieces may arrive
    // before the shard's checksum is verified: when the load reports the item as failed, what
    // it consumed is garbage and the caller must not use it.
    virtual void consume(size_t item, size_t offset, const uint8_t* data, size_t size) = 0;
};

// The size of the pieces a store hands to `sink`: about `target` bytes, a multiple of its granule.
inline size_t sink_piece_bytes(const ChunkSink& sink, size_t target) {
    size_t granule = sink.granule();
    return target > granule ? target / granule * granule : granule;
}

}  // namespace ucm
