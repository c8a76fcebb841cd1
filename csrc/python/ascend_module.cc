// ucm.store._ascend: the Ascend transfer path, built when CMake finds the CANN toolkit.
// Not compiled or run in this project's CI (no CANN there); see docs/ascend.md.
#include <acl/acl.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <string>
#include <vector>

#include "paged_cache.h"
#include "paged_copy_ascend.h"

namespace py = pybind11;

namespace {

void copy_chunks(bool to_host, const std::vector<uintptr_t>& keys, const std::vector<uintptr_t>& values,
                 const std::array<int64_t, 4>& key_strides, const std::array<int64_t, 4>& value_strides,
                 size_t elem_bytes, const std::vector<int64_t>& blocks, const std::vector<int64_t>& token_offsets,
                 size_t heads, size_t chunk_tokens, size_t head_size, uintptr_t host, uintptr_t stream) {
    ucm_python::PagedCache cache =
        ucm_python::to_paged_cache(keys, values, key_strides, value_strides, elem_bytes, heads, chunk_tokens, head_size);
    if (host == 0) throw py::value_error("the host buffer is a null address");
    std::string error;
    {
        py::gil_scoped_release release;
        error = ucm::ascend::copy_chunks(to_host, cache.layers, cache.geometry, blocks, token_offsets,
                                         reinterpret_cast<uint8_t*>(host), reinterpret_cast<aclrtStream>(stream));
    }
    if (!error.empty()) throw std::runtime_error("Ascend chunk copy: " + error);
}

void synchronize(uintptr_t stream) {
    aclError err;
    {
        py::gil_scoped_release release;
        err = aclrtSynchronizeStream(reinterpret_cast<aclrtStream>(stream));
    }
    if (err != ACL_SUCCESS) throw std::runtime_error("aclrtSynchronizeStream failed with ACL error " + std::to_string(err));
}

}  // namespace

PYBIND11_MODULE(_ascend, m) {
    m.doc() = "Ascend transfer path of ucm.store: paged NPU KV cache <-> host memory through ACL.";
    m.def("copy_chunks", &copy_chunks, py::arg("to_host"), py::arg("keys"), py::arg("values"),
          py::arg("key_strides"), py::arg("value_strides"), py::arg("elem_bytes"), py::arg("blocks"),
          py::arg("token_offsets"), py::arg("heads"), py::arg("chunk_tokens"), py::arg("head_size"), py::arg("host"),
          py::arg("stream") = 0, "Enqueue the copies on an ACL stream (GIL released); returns before they are done.");
    m.def("synchronize", &synchronize, py::arg("stream"), "Wait (GIL released) for the work queued on an ACL stream.");
}
