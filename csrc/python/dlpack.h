// The part of the DLPack ABI (v0.x "dltensor" capsules) the bindings read: where a tensor's
// bytes are, how many, and on which device. Shared by ucm.store._native and ucm.store._cuda.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace ucm_python {

namespace py = pybind11;

struct DLDevice {
    int32_t device_type;
    int32_t device_id;
};
struct DLDataType {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
};
struct DLTensor {
    void* data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t* shape;
    int64_t* strides;
    uint64_t byte_offset;
};
struct DLManagedTensor {
    DLTensor dl_tensor;
    void* manager_ctx;
    void (*deleter)(DLManagedTensor*);
};

constexpr int32_t kDLCPU = 1;
constexpr int32_t kDLCUDA = 2;
constexpr int32_t kDLCUDAHost = 3;
constexpr int32_t kDLCUDAManaged = 13;

// A tensor exported through DLPack. `capsule` must stay referenced while `data` is used; it is
// not consumed, so dropping it frees the export.
struct DLPackView {
    uint8_t* data;
    size_t nbytes;
    DLDevice device;
    py::object capsule;
};

// Raises ValueError (naming `name`) for a tensor that is not C-contiguous.
inline DLPackView dlpack_view(py::handle obj, const std::string& name) {
    py::object capsule = obj.attr("__dlpack__")();
    auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
    if (managed == nullptr) throw py::error_already_set();
    const DLTensor& t = managed->dl_tensor;
    size_t count = 1;
    for (int32_t d = 0; d < t.ndim; ++d) count *= static_cast<size_t>(t.shape[d]);
    if (t.strides != nullptr && count > 1) {
        int64_t expected = 1;
        for (int32_t d = t.ndim - 1; d >= 0; --d) {
            if (t.shape[d] != 1 && t.strides[d] != expected) {
                throw py::value_error(name + " is not contiguous; pass a contiguous tensor");
            }
            expected *= t.shape[d];
        }
    }
    size_t item = static_cast<size_t>(t.dtype.bits) * t.dtype.lanes / 8;
    return {static_cast<uint8_t*>(t.data) + t.byte_offset, count * item, t.device, std::move(capsule)};
}

}  // namespace ucm_python
