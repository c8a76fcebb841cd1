// ucm.store._cuda: the CUDA transfer path, built when CMake finds a CUDA toolkit. Importing it
// needs no GPU; calls on a machine without one raise RuntimeError naming the CUDA error.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <string>
#include <vector>

#include "dlpack.h"
#include "paged_copy_cuda.h"

namespace py = pybind11;

namespace {

// (address, nbytes, device) of a C-contiguous CUDA tensor exported through DLPack.
py::tuple dlpack_buffer(py::handle obj, const std::string& name) {
    ucm_python::DLPackView view = ucm_python::dlpack_view(obj, name);
    if (view.device.device_type != ucm_python::kDLCUDA && view.device.device_type != ucm_python::kDLCUDAManaged) {
        throw py::value_error(name + " is not a CUDA tensor");
    }
    // The caller keeps obj alive while the address is used; the export itself is dropped here.
    return py::make_tuple(reinterpret_cast<uintptr_t>(view.data), view.nbytes, view.device.device_id);
}

// Pinned (page-locked) host memory, registered with CUDA once, exposed as a writable buffer.
class PinnedBuffer {
public:
    explicit PinnedBuffer(size_t nbytes) : size_(nbytes) {
        cudaError_t err = cudaHostAlloc(&data_, nbytes == 0 ? 1 : nbytes, cudaHostAllocPortable);
        if (err != cudaSuccess) {
            data_ = nullptr;
            throw std::runtime_error("cannot pin " + std::to_string(nbytes) + " bytes of host memory: " +
                                     cudaGetErrorString(err));
        }
    }
    ~PinnedBuffer() {
        if (data_ != nullptr) cudaFreeHost(data_);
    }
    PinnedBuffer(const PinnedBuffer&) = delete;
    PinnedBuffer& operator=(const PinnedBuffer&) = delete;
    uintptr_t address() const { return reinterpret_cast<uintptr_t>(data_); }
    size_t size() const { return size_; }
    py::buffer_info info() { return py::buffer_info(data_, 1, py::format_descriptor<uint8_t>::format(), size_); }

private:
    void* data_ = nullptr;
    size_t size_;
};

// Copies (dst, src, nbytes) triples on `stream` and waits for them (GIL released).
void copy_and_wait(const std::vector<std::array<uintptr_t, 3>>& copies, uintptr_t stream) {
    cudaError_t err = cudaSuccess;
    {
        py::gil_scoped_release release;
        auto s = reinterpret_cast<cudaStream_t>(stream);
        for (const auto& c : copies) {
            err = cudaMemcpyAsync(reinterpret_cast<void*>(c[0]), reinterpret_cast<const void*>(c[1]), c[2],
                                  cudaMemcpyDefault, s);
            if (err != cudaSuccess) break;
        }
        cudaError_t sync = cudaStreamSynchronize(s);
        if (err == cudaSuccess) err = sync;
    }
    if (err != cudaSuccess) throw std::runtime_error(std::string("CUDA copy: ") + cudaGetErrorString(err));
}

void copy_chunks(bool to_host, const std::vector<uintptr_t>& keys, const std::vector<uintptr_t>& values,
                 const std::array<int64_t, 4>& key_strides, const std::array<int64_t, 4>& value_strides,
                 size_t elem_bytes, const std::vector<int64_t>& blocks, const std::vector<int64_t>& token_offsets,
                 size_t heads, size_t chunk_tokens, size_t head_size, uintptr_t host, size_t layer_begin,
                 py::object layer_end, uintptr_t stream, unsigned max_blocks, const std::string& way) {
    if (way != "copy-engine" && way != "kernel") {
        throw py::value_error("way must be 'copy-engine' or 'kernel', got '" + way + "'");
    }
    if (keys.empty()) throw py::value_error("need one key address per layer");
    if (!values.empty() && values.size() != keys.size()) {
        throw py::value_error("need one value address per layer, or none for a single-plane (MLA) cache");
    }
    if (elem_bytes != 1 && elem_bytes != 2 && elem_bytes != 4 && elem_bytes != 8) {
        throw py::value_error("elem_bytes must be 1, 2, 4 or 8, got " + std::to_string(elem_bytes));
    }
    if (heads == 0 || chunk_tokens == 0 || head_size == 0) {
        throw py::value_error("heads, chunk_tokens and head_size must be positive");
    }
    if (host == 0) throw py::value_error("the host buffer is a null address");
    std::vector<ucm::cuda::DeviceLayer> layers;
    for (size_t i = 0; i < keys.size(); ++i) {
        layers.push_back({reinterpret_cast<uint8_t*>(keys[i]),
                          values.empty() ? nullptr : reinterpret_cast<uint8_t*>(values[i])});
    }
    ucm::cuda::DeviceGeometry geometry{{key_strides[0], key_strides[1], key_strides[2], key_strides[3]},
                                       {value_strides[0], value_strides[1], value_strides[2], value_strides[3]},
                                       heads,
                                       chunk_tokens,
                                       head_size,
                                       elem_bytes,
                                       values.empty() ? size_t{1} : size_t{2}};
    size_t end = layer_end.is_none() ? keys.size() : layer_end.cast<size_t>();
    std::string error;
    {
        py::gil_scoped_release release;
        error = ucm::cuda::copy_chunks(to_host, layers, geometry, blocks, token_offsets,
                                       reinterpret_cast<uint8_t*>(host), layer_begin, end,
                                       reinterpret_cast<cudaStream_t>(stream), max_blocks,
                                       way == "kernel" ? ucm::cuda::Way::kKernel : ucm::cuda::Way::kCopyEngine);
    }
    if (!error.empty()) throw std::runtime_error("CUDA chunk copy: " + error);
}

int device_count() {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
        cudaGetLastError();  // clear it: no driver or no device simply means none
        return 0;
    }
    return count;
}

