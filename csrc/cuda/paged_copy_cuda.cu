#include "paged_copy_cuda.h"

#include <cuda.h>  // driver types for the stream memory operations (looked up at run time, not linked)

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>

namespace ucm::cuda {
namespace {

constexpr unsigned kThreads = 512;
constexpr unsigned kUnroll = 8;  // accesses in flight per thread: reads over the bus need many

struct Params {
    const int64_t* blocks;     // device: per chunk
    const int64_t* offsets;    // device: per chunk, first token within the block
    const uint64_t* planes;    // device: per (layer in range, plane), address of element [0, 0, 0, 0]
    int64_t strides[2][4];     // bytes, per plane: block, head, token
    uint64_t count, heads, tokens, row_units, planes_per_layer;
};

// Where unit i of the layer range lives in the cache. Units run in the chunk format's order:
// [layer][plane][chunk][head][token][unit of the row]. Index is 32-bit whenever the range allows:
// this decomposition is most of the kernels' arithmetic, and 64-bit division is far slower.
template <typename Unit, typename Index>
__device__ __forceinline__ Unit* in_cache(const Params& p, Index i) {
    const Index row_units = static_cast<Index>(p.row_units);
    Index unit = i % row_units;
    Index row = i / row_units;
    Index token = row % static_cast<Index>(p.tokens);
    Index rest = row / static_cast<Index>(p.tokens);
    Index head = rest % static_cast<Index>(p.heads);
    rest /= static_cast<Index>(p.heads);
    Index chunk = rest % static_cast<Index>(p.count);
    rest /= static_cast<Index>(p.count);
    Index plane = rest % static_cast<Index>(p.planes_per_layer);
    const int64_t* s = p.strides[plane];
    int64_t offset =
        p.blocks[chunk] * s[0] + static_cast<int64_t>(head) * s[1] + (p.offsets[chunk] + static_cast<int64_t>(token)) * s[2];
    return reinterpret_cast<Unit*>(reinterpret_cast<uint8_t*>(p.planes[rest]) + offset) + unit;
}

// Moves units [begin, end) between the cache and `linear` (unit `begin` at linear[0]), spread over
// the whole grid. `Cached`: read `linear` through L2 only (it was written by the copy engines).
template <typename Unit, bool OutOfCache, typename Index, bool Cached = true>
__device__ __forceinline__ void move_units(const Params& p, Unit* linear, Index begin, Index end) {
    const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
    for (Index first = begin + static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; first < end;
         first += stride * kUnroll) {
        Unit data[kUnroll];
        Unit* to[kUnroll];
#pragma unroll
        for (unsigned k = 0; k < kUnroll; ++k) {
            Index i = first + k * stride;
            to[k] = nullptr;
            if (i >= end || i < first) continue;  // past the end (or wrapped around)
            Unit* cache = in_cache<Unit>(p, i);
            Unit* flat = linear + static_cast<uint64_t>(i - begin);
            if (OutOfCache) {
                data[k] = *cache;
                to[k] = flat;
            } else {
                data[k] = Cached ? *flat : __ldcg(flat);
                to[k] = cache;
            }
        }
#pragma unroll
        for (unsigned k = 0; k < kUnroll; ++k) {
            if (to[k] != nullptr) *to[k] = data[k];
        }
    }
}

// The direct way: one grid moves everything, reading or writing pinned host memory over the bus.
template <typename Unit, bool OutOfCache, typename Index>
__global__ void __launch_bounds__(kThreads) copy_direct(Params p, Unit* host, uint64_t total) {
    move_units<Unit, OutOfCache, Index>(p, host, Index{0}, static_cast<Index>(total));
}

// ---- the copy-engine way -------------------------------------------------------------------------
//
// A ring of kRingSlots device slots (kRingBytes in all, per device) sits between the cache and the
// pinned host buffer. Each slot has two counters in device memory: `ready` (pieces put into it so
// far) and `taken` (pieces taken out). Piece g of the ring's life uses slot g % kRingSlots on lap
// g / kRingSlots; whoever fills it waits for taken >= lap, whoever empties it waits for
// ready >= lap + 1. One kernel, resident on a few SMs for the whole transfer, fills (or empties)
// every piece; the copy engines empty (or fill) them on their own stream, waiting on and bumping
// the counters with stream memory operations. The host never waits, no SM writes to host memory,
// and the kernel needs no new SM between pieces, so compute beside it keeps its SMs and the
// transfer keeps going.
constexpr size_t kRingSlots = 4;
constexpr size_t kRingBytes = size_t{64} << 20;
constexpr unsigned kRingBlocks = 8;  // thread blocks of the resident kernel

struct RingParams {
    uint8_t* base;
    uint64_t slot_units;
    uint64_t total_units;
    uint32_t first_piece;  // the ring's piece number of this call's piece 0
    uint32_t pieces;
    unsigned* ready;
    unsigned* taken;
    unsigned* finished;  // per piece of this call: thread blocks done with it (zeroed per call)
};

__device__ __forceinline__ void wait_for(const unsigned* counter, unsigned target) {
    while (static_cast<int>(*reinterpret_cast<const volatile unsigned*>(counter) - target) < 0) __nanosleep(256);
}

template <typename Unit, bool OutOfCache, typename Index>
__global__ void __launch_bounds__(kThreads) copy_ring(Params p, RingParams r) {
    for (uint32_t j = 0; j < r.pieces; ++j) {
        uint32_t piece = r.first_piece + j;
        uint32_t slot = piece % kRingSlots;
        unsigned lap = piece / kRingSlots;
        if (threadIdx.x == 0) wait_for(OutOfCache ? &r.taken[slot] : &r.ready[slot], OutOfCache ? lap : lap + 1);
        __syncthreads();
        Index begin = static_cast<Index>(static_cast<uint64_t>(j) * r.slot_units);
        uint64_t stop = (static_cast<uint64_t>(j) + 1) * r.slot_units;
        Index end = static_cast<Index>(stop < r.total_units ? stop : r.total_units);
        Unit* linear = reinterpret_cast<Unit*>(r.base + slot * (kRingBytes / kRingSlots));
        move_units<Unit, OutOfCache, Index, false>(p, linear, begin, end);
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence();  // this block's part of the piece is visible before it is counted
            if (atomicAdd(&r.finished[j], 1u) == gridDim.x - 1) {
                __threadfence();
                *reinterpret_cast<volatile unsigned*>(OutOfCache ? &r.ready[slot] : &r.taken[slot]) = lap + 1;
            }
        }
    }
}

template <typename Unit, typename Index>
cudaError_t launch_indexed(bool out_of_cache, const Params& p, uint8_t* host, uint64_t total, const RingParams* ring,
                           unsigned grid, cudaStream_t stream) {
    if (ring != nullptr) {
        if (out_of_cache) {
            copy_ring<Unit, true, Index><<<grid, kThreads, 0, stream>>>(p, *ring);
        } else {
            copy_ring<Unit, false, Index><<<grid, kThreads, 0, stream>>>(p, *ring);
        }
    } else if (out_of_cache) {
        copy_direct<Unit, true, Index><<<grid, kThreads, 0, stream>>>(p, reinterpret_cast<Unit*>(host), total);
    } else {
        copy_direct<Unit, false, Index><<<grid, kThreads, 0, stream>>>(p, reinterpret_cast<Unit*>(host), total);
    }
    return cudaGetLastError();
}

template <typename Unit>
cudaError_t launch(bool out_of_cache, const Params& p, uint8_t* host, uint64_t total, const RingParams* ring,
                   unsigned grid, cudaStream_t stream) {
    // 32-bit indices while the last index a thread may form still fits.
    uint64_t reach = total + static_cast<uint64_t>(grid) * kThreads * kUnroll;
    if (reach < (uint64_t{1} << 32)) return launch_indexed<Unit, uint32_t>(out_of_cache, p, host, total, ring, grid, stream);
    return launch_indexed<Unit, uint64_t>(out_of_cache, p, host, total, ring, grid, stream);
}

std::string cuda_error(const char* what, cudaError_t err) {
    return std::string(what) + ": " + cudaGetErrorString(err);
}

using WaitValue = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);
using WriteValue = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);

