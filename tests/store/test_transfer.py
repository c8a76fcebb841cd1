"""The host transfer path: chunks between a paged cache and the store, checked element by element.

A paged cache here is a numpy array per layer, laid out as vLLM lays out its CPU cache (per block
and head, K transposed ``[dim, token]`` then V ``[token, dim]``; or, on CPUs with AMX tiles,
packed in 16-token and 16-dim groups) or its FlashAttention cache (``[2, blocks, tokens, heads,
dim]``). Chunks are gathered out of one cache, dumped to a
``posix`` or ``redis`` store and loaded straight into another cache (``load_into``), or through a
staging buffer with ``scatter_chunks``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from storetest import block_files, block_ids, supports_o_direct

from ucm.store import StoreError
from ucm.store.transfer import PagedGeometry, gather_chunks, paged_target, scatter_chunks

LAYERS, BLOCKS, HEADS, TOKENS, DIM = 3, 7, 2, 32, 16


class AmxView:
    """K or V [blocks, heads, tokens, dim] of vLLM's CPU pages packed for AMX tiles, read afresh from
    the backing array at each indexing: per (block, head), K is [tokens/16][dim/2][16][2] and V
    [dim/16][tokens/2][16][2] (numpy cannot view that as one strided array)."""

    def __init__(self, flat: np.ndarray, kv: int, tokens: int):
        self.flat, self.kv, self.tokens = flat, kv, tokens
        self.shape = (BLOCKS, HEADS, tokens, DIM)

    def array(self) -> np.ndarray:
        n = self.tokens
        if self.kv == 0:
            packed = self.flat[:, :, : n * DIM].reshape(BLOCKS, HEADS, n // 16, DIM // 2, 16, 2)
            return packed.transpose(0, 1, 2, 4, 3, 5).reshape(self.shape)
        packed = self.flat[:, :, n * DIM :].reshape(BLOCKS, HEADS, DIM // 16, n // 2, 16, 2)
        return packed.transpose(0, 1, 3, 5, 2, 4).reshape(self.shape)

    def __getitem__(self, index):
        return self.array()[index]


def make_cache(layout: str, dtype, seed: int | None, tokens: int = TOKENS):
    """Per layer: (backing array, K view, V view); views are [blocks, heads, tokens, dim]."""
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(LAYERS):
        if layout == "cpu-amx":
            backing = np.zeros((BLOCKS, HEADS, tokens, 2 * DIM), dtype)
            flat = backing.reshape(BLOCKS, HEADS, 2 * tokens * DIM)
            key, value = AmxView(flat, 0, tokens), AmxView(flat, 1, tokens)
        elif layout == "cpu":
            backing = np.zeros((BLOCKS, HEADS, tokens, 2 * DIM), dtype)
            flat = backing.reshape(BLOCKS, HEADS, 2 * tokens * DIM)
            key = flat[:, :, : tokens * DIM].reshape(BLOCKS, HEADS, DIM, tokens).transpose(0, 1, 3, 2)
            value = flat[:, :, tokens * DIM :].reshape(BLOCKS, HEADS, tokens, DIM)
        else:
            backing = np.zeros((2, BLOCKS, tokens, HEADS, DIM), dtype)
            key, value = backing[0].transpose(0, 2, 1, 3), backing[1].transpose(0, 2, 1, 3)
        if seed is not None:
            backing[...] = rng.standard_normal(backing.shape).astype(dtype)
        layers.append((backing, key, value))
    return layers


def geometry(layers, chunk: int) -> PagedGeometry:
    backing, key, value = layers[0]
    if isinstance(key, AmxView):
        item, page = backing.itemsize, 2 * key.tokens * DIM
        return PagedGeometry(
            keys=[b.ctypes.data for b, _, _ in layers],
            values=[b.ctypes.data + key.tokens * DIM * item for b, _, _ in layers],
            key_strides=(HEADS * page, page, 0, 0),
            value_strides=(HEADS * page, page, 0, 0),
            elem_bytes=item,
            heads=HEADS,
            head_size=DIM,
            chunk_tokens=chunk,
            packing="amx",
            block_tokens=key.tokens,
        )
    item = key.itemsize
    return PagedGeometry(
        keys=[k.ctypes.data for _, k, _ in layers],
        values=[v.ctypes.data for _, _, v in layers],
        key_strides=tuple(s // item for s in key.strides),
        value_strides=tuple(s // item for s in value.strides),
        elem_bytes=item,
        heads=HEADS,
        head_size=DIM,
        chunk_tokens=chunk,
    )


def expected_chunk(layers, block: int, first_token: int, chunk: int) -> bytes:
    """The chunk format: [layers][K, V][heads][chunk tokens][dim], C-contiguous."""
    window = slice(first_token, first_token + chunk)
    parts = [np.ascontiguousarray(view[block, :, window]) for _, k, v in layers for view in (k, v)]
    return b"".join(part.tobytes() for part in parts)


def assert_moved_exactly(source, target, blocks, offsets, chunk, skip=()):
    """The target holds the source's chunks at (blocks, offsets), except `skip`, and zeros elsewhere."""
    for (_, src_k, src_v), (_, dst_k, dst_v) in zip(source, target, strict=True):
        for src, dst in ((src_k, dst_k), (src_v, dst_v)):
            written = np.zeros(dst.shape, bool)
            for i, (block, first) in enumerate(zip(blocks, offsets, strict=True)):
                if i in skip:
                    continue
                window = slice(first, first + chunk)
                np.testing.assert_array_equal(dst[block, :, window], src[block, :, window])
                written[block, :, window] = True
            assert not dst[~written].any(), "bytes landed outside the chunks loaded"