// The copy-engine alternative, kept for comparison: one cudaMemcpyAsync per page.
void copy_pages(const std::vector<uintptr_t>& dst, const std::vector<uintptr_t>& src, size_t page_bytes,
                uintptr_t stream) {
    if (dst.size() != src.size()) throw py::value_error("dst and src differ in length");
    cudaError_t err = cudaSuccess;
    {
        py::gil_scoped_release release;
        for (size_t i = 0; i < dst.size() && err == cudaSuccess; ++i) {
            err = cudaMemcpyAsync(reinterpret_cast<void*>(dst[i]), reinterpret_cast<const void*>(src[i]), page_bytes,
                                  cudaMemcpyDefault, reinterpret_cast<cudaStream_t>(stream));
        }
    }
    if (err != cudaSuccess) throw std::runtime_error(std::string("cudaMemcpyAsync: ") + cudaGetErrorString(err));
}

void synchronize(uintptr_t stream) {
    cudaError_t err;
    {
        py::gil_scoped_release release;
        err = cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream));
    }
    if (err != cudaSuccess) throw std::runtime_error(std::string("CUDA stream: ") + cudaGetErrorString(err));
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
    m.doc() = "CUDA transfer path of ucm.store: paged device KV cache <-> pinned host memory.";
    m.def("device_count", &device_count, "CUDA devices this process can use (0 without a driver or GPU).");
    m.def("copy_pages", &copy_pages, py::arg("dst"), py::arg("src"), py::arg("page_bytes"), py::arg("stream") = 0,
          "One cudaMemcpyAsync per page (the copy-engine way, for comparison).");
    m.def("dlpack_buffer", &dlpack_buffer, py::arg("obj"), py::arg("name") = "buffer",
          "(address, nbytes, device) of a contiguous CUDA tensor exported through DLPack.");
    m.def("copy_and_wait", &copy_and_wait, py::arg("copies"), py::arg("stream") = 0,
          "cudaMemcpyAsync each (dst, src, nbytes) on `stream`, then wait for them.");
    py::class_<PinnedBuffer>(m, "PinnedBuffer", py::buffer_protocol())
        .def(py::init<size_t>(), py::arg("nbytes"))
        .def_property_readonly("address", &PinnedBuffer::address)
        .def("__len__", &PinnedBuffer::size)
        .def_buffer(&PinnedBuffer::info);
    m.def("synchronize", &synchronize, py::arg("stream"), "Wait (GIL released) for the work queued on a stream.");
    m.def("copy_chunks", &copy_chunks, py::arg("to_host"), py::arg("keys"), py::arg("values"),
          py::arg("key_strides"), py::arg("value_strides"), py::arg("elem_bytes"), py::arg("blocks"),
          py::arg("token_offsets"), py::arg("heads"), py::arg("chunk_tokens"), py::arg("head_size"), py::arg("host"),
          py::arg("layer_begin") = 0, py::arg("layer_end") = py::none(), py::arg("stream") = 0,
          py::arg("max_blocks") = 0, py::arg("way") = "copy-engine",
          "Enqueue one copy of chunks between a paged device cache and pinned host memory on `stream` "
          "(GIL released; returns before the copy is done).");
}