struct Ring {
    std::mutex mutex;  // one call at a time enqueues on a device's ring
    uint8_t* base = nullptr;
    unsigned* counters = nullptr;  // ready[kRingSlots], then taken[kRingSlots]
    cudaStream_t copies = nullptr;
    cudaEvent_t done = nullptr;
    uint32_t next_piece = 0;
    WaitValue wait_value = nullptr;
    WriteValue write_value = nullptr;
};

cudaError_t driver_entry(const char* name, void** fn) {
    cudaDriverEntryPointQueryResult found;
    cudaError_t err = cudaGetDriverEntryPointByVersion(name, fn, 12000, cudaEnableDefault, &found);
    if (err == cudaSuccess && found != cudaDriverEntryPointSuccess) err = cudaErrorSymbolNotFound;
    return err;
}

cudaError_t ring_for(int device, Ring** out) {
    static std::mutex mutex;
    static std::map<int, std::unique_ptr<Ring>> rings;
    std::lock_guard<std::mutex> lock(mutex);
    auto& ring = rings[device];
    if (!ring) {
        auto fresh = std::make_unique<Ring>();
        cudaError_t err = cudaMalloc(&fresh->base, kRingBytes);
        if (err == cudaSuccess) err = cudaMalloc(&fresh->counters, 2 * kRingSlots * sizeof(unsigned));
        if (err == cudaSuccess) err = cudaMemset(fresh->counters, 0, 2 * kRingSlots * sizeof(unsigned));
        if (err == cudaSuccess) err = cudaStreamCreateWithFlags(&fresh->copies, cudaStreamNonBlocking);
        if (err == cudaSuccess) err = cudaEventCreateWithFlags(&fresh->done, cudaEventDisableTiming);
        if (err == cudaSuccess) err = driver_entry("cuStreamWaitValue32", reinterpret_cast<void**>(&fresh->wait_value));
        if (err == cudaSuccess) err = driver_entry("cuStreamWriteValue32", reinterpret_cast<void**>(&fresh->write_value));
        if (err == cudaSuccess) err = cudaDeviceSynchronize();  // the counters are zero before anyone reads them
        if (err != cudaSuccess) return err;  // the partial ring leaks: this device cannot run the ring anyway
        ring = std::move(fresh);
    }
    *out = ring.get();
    return cudaSuccess;
}