CASES = [
    # (layout, dtype, chunk, block tokens): in the cpu layout, chunks of 8k tokens of 16-bit
    # elements and of 4k tokens of 32-bit ones take the vector transpose, which writes K into the
    # cache in bands of at most 256 tokens, each row with streaming stores where it is 16-byte
    # aligned and at least 64 bytes, with a plain copy elsewhere (36-token blocks: 16-bit rows
    # 72 bytes apart, some chunks 8 bytes in; 4-token fp32 chunks: rows of 16 bytes). 6-token fp32
    # chunks take the element-by-element loop.
    ("cpu", np.float16, 8, TOKENS),
    ("cpu", np.float16, 32, 36),
    ("cpu", np.float16, 32, TOKENS),
    ("cpu", np.float16, 4, TOKENS),
    ("cpu", np.float16, 520, 1040),
    ("cpu", np.float32, 8, TOKENS),
    ("cpu", np.float32, 520, 1040),
    ("cpu", np.float32, 4, 36),
    ("cpu", np.float32, 6, 36),
    ("flash", np.float16, 8, TOKENS),
    ("flash", np.float32, 32, TOKENS),
    # vLLM's bf16 pages on CPUs with AMX tiles (moved as opaque 16-bit words): K's 16-token groups
    # go through the 32-bit vector transpose, V's 16-dim groups are split into even and odd tokens.
    ("cpu-amx", np.float16, 16, TOKENS),
    ("cpu-amx", np.float16, 32, 128),
    ("cpu-amx", np.float16, 128, 128),
]


