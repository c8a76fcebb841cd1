// The Ascend transfer path: chunks between a paged KV cache in NPU memory and host memory in the
// chunk format (docs/format.md), through ACL's strided copies. Built only when CMake finds the
// CANN toolkit (UCM_WITH_ASCEND); nothing here has run on an NPU yet (docs/ascend.md).
#pragma once

#include <acl/acl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "paged_copy.h"  // PagedLayer and PagedGeometry: the same page descriptions as the host path

namespace ucm::ascend {

// Enqueues on `stream` one 2-D copy per (layer, K/V, chunk, head): chunk_tokens rows of
// head_size elements, strided by the token stride on the NPU side and contiguous in `host`
// ([layers][2][count][heads][chunk_tokens][head_size]). Returns an error text, empty on success.
std::string copy_chunks(bool to_host, const std::vector<PagedLayer>& layers, const PagedGeometry& geometry,
                        const std::vector<int64_t>& blocks, const std::vector<int64_t>& token_offsets, uint8_t* host,
                        aclrtStream stream);

}  // namespace ucm::ascend
