// Plain descriptions of the bytes a transfer moves. No ownership: the caller keeps
// the memory alive until the task that uses it has finished.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace ucm {

struct Buffer {
    uint8_t* data = nullptr;
    size_t size = 0;
};

class ChunkSink;

// One shard of one block, gathered from (dump) or scattered into (load) `buffers` in order.
// A load may instead hand the shard's `sink_bytes` bytes to `sink`, as its item `sink_item`.
struct ShardIO {
    std::string id;
    uint32_t shard = 0;
    std::vector<Buffer> buffers;
    ChunkSink* sink = nullptr;  // not owned: the caller keeps it alive until the task has finished
    size_t sink_item = 0;
    size_t sink_bytes = 0;

    size_t total_bytes() const {
        if (sink != nullptr) return sink_bytes;
        size_t total = 0;
        for (const Buffer& b : buffers) total += b.size;
        return total;
    }
};

// Why one block of a task failed.
struct Failure {
    std::string id;
    std::string reason;
};

constexpr size_t kMaxIdBytes = 64;

}  // namespace ucm
