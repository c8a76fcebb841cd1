#pragma once

#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "buffer.h"

namespace ucm::test {

inline std::vector<uint8_t> random_bytes(size_t size, uint32_t seed) {
    std::mt19937 rng(seed);
    std::vector<uint8_t> out(size);
    for (uint8_t& b : out) b = static_cast<uint8_t>(rng());
    return out;
}

inline ShardIO shard(const std::string& id, std::vector<uint8_t>& bytes, uint32_t shard_index = 0) {
    return ShardIO{id, shard_index, {Buffer{bytes.data(), bytes.size()}}};
}

// A fresh directory under the system's temporary directory, removed at the end of the test.
struct TempDir {
    std::filesystem::path path;
    TempDir() {
        std::string pattern = (std::filesystem::temp_directory_path() / "ucm-test-XXXXXX").string();
        path = mkdtemp(pattern.data());
    }
    ~TempDir() { std::filesystem::remove_all(path); }
};

}  // namespace ucm::test
