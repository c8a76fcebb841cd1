#include "paged_copy_ascend.h"

namespace ucm::ascend {

std::string copy_chunks(bool to_host, const std::vector<PagedLayer>& layers, const PagedGeometry& g,
                        const std::vector<int64_t>& blocks, const std::vector<int64_t>& token_offsets, uint8_t* host,
                        aclrtStream stream) {
    if (blocks.size() != token_offsets.size()) return "blocks and token_offsets differ in length";
    if (g.key_strides[3] != 1 || g.value_strides[3] != 1) return "the head dimension must be contiguous on the NPU";
    const size_t row = g.head_size * g.elem_bytes;
    const size_t tile = g.chunk_tokens * row;
    const size_t count = blocks.size();
    for (size_t layer = 0; layer < layers.size(); ++layer) {
        for (size_t kv = 0; kv < 2; ++kv) {
            const int64_t* s = kv == 0 ? g.key_strides : g.value_strides;
            uint8_t* base = kv == 0 ? layers[layer].key : layers[layer].value;
            const size_t pitch = static_cast<size_t>(s[2]) * g.elem_bytes;  // bytes between tokens on the NPU
            for (size_t chunk = 0; chunk < count; ++chunk) {
                for (size_t head = 0; head < g.heads; ++head) {
                    int64_t element = blocks[chunk] * s[0] + static_cast<int64_t>(head) * s[1] + token_offsets[chunk] * s[2];
                    uint8_t* npu = base + element * static_cast<int64_t>(g.elem_bytes);
                    uint8_t* flat = host + (((layer * 2 + kv) * count + chunk) * g.heads + head) * tile;
                    aclError err = to_host ? aclrtMemcpy2dAsync(flat, row, npu, pitch, row, g.chunk_tokens,
                                                                ACL_MEMCPY_DEVICE_TO_HOST, stream)
                                           : aclrtMemcpy2dAsync(npu, pitch, flat, row, row, g.chunk_tokens,
                                                                ACL_MEMCPY_HOST_TO_DEVICE, stream);
                    if (err != ACL_SUCCESS) return "aclrtMemcpy2dAsync failed with ACL error " + std::to_string(err);
                }
            }
        }
    }
    return {};
}

}  // namespace ucm::ascend