cudaError_t from_driver(CUresult result) { return result == CUDA_SUCCESS ? cudaSuccess : cudaErrorUnknown; }

}  // namespace

std::string copy_chunks(bool to_host, const std::vector<DeviceLayer>& layers, const DeviceGeometry& g,
                        const std::vector<int64_t>& blocks, const std::vector<int64_t>& token_offsets, uint8_t* host,
                        size_t layer_begin, size_t layer_end, cudaStream_t stream, unsigned max_blocks, Way way) {
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
    size_t unit = std::min<size_t>(alignment & (~alignment + 1), 16);  // lowest set bit, at most 16
    size_t rows_per_layer = g.planes * count * g.heads * g.chunk_tokens;
    uint64_t total_units = layer_count * rows_per_layer * (row_bytes / unit);
    uint8_t* host_range = host + layer_begin * rows_per_layer * row_bytes;

    int device = 0;
    int sms = 1;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);

    Ring* ring = nullptr;
    uint64_t slot_units = kRingBytes / kRingSlots / unit;
    uint32_t pieces = 0;
    if (way == Way::kCopyEngine) {
        cudaError_t err = ring_for(device, &ring);
        if (err != cudaSuccess) return cuda_error("cannot set up the copy-engine ring", err);
        pieces = static_cast<uint32_t>((total_units + slot_units - 1) / slot_units);
    }

    // Block ids, token offsets and plane addresses go to the device once per call, with one
    // zeroed counter per ring piece.
    std::vector<int64_t> table;
    table.reserve(2 * count + planes.size());
    table.insert(table.end(), blocks.begin(), blocks.end());
    table.insert(table.end(), token_offsets.begin(), token_offsets.end());
    for (uint64_t address : planes) table.push_back(static_cast<int64_t>(address));
    size_t table_bytes = table.size() * sizeof(int64_t);
    void* device_table = nullptr;
    cudaError_t err = cudaMallocAsync(&device_table, table_bytes + pieces * sizeof(unsigned), stream);
    if (err != cudaSuccess) return cuda_error("cannot allocate the chunk table", err);
    err = cudaMemcpyAsync(device_table, table.data(), table_bytes, cudaMemcpyHostToDevice, stream);
    if (err == cudaSuccess && pieces > 0) {
        err = cudaMemsetAsync(static_cast<uint8_t*>(device_table) + table_bytes, 0, pieces * sizeof(unsigned), stream);
    }
    if (err != cudaSuccess) {
        cudaFreeAsync(device_table, stream);
        return cuda_error("cannot copy the chunk table", err);
    }
    auto* entries = static_cast<int64_t*>(device_table);
    p.blocks = entries;
    p.offsets = entries + count;
    p.planes = reinterpret_cast<const uint64_t*>(entries + 2 * count);
    p.count = count;
    p.heads = g.heads;
    p.tokens = g.chunk_tokens;
    p.row_units = row_bytes / unit;
    p.planes_per_layer = g.planes;

    auto launch_unit = [&](const RingParams* r, unsigned grid) {
        switch (unit) {
            case 16: return launch<uint4>(to_host, p, host_range, total_units, r, grid, stream);
            case 8: return launch<uint2>(to_host, p, host_range, total_units, r, grid, stream);
            case 4: return launch<uint32_t>(to_host, p, host_range, total_units, r, grid, stream);
            case 2: return launch<uint16_t>(to_host, p, host_range, total_units, r, grid, stream);
            default: return launch<uint8_t>(to_host, p, host_range, total_units, r, grid, stream);
        }
    };

    if (way == Way::kKernel) {
        uint64_t wanted = (total_units + kThreads * kUnroll - 1) / (kThreads * kUnroll);
        uint64_t cap = max_blocks != 0 ? max_blocks : static_cast<uint64_t>(sms) * 4;
        err = launch_unit(nullptr, static_cast<unsigned>(std::max<uint64_t>(1, std::min(wanted, cap))));
    } else {
        std::lock_guard<std::mutex> lock(ring->mutex);
        RingParams r{ring->base,
                     slot_units,
                     total_units,
                     ring->next_piece,
                     pieces,
                     ring->counters,
                     ring->counters + kRingSlots,
                     reinterpret_cast<unsigned*>(static_cast<uint8_t*>(device_table) + table_bytes)};
        // The resident kernel's blocks must all fit at once beside each other: few, and at most one per SM.
        unsigned grid = std::min<unsigned>(max_blocks != 0 ? max_blocks : kRingBlocks, static_cast<unsigned>(sms));
        err = launch_unit(&r, grid);
        auto address = [](unsigned* counter) { return static_cast<CUdeviceptr>(reinterpret_cast<uintptr_t>(counter)); };
        for (uint32_t j = 0; j < pieces && err == cudaSuccess; ++j) {
            uint32_t piece = r.first_piece + j;
            uint32_t slot = piece % kRingSlots;
            unsigned lap = piece / kRingSlots;
            uint8_t* slot_base = ring->base + slot * (kRingBytes / kRingSlots);
            uint64_t first = static_cast<uint64_t>(j) * slot_units;
            size_t bytes = (std::min(first + slot_units, total_units) - first) * unit;
            uint8_t* at = host_range + first * unit;
            auto copies = reinterpret_cast<CUstream>(ring->copies);
            if (to_host) {
                err = from_driver(ring->wait_value(copies, address(&r.ready[slot]), lap + 1, CU_STREAM_WAIT_VALUE_GEQ));
                if (err == cudaSuccess) err = cudaMemcpyAsync(at, slot_base, bytes, cudaMemcpyDeviceToHost, ring->copies);
                if (err == cudaSuccess) err = from_driver(ring->write_value(copies, address(&r.taken[slot]), lap + 1, 0));
            } else {
                err = from_driver(ring->wait_value(copies, address(&r.taken[slot]), lap, CU_STREAM_WAIT_VALUE_GEQ));
                if (err == cudaSuccess) err = cudaMemcpyAsync(slot_base, at, bytes, cudaMemcpyHostToDevice, ring->copies);
                if (err == cudaSuccess) err = from_driver(ring->write_value(copies, address(&r.ready[slot]), lap + 1, 0));
            }
        }
        ring->next_piece += pieces;
        if (err == cudaSuccess) {
            // The caller's stream is done when the copy engines are.
            err = cudaEventRecord(ring->done, ring->copies);
            if (err == cudaSuccess) err = cudaStreamWaitEvent(stream, ring->done, 0);
        }
    }
    cudaFreeAsync(device_table, stream);
    if (err != cudaSuccess) return cuda_error("cannot run the chunk copy", err);
    return {};
}

}  // namespace ucm::cuda