@pytest.mark.parametrize("kind", ["posix", "posix+shm", "redis"])
@pytest.mark.parametrize(("layout", "dtype", "chunk", "tokens"), CASES)
def test_chunks_load_straight_into_another_cache(open_test_store, request, layout, dtype, chunk, tokens, kind):
    if kind == "redis":
        request.getfixturevalue("redis_server")
    source = make_cache(layout, dtype, seed=1, tokens=tokens)
    blocks = [5, 1, 3, 6]
    offsets = [0, tokens - chunk, chunk * (tokens // chunk // 2), 0]
    staging = np.zeros(len(blocks) * LAYERS * 2 * HEADS * chunk * DIM, dtype)
    gather_chunks(geometry(source, chunk), blocks, offsets, staging.ctypes.data)
    # Staging is [layers][K, V][chunks][heads][tokens][dim]; chunk i's stored bytes are its slices.
    per_chunk = staging.reshape(LAYERS * 2, len(blocks), -1)
    for i, (block, first) in enumerate(zip(blocks, offsets, strict=True)):
        assert per_chunk[:, i].tobytes() == expected_chunk(source, block, first, chunk)

    store = open_test_store(kind)
    ids = block_ids(len(blocks), f"{layout}-{chunk}")
    store.wait(store.dump(ids, [list(per_chunk[:, i]) for i in range(len(blocks))]))

    if kind == "posix+shm":
        store.wait_shared_memory()  # the copies are made in the background
    target = make_cache(layout, dtype, seed=None, tokens=tokens)
    into = paged_target(geometry(target, chunk), blocks, offsets)
    assert len(into) == len(blocks) and into.chunk_bytes == per_chunk[:, 0].nbytes
    assert store.can_load_into
    store.wait(store.load_into(ids, into))
    assert_moved_exactly(source, target, blocks, offsets, chunk)
    if kind == "posix+shm":  # served from the shared tier's copies of the files
        assert store.shared_memory_stats()["hits"] == len(blocks)

    # The staging path puts the same bytes in the same places.
    staged = make_cache(layout, dtype, seed=None, tokens=tokens)
    scatter_chunks(geometry(staged, chunk), blocks, offsets, staging.ctypes.data)
    for (a, _, _), (b, _, _) in zip(target, staged, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("direct_io", [False, True], ids=["buffered", "O_DIRECT"])
def test_a_damaged_chunk_fails_by_id_and_the_others_land(open_test_store, tmp_path, direct_io):
    if direct_io and not supports_o_direct(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    chunk = 8
    source = make_cache("cpu", np.float16, seed=2)
    blocks, offsets = [0, 2, 4], [0, 8, 16]
    staging = np.zeros(len(blocks) * LAYERS * 2 * HEADS * chunk * DIM, np.float16)
    gather_chunks(geometry(source, chunk), blocks, offsets, staging.ctypes.data)
    per_chunk = staging.reshape(LAYERS * 2, len(blocks), -1)
    store = open_test_store("posix", direct_io=direct_io)
    ids = block_ids(len(blocks), f"damaged-{direct_io}")
    store.wait(store.dump(ids, [list(per_chunk[:, i]) for i in range(len(blocks))]))
    (damaged,) = block_files(Path(store.config["root"]), ids[1])
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x20
    damaged.write_bytes(bytes(data))

    target = make_cache("cpu", np.float16, seed=None)
    with pytest.raises(StoreError, match="checksum") as failure:
        store.wait(store.load_into(ids, paged_target(geometry(target, chunk), blocks, offsets)))
    assert failure.value.ids == [ids[1]]
    # The good chunks landed; the damaged one may have left bytes in its place (the caller recomputes it).
    for (_, src_k, src_v), (_, dst_k, dst_v) in zip(source, target, strict=True):
        for src, dst in ((src_k, dst_k), (src_v, dst_v)):
            for i in (0, 2):
                window = slice(offsets[i], offsets[i] + chunk)
                np.testing.assert_array_equal(dst[blocks[i], :, window], src[blocks[i], :, window])


def test_load_into_checks_its_arguments(open_test_store):
    target = make_cache("cpu", np.float16, seed=None)
    into = paged_target(geometry(target, 8), [0, 1], [0, 0])
    store = open_test_store("posix")
    with pytest.raises(ValueError, match="got 3 ids but the target holds 2 chunks"):
        store.load_into(block_ids(3, "count"), into)
    sized = open_test_store("posix", shard_bytes=into.chunk_bytes + 2)
    with pytest.raises(ValueError, match=f"target's chunks hold {into.chunk_bytes} bytes but shard_bytes"):
        sized.load_into(block_ids(2, "size"), into)
    with pytest.raises(ValueError, match="blocks and token_offsets differ in length"):
        paged_target(geometry(target, 8), [0, 1], [0])
    with pytest.raises(StoreError, match="not found"):
        store.wait(store.load_into(block_ids(2, "absent"), into))


@pytest.mark.parametrize("kind", ["memory", "example-dict"])
def test_stores_without_direct_loads_say_so(open_test_store, kind):
    store = open_test_store(kind)
    assert not store.can_load_into
    with pytest.raises(NotImplementedError, match="cannot load straight into a paged cache"):
        store.load_into(block_ids(1, kind), None)


class _FakeCudaBuffer:
    """Claims to live on a CUDA device, as a tensor exporting __cuda_array_interface__ does."""

    __cuda_array_interface__ = {"data": (0x10000, False), "shape": (256,), "typestr": "<f2", "version": 3}


def test_a_cuda_buffer_without_a_gpu_gets_an_error_naming_cuda(open_test_store):
    from ucm.store.transfer import cuda_available

    if cuda_available():
        pytest.skip("a GPU is present: tests/gpu covers device buffers")
    store = open_test_store("posix")
    with pytest.raises((RuntimeError, ValueError), match="CUDA"):
        store.dump([b"device"], [_FakeCudaBuffer()])


def test_the_amx_packing_names_what_it_cannot_take():
    layers = make_cache("cpu-amx", np.float16, seed=None)
    staging = np.zeros(LAYERS * 2 * HEADS * 16 * DIM, np.float16)
    amx = geometry(layers, 16)
    with pytest.raises(ValueError, match="token offset 8 is not a multiple of 16"):
        gather_chunks(amx, [0], [8], staging.ctypes.data)
    with pytest.raises(ValueError, match=r"token offset 32 \+ chunk_tokens 16 runs past the block's 32 tokens"):
        paged_target(amx, [0], [32])
    with pytest.raises(ValueError, match="16-bit elements, got elem_bytes 4"):
        gather_chunks(replace(amx, elem_bytes=4), [0], [0], staging.ctypes.data)
    with pytest.raises(ValueError, match="multiples of 16, got 8"):
        gather_chunks(replace(amx, chunk_tokens=8), [0], [0], staging.ctypes.data)
    with pytest.raises(ValueError, match="unknown page packing 'vnni'"):
        gather_chunks(replace(amx, packing="vnni"), [0], [0], staging.ctypes.data)
    with pytest.raises(ValueError, match="exists only in host memory"):
        gather_chunks(replace(amx, device="cuda"), [0], [0], staging.ctypes.data)
