// A paged cache as Python describes it (ucm.store.transfer.PagedGeometry), checked: shared by the
// bindings of the host and the Ascend transfer paths.
#pragma once

#include <pybind11/pybind11.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "paged_copy.h"

namespace ucm_python {

namespace py = pybind11;

struct PagedCache {
    std::vector<ucm::PagedLayer> layers;
    ucm::PagedGeometry geometry;
};

inline PagedCache to_paged_cache(const std::vector<uintptr_t>& keys, const std::vector<uintptr_t>& values,
                          const std::array<int64_t, 4>& key_strides, const std::array<int64_t, 4>& value_strides,
                          size_t elem_bytes, size_t heads, size_t chunk_tokens, size_t head_size,
                          const std::string& packing = "strided", size_t block_tokens = 0) {
    if (keys.size() != values.size() || keys.empty()) throw py::value_error("need one key and one value per layer");
    if (elem_bytes != 1 && elem_bytes != 2 && elem_bytes != 4 && elem_bytes != 8) {
        throw py::value_error("elem_bytes must be 1, 2, 4 or 8, got " + std::to_string(elem_bytes));
    }
    if (heads == 0 || chunk_tokens == 0 || head_size == 0) {
        throw py::value_error("heads, chunk_tokens and head_size must be positive");
    }
    PagedCache cache{{},
                     {{key_strides[0], key_strides[1], key_strides[2], key_strides[3]},
                      {value_strides[0], value_strides[1], value_strides[2], value_strides[3]},
                      heads,
                      chunk_tokens,
                      head_size,
                      elem_bytes}};
    // The page packing named as in ucm.store.transfer.PagedGeometry.
    if (packing == "amx") {
        cache.geometry.packing = ucm::Packing::kAmx;
    } else if (packing != "strided") {
        throw py::value_error("unknown page packing '" + packing + "' (have 'strided' and 'amx')");
    }
    cache.geometry.block_tokens = block_tokens;
    for (size_t i = 0; i < keys.size(); ++i) {
        cache.layers.push_back({reinterpret_cast<uint8_t*>(keys[i]), reinterpret_cast<uint8_t*>(values[i])});
    }
    return cache;
}

}  // namespace ucm_python
