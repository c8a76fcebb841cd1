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

// One shard of one block, gathered from (dump) or scattered into (load) `buffers` in order.
struct ShardIO {
    std::string id;
    uint32_t shard = 0;
    std::vector<Buffer> buffers;

    size_t total_bytes() const {
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
