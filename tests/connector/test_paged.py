"""Gather and scatter between vLLM's paged layouts and the chunk format, against a per-element reference."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from ucm.connector.vllm.paged import PagedKV  # noqa: E402

BLOCKS, HEADS, TOKENS, DIM = 7, 2, 32, 16


def cpu_reference(cache):
    """K [B,H,N,D] and V of vLLM's CPU page: per (block, head) K transposed [D,N] then V [N,D]."""
    blocks, heads, tokens, dim = cache.shape[0], cache.shape[1], cache.shape[2], cache.shape[3] // 2
    flat = cache.reshape(blocks, heads, 2 * tokens * dim)
    key = flat[:, :, : tokens * dim].reshape(blocks, heads, dim, tokens).transpose(2, 3)
    value = flat[:, :, tokens * dim :].reshape(blocks, heads, tokens, dim)
    return key, value


def amx_reference(cache):
    """K [B,H,N,D] and V of vLLM's CPU page packed for AMX tiles: per (block, head) K [N/16][D/2][16][2]
    (16-token groups of dim pairs), then V [D/16][N/2][16][2] (16-dim groups of token pairs)."""
    blocks, heads, tokens, dim = cache.shape[0], cache.shape[1], cache.shape[2], cache.shape[3] // 2
    flat = cache.reshape(blocks, heads, 2 * tokens * dim)
    key = flat[:, :, : tokens * dim].reshape(blocks, heads, tokens // 16, dim // 2, 16, 2)
    key = key.permute(0, 1, 2, 4, 3, 5).reshape(blocks, heads, tokens, dim)
    value = flat[:, :, tokens * dim :].reshape(blocks, heads, dim // 16, tokens // 2, 16, 2)
    value = value.permute(0, 1, 3, 5, 2, 4).reshape(blocks, heads, tokens, dim)
    return key, value


def flash_reference(cache):
    return cache[0].permute(0, 2, 1, 3), cache[1].permute(0, 2, 1, 3)


CPU_SHAPE = (BLOCKS, HEADS, TOKENS, 2 * DIM)
#: name -> (layout, page packing, cache shape, reference views)
LAYOUTS = {
    "cpu": ("cpu", "strided", CPU_SHAPE, cpu_reference),
    "cpu-amx": ("cpu", "amx", CPU_SHAPE, amx_reference),
    "flash": ("flash", "strided", (2, BLOCKS, TOKENS, HEADS, DIM), flash_reference),
}
REFERENCES = {"strided": cpu_reference, "amx": amx_reference}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("chunk", [32, 16, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_then_scatter_moves_exactly_the_chunks(name, chunk, dtype):
    layout, packing, shape, reference = LAYOUTS[name]
    if packing == "amx" and (dtype != torch.bfloat16 or chunk % 16):
        pytest.skip("vLLM packs only bf16 for AMX, in groups of 16 tokens")
    caches = {f"model.layers.{i}.self_attn.attn": torch.randn(shape).to(dtype) for i in (2, 0, 1)}
    paged = PagedKV(caches, layout, chunk, packing)
    assert [name.split(".")[2] for name in paged.layer_names] == ["0", "1", "2"]
    blocks = [5, 1, 3]
    within = [0, TOKENS // chunk - 1, 0]
    staging = torch.full(paged.staging_shape(3), float("nan"), dtype=dtype)
    paged.gather(blocks, within, staging)
    for layer, name in enumerate(paged.layer_names):
        for kv, tensor in enumerate(reference(caches[name])):
            for i, (b, c) in enumerate(zip(blocks, within, strict=True)):
                assert torch.equal(staging[layer, kv, i], tensor[b, :, c * chunk : (c + 1) * chunk])

    originals = {name: cache.clone() for name, cache in caches.items()}
    for cache in caches.values():
        cache.zero_()
    paged.scatter(blocks, within, staging)
    for name in caches:
        for tensor, original in zip(reference(caches[name]), reference(originals[name]), strict=True):
            for b, c in zip(blocks, within, strict=True):
                window = slice(c * chunk, (c + 1) * chunk)
                assert torch.equal(tensor[b, :, window], original[b, :, window])
            untouched = torch.ones(BLOCKS, dtype=torch.bool)
            untouched[blocks] = False
            assert not tensor[untouched].any(), "scatter wrote outside the target chunks"


def test_chunk_buffers_cover_the_staging_tensor_in_store_order():
    caches = {f"model.layers.{i}.attn": torch.zeros(CPU_SHAPE) for i in range(2)}
    paged = PagedKV(caches, "cpu", TOKENS)
    staging = torch.arange(torch.Size(paged.staging_shape(2)).numel(), dtype=torch.float32).reshape(
        paged.staging_shape(2)
    )
    pieces = paged.chunk_buffers(staging)
    import ctypes

    for i, chunk_pieces in enumerate(pieces):
        raw = b"".join(ctypes.string_at(address, size) for address, size in chunk_pieces)
        assert raw == staging[:, :, i].contiguous().numpy().tobytes()
        assert len(raw) == paged.chunk_bytes


def test_chunk_size_must_divide_the_block():
    with pytest.raises(ValueError, match="chunk_tokens 24 must divide"):
        PagedKV({"l.0.a": torch.zeros(CPU_SHAPE)}, "cpu", 24)


def test_staging_buffers_are_reused_for_any_smaller_count_and_bounded():
    from ucm.connector.vllm.paged import StagingPool

    paged = PagedKV({f"model.layers.{i}.attn": torch.zeros(CPU_SHAPE) for i in range(2)}, "cpu", TOKENS)
    pool = StagingPool(paged, keep=2)
    big, big_buffer = pool.take(5)
    assert big.shape == paged.staging_shape(5) and big.dtype == paged.dtype
    pool.give(big_buffer)
    small, small_buffer = pool.take(3)
    assert small.shape == paged.staging_shape(3)
    assert small_buffer.data_ptr() == big_buffer.data_ptr(), "a buffer large enough was not reused"
    # A larger request than any idle buffer gets a new one.
    larger, larger_buffer = pool.take(8)
    assert larger_buffer.data_ptr() != big_buffer.data_ptr()
    for buffer in (small_buffer, larger_buffer, pool.take(1)[1], pool.take(1)[1]):
        pool.give(buffer)
    # Only the two largest idle buffers are kept.
    assert pool.idle_bytes == (8 + 5) * paged.chunk_bytes


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_the_split_layout_of_vllm_ascend_round_trips(dtype):
    """vllm-ascend hands over a (K, V) pair of [blocks, tokens, heads, head_size] per layer."""
    caches = {
        f"model.layers.{i}.self_attn.attn": (
            torch.randn(BLOCKS, TOKENS, HEADS, DIM).to(dtype),
            torch.randn(BLOCKS, TOKENS, HEADS, DIM).to(dtype),
        )
        for i in range(2)
    }
    paged = PagedKV(caches, "split", 8)
    blocks, within = [6, 2], [3, 0]
    staging = torch.full(paged.staging_shape(2), float("nan"), dtype=dtype)
    paged.gather(blocks, within, staging)
    for layer, name in enumerate(paged.layer_names):
        for kv, tensor in enumerate(caches[name]):
            for i, (b, c) in enumerate(zip(blocks, within, strict=True)):
                assert torch.equal(staging[layer, kv, i], tensor[b, c * 8 : (c + 1) * 8].permute(1, 0, 2))
    targets = {name: (torch.zeros_like(k), torch.zeros_like(v)) for name, (k, v) in caches.items()}
    PagedKV(targets, "split", 8).scatter(blocks, within, staging)
    for name in caches:
        for got, want in zip(targets[name], caches[name], strict=True):
            for b, c in zip(blocks, within, strict=True):
                assert torch.equal(got[b, c * 8 : (c + 1) * 8], want[b, c * 8 : (c + 1) * 8])
            assert int((got != 0).sum()) == 2 * 8 * HEADS * DIM, "scatter wrote outside the chunks"


def test_a_split_layout_that_is_not_a_pair_is_refused():
    with pytest.raises(ValueError, match=r"expected a \(K, V\) pair"):
        PagedKV({"l.0.a": (torch.zeros(BLOCKS, TOKENS, HEADS, DIM),)}, "split", 8)


@pytest.mark.parametrize("isa", ["vec", "amx"])
def test_the_references_are_how_vllm_writes_its_cpu_pages(isa):
    """vLLM's own cache write, for both of its x86 page packings, puts each token's K and V where
    the references above (and so the transfer path) read them."""
    ops = pytest.importorskip("vllm._custom_ops")
    packing = "amx" if isa == "amx" else "strided"
    dim = 64  # vLLM's kernels take head sizes of real models
    cache = torch.zeros((BLOCKS, HEADS, TOKENS, 2 * dim), dtype=torch.bfloat16)
    key_cache, value_cache = cache.view(BLOCKS, HEADS, 2 * TOKENS, dim).chunk(2, dim=2)
    slots = torch.tensor([3 * TOKENS + t for t in range(TOKENS)] + [5 * TOKENS + 17])
    key = torch.randn(len(slots), HEADS, dim).to(torch.bfloat16)
    value = torch.randn(len(slots), HEADS, dim).to(torch.bfloat16)
    try:
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)
    except RuntimeError as error:  # a vLLM build without this kernel
        pytest.skip(f"vLLM cannot write {isa!r} pages here: {error}")
    ref_key, ref_value = REFERENCES[packing](cache)
    for i, slot in enumerate(slots.tolist()):
        block, token = divmod(slot, TOKENS)
        assert torch.equal(ref_key[block, :, token], key[i])
        assert torch.equal(ref_value[block, :, token], value[i])
    # Nothing else was written.
    assert int((cache != 0).sum()) == int((key != 0).sum() + (value != 0).sum())
    # The transfer path reads the block vLLM filled (four 16-dim groups of V) in the chunk format.
    paged = PagedKV({"model.layers.0.attn": cache}, "cpu", 16, packing)
    staging = torch.full(paged.staging_shape(2), float("nan"), dtype=torch.bfloat16)
    paged.gather([3, 3], [0, 1], staging)
    for kv, written in enumerate((key, value)):
        chunks = staging[0, kv].permute(0, 2, 1, 3).reshape(TOKENS, HEADS, dim)  # [tokens, heads, dim]
        assert torch.equal(chunks, written[:TOKENS])


def test_chunks_read_from_amx_pages_are_the_bytes_read_from_plain_ones():
    """Two engines, one with vLLM's AMX kernels and one without, store the same bytes for the same KV."""
    strided_cache = torch.randn(CPU_SHAPE).to(torch.bfloat16)
    key, value = cpu_reference(strided_cache)
    amx_cache = torch.zeros(CPU_SHAPE, dtype=torch.bfloat16)
    flat = amx_cache.reshape(BLOCKS, HEADS, 2 * TOKENS * DIM)
    flat[:, :, : TOKENS * DIM] = (
        key.reshape(BLOCKS, HEADS, TOKENS // 16, 16, DIM // 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(BLOCKS, HEADS, -1)
    )
    flat[:, :, TOKENS * DIM :] = (
        value.reshape(BLOCKS, HEADS, TOKENS // 2, 2, DIM // 16, 16).permute(0, 1, 4, 2, 5, 3).reshape(BLOCKS, HEADS, -1)
    )
    assert all(torch.equal(a, b) for a, b in zip(amx_reference(amx_cache), (key, value), strict=True))
    blocks, within = [4, 0, 6], [1, 0, 0]
    out = []
    for cache, packing in ((strided_cache, "strided"), (amx_cache, "amx")):
        paged = PagedKV({"model.layers.0.attn": cache}, "cpu", 16, packing)
        staging = torch.full(paged.staging_shape(3), float("nan"), dtype=torch.bfloat16)
        paged.gather(blocks, within, staging)
        out.append(staging)
    assert torch.equal(out[0], out[1])


def test_amx_pages_need_chunks_of_whole_16_token_groups():
    with pytest.raises(ValueError, match="multiple of 16"):
        PagedKV({"l.0.a": torch.zeros(CPU_SHAPE, dtype=torch.bfloat16)}, "cpu", 8, "amx")


def test_the_packing_is_asked_of_vllm_as_its_attention_backend_asks(monkeypatch):
    """The model's dtype and the cache config's kv_cache_dtype decide vLLM's CPU kernels and so the
    page packing; an fp8 cache on an AMX CPU is packed too, and refused by name."""
    from vllm.v1.attention.backends import cpu_attn

    from ucm.connector.vllm.paged import cpu_page_packing

    asked = []

    def isa(dtype, block_size, head_size=None, kv_cache_dtype=None):
        asked.append((dtype, block_size, head_size, kv_cache_dtype))
        return "amx" if dtype == torch.bfloat16 else "vec"

    monkeypatch.setattr(cpu_attn, "_get_attn_isa", isa)
    assert cpu_page_packing(torch.bfloat16, 128, 64, "fp8_e4m3") == "amx"
    assert cpu_page_packing(torch.float16, 128, 64) == "strided"
    assert asked == [(torch.bfloat16, 128, 64, "fp8_e4m3"), (torch.float16, 128, 64, "auto")]
    fp8 = {"l.0.a": torch.zeros(CPU_SHAPE, dtype=torch.uint8)}
    with pytest.raises(ValueError, match="only for 16-bit elements"):
        PagedKV(fp8, "cpu", 32, cpu_page_packing(torch.bfloat16, TOKENS, DIM, "fp8_e4m3"))


def test_a_packing_outside_vllms_cpu_cache_is_refused():
    flash = {"l.0.a": torch.zeros((2, BLOCKS, TOKENS, HEADS, DIM), dtype=torch.bfloat16)}
    with pytest.raises(ValueError, match="exists only in vLLM's CPU cache"):
        PagedKV(flash, "flash", 16, "amx")
