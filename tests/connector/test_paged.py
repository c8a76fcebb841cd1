"""Gather and scatter between vLLM's paged layouts and the chunk format, against a per-element reference."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from ucm.connector.vllm.paged import PagedKV  # noqa: E402

BLOCKS, HEADS, TOKENS, DIM = 7, 2, 32, 8


def cpu_reference(cache):
    """K [B,H,N,D] and V of vLLM's CPU page: per (block, head) K transposed [D,N] then V [N,D]."""
    flat = cache.reshape(BLOCKS, HEADS, 2 * TOKENS * DIM)
    key = flat[:, :, : TOKENS * DIM].reshape(BLOCKS, HEADS, DIM, TOKENS).transpose(2, 3)
    value = flat[:, :, TOKENS * DIM :].reshape(BLOCKS, HEADS, TOKENS, DIM)
    return key, value


def flash_reference(cache):
    return cache[0].permute(0, 2, 1, 3), cache[1].permute(0, 2, 1, 3)


LAYOUTS = {
    "cpu": ((BLOCKS, HEADS, TOKENS, 2 * DIM), cpu_reference),
    "flash": ((2, BLOCKS, TOKENS, HEADS, DIM), flash_reference),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("chunk", [32, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_then_scatter_moves_exactly_the_chunks(layout, chunk, dtype):
    shape, reference = LAYOUTS[layout]
    caches = {f"model.layers.{i}.self_attn.attn": torch.randn(shape).to(dtype) for i in (2, 0, 1)}
    paged = PagedKV(caches, layout, chunk)
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
    caches = {f"model.layers.{i}.attn": torch.zeros(LAYOUTS["cpu"][0]) for i in range(2)}
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
        PagedKV({"l.0.a": torch.zeros(LAYOUTS["cpu"][0])}, "cpu", 24)


def test_staging_buffers_are_reused_for_any_smaller_count_and_bounded():
    from ucm.connector.vllm.paged import StagingPool

    paged = PagedKV({f"model.layers.{i}.attn": torch.zeros(LAYOUTS["cpu"][0]) for i in range(2)}, "cpu", TOKENS)
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
