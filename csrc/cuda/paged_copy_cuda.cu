#include "paged_copy_cuda.h"

#include <algorithm>
#include <cstdint>
#include <numeric>

namespace ucm::cuda {
namespace {

constexpr unsigned kThreads = 512;
constexpr unsigned kUnroll = 8;  // accesses in flight per thread: reads over the bus need many

struct Params {
    const int64_t* blocks;     // device: per chunk
    const int64_t* offsets;    // device: per chunk, first token within the block
    const uint64_t* planes;    // device: per (layer in range, plane), address of element [0, 0, 0, 0]
    int64_t strides[2][4];     // bytes, per plane: block, head, token
    uint8_t* host;             // the first row of the layer range
    uint64_t count, heads, tokens, row_units, planes_per_layer, total_units;
};

// Unit i of the layer range is unit (i % row_units) of row (i / row_units); rows run in the chunk
// format's order: [layer][plane][chunk][head][token]. Index is 32-bit whenever the range allows:
// the decomposition is most of the kernel's arithmetic, and 64-bit division is many times slower.
template <typename Unit, bool ToHost, typename Index>
__global__ void __launch_bounds__(kThreads) copy_rows(Params p) {
    const Index total = static_cast<Index>(p.total_units);
    const Index row_units = static_cast<Index>(p.row_units);
    const Index tokens = static_cast<Index>(p.tokens);
    const Index heads = static_cast<Index>(p.heads);
    const Index count = static_cast<Index>(p.count);
    const Index planes = static_cast<Index>(p.planes_per_layer);
    const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
    for (Index first = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; first < total;
         first += stride * kUnroll) {
        Unit data[kUnroll];
        Unit* to[kUnroll];
#pragma unroll
        for (unsigned k = 0; k < kUnroll; ++k) {
            Index i = first + k * stride;
            to[k] = nullptr;
            if (i >= total || i < first) continue;  // past the end (or wrapped around)
            Index unit = i % row_units;
            Index row = i / row_units;
            Index token = row % tokens;
            Index rest = row / tokens;
            Index head = rest % heads;
            rest /= heads;
            Index chunk = rest % count;
            rest /= count;
            Index plane = rest % planes;
            const int64_t* s = p.strides[plane];
            int64_t offset = p.blocks[chunk] * s[0] + static_cast<int64_t>(head) * s[1] +
                             (p.offsets[chunk] + static_cast<int64_t>(token)) * s[2];
            Unit* device = reinterpret_cast<Unit*>(reinterpret_cast<uint8_t*>(p.planes[rest]) + offset) + unit;
            Unit* host = reinterpret_cast<Unit*>(p.host) + static_cast<uint64_t>(i);
            data[k] = ToHost ? *device : *host;
            to[k] = ToHost ? host : device;
        }
#pragma unroll
        for (unsigned k = 0; k < kUnroll; ++k) {
            if (to[k] != nullptr) *to[k] = data[k];
        }
    }
}

template <typename Unit, typename Index>
void launch_indexed(bool to_host, const Params& p, unsigned grid, cudaStream_t stream) {
    if (to_host) {
        copy_rows<Unit, true, Index><<<grid, kThreads, 0, stream>>>(p);
    } else {
        copy_rows<Unit, false, Index><<<grid, kThreads, 0, stream>>>(p);
    }
}

template <typename Unit>
cudaError_t launch(bool to_host, const Params& p, unsigned grid, cudaStream_t stream) {
    // 32-bit indices while the last index a thread may form still fits.
    uint64_t reach = p.total_units + static_cast<uint64_t>(grid) * kThreads * kUnroll;
    if (reach < (uint64_t{1} << 32)) {
        launch_indexed<Unit, uint32_t>(to_host, p, grid, stream);
    } else {
        launch_indexed<Unit, uint64_t>(to_host, p, grid, stream);
    }
    return cudaGetLastError();
}

std::string cuda_error(const char* what, cudaError_t err) {
    return std::string(what) + ": " + cudaGetErrorString(err);
}

}  // namespace

std::string copy_chunks(bool to_host, const std::vector<DeviceLayer>& layers, const DeviceGeometry& g,
                        const std::vector<int64_t>& blocks, const std::vector<int64_t>& token_offsets, uint8_t* host,
                        size_t layer_begin, size_t layer_end, cudaStream_t stream, unsigned max_blocks) {
    if (g.planes != 1 && g.planes != 2) return "planes must be 1 or 2";
    if (blocks.size() != token_offsets.size()) return "blocks and token_offsets differ in length";
    if (layer_begin > layer_end || layer_end > layers.size()) return "layer range outside the cache's layers";
    if (g.key_strides[3] != 1 || (g.planes == 2 && g.value_strides[3] != 1)) {
        return "the head dimension must be contiguous in the device cache";
    }
    size_t count = blocks.size();
    size_t layer_count = layer_end - layer_begin;
    size_t row_bytes = g.head_size * g.elem_bytes;
    if (count == 0 || layer_count == 0) return {};

    // The widest unit that every address, stride and row length allows.
    uint64_t alignment = row_bytes | reinterpret_cast<uintptr_t>(host) | 16;
    std::vector<uint64_t> planes;
    for (size_t layer = layer_begin; layer < layer_end; ++layer) {
        planes.push_back(reinterpret_cast<uintptr_t>(layers[layer].key));
        if (g.planes == 2) planes.push_back(reinterpret_cast<uintptr_t>(layers[layer].value));
    }
    Params p{};
    for (size_t plane = 0; plane < 2; ++plane) {
        const int64_t* s = plane == 0 || g.planes == 1 ? g.key_strides : g.value_strides;
        for (size_t d = 0; d < 3; ++d) {
            p.strides[plane][d] = s[d] * static_cast<int64_t>(g.elem_bytes);
            alignment |= static_cast<uint64_t>(p.strides[plane][d]);
        }
    }
    for (uint64_t address : planes) alignment |= address;
    size_t unit = alignment & (~alignment + 1);  // lowest set bit
    unit = std::min<size_t>(unit, 16);

    // Block ids, token offsets and plane addresses go to the device once per call.
    std::vector<int64_t> table;
    table.reserve(2 * count + planes.size());
    table.insert(table.end(), blocks.begin(), blocks.end());
    table.insert(table.end(), token_offsets.begin(), token_offsets.end());
    for (uint64_t address : planes) table.push_back(static_cast<int64_t>(address));
    void* device_table = nullptr;
    cudaError_t err = cudaMallocAsync(&device_table, table.size() * sizeof(int64_t), stream);
    if (err != cudaSuccess) return cuda_error("cannot allocate the chunk table", err);
    err = cudaMemcpyAsync(device_table, table.data(), table.size() * sizeof(int64_t), cudaMemcpyHostToDevice, stream);
    if (err != cudaSuccess) {
        cudaFreeAsync(device_table, stream);
        return cuda_error("cannot copy the chunk table", err);
    }
    auto* entries = static_cast<int64_t*>(device_table);
    p.blocks = entries;
    p.offsets = entries + count;
    p.planes = reinterpret_cast<const uint64_t*>(entries + 2 * count);
    size_t rows_per_layer = g.planes * count * g.heads * g.chunk_tokens;
    p.host = host + layer_begin * rows_per_layer * row_bytes;
    p.count = count;
    p.heads = g.heads;
    p.tokens = g.chunk_tokens;
    p.row_units = row_bytes / unit;
    p.planes_per_layer = g.planes;
    p.total_units = layer_count * rows_per_layer * p.row_units;

    int device = 0;
    int sms = 1;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    uint64_t wanted = (p.total_units + kThreads * kUnroll - 1) / (kThreads * kUnroll);
    uint64_t cap = max_blocks != 0 ? max_blocks : static_cast<uint64_t>(sms) * 4;
    unsigned grid = static_cast<unsigned>(std::max<uint64_t>(1, std::min(wanted, cap)));
    switch (unit) {
        case 16: err = launch<uint4>(to_host, p, grid, stream); break;
        case 8: err = launch<uint2>(to_host, p, grid, stream); break;
        case 4: err = launch<uint32_t>(to_host, p, grid, stream); break;
        case 2: err = launch<uint16_t>(to_host, p, grid, stream); break;
        default: err = launch<uint8_t>(to_host, p, grid, stream); break;
    }
    cudaFreeAsync(device_table, stream);
    if (err != cudaSuccess) return cuda_error("cannot launch the chunk copy", err);
    return {};
}

}  // namespace ucm::cuda
