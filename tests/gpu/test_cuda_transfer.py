"""The CUDA transfer path against torch, on vLLM-shaped paged caches in device memory.

Every layout vLLM 0.32 gives a CUDA attention backend is built here with torch: FlashAttention's
``NHD`` pages (``[2, blocks, tokens, heads, dim]`` per layer), the ``HND`` pages of FlashInfer
(``[blocks, 2, heads, tokens, dim]``) and MLA's single latent plane (``[blocks, tokens, 576]``).
Host buffers and destination caches are filled with random bytes before each copy, so an element
the kernel fails to write shows.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from ucm.store.transfer import PagedGeometry, copy_chunks_cuda, cuda_available  # noqa: E402

if not torch.cuda.is_available() or not cuda_available():
    pytest.skip("needs a CUDA GPU and ucm-store built with the CUDA path", allow_module_level=True)

LAYERS, BLOCKS, TOKENS = 3, 40, 16


def make_cache(layout: str, dtype, heads: int = 4, dim: int = 64):
    """(per-layer tensors, per-layer (K, V) views [blocks, heads, tokens, dim]; V None for MLA)."""
    tensors, views = [], []
    for _ in range(LAYERS):
        if layout == "NHD":
            t = random_tensor((2, BLOCKS, TOKENS, heads, dim), dtype)
            views.append((t[0].permute(0, 2, 1, 3), t[1].permute(0, 2, 1, 3)))
        elif layout == "HND":
            t = random_tensor((BLOCKS, 2, heads, TOKENS, dim), dtype)
            views.append((t[:, 0], t[:, 1]))
        elif layout == "MLA":
            t = random_tensor((BLOCKS, TOKENS, dim), dtype)
            views.append((t.unsqueeze(1), None))
        else:
            raise ValueError(layout)
        tensors.append(t)
    return tensors, views


def random_tensor(shape, dtype):
    raw = torch.randint(
        0,
        256,
        (torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size(),),
        dtype=torch.uint8,
        device="cuda",
    )
    return raw.view(dtype).view(shape)


def geometry(views, chunk: int) -> PagedGeometry:
    key, value = views[0]
    return PagedGeometry(
        keys=[k.data_ptr() for k, _ in views],
        values=[v.data_ptr() for _, v in views] if value is not None else [],
        key_strides=tuple(key.stride()),
        value_strides=tuple((value if value is not None else key).stride()),
        elem_bytes=key.element_size(),
        heads=key.shape[1],
        head_size=key.shape[3],
        chunk_tokens=chunk,
        device="cuda",
    )


def expected(views, blocks, offsets, chunk, layers=None) -> torch.Tensor:
    """The chunk format, by torch: [layers][planes][chunks][heads][tokens][dim], as bytes."""
    parts = []
    for key, value in views[slice(*layers) if layers else slice(None)]:
        for plane in (key, value) if value is not None else (key,):
            for block, first in zip(blocks, offsets, strict=True):
                parts.append(plane[block, :, first : first + chunk].contiguous().view(torch.uint8).flatten())
    return torch.cat(parts).cpu()


def pinned_random(nbytes: int) -> torch.Tensor:
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8).pin_memory()


DTYPES = [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float32]
CASES = [(layout, dtype) for layout in ("NHD", "HND", "MLA") for dtype in DTYPES]


WAYS = ["copy-engine", "kernel"]


@pytest.mark.parametrize(("layout", "dtype"), CASES, ids=[f"{lay}-{str(d).split('.')[-1]}" for lay, d in CASES])
@pytest.mark.parametrize("chunk", [16, 8])
@pytest.mark.parametrize("way", WAYS)
def test_gather_then_scatter_match_torch(layout, dtype, chunk, way):
    dim = 576 if layout == "MLA" else 64
    _, views = make_cache(layout, dtype, dim=dim)
    g = geometry(views, chunk)
    generator = torch.Generator().manual_seed(7)
    blocks = torch.randperm(BLOCKS, generator=generator)[:9].tolist()
    offsets = [chunk * int(i) for i in torch.randint(0, TOKENS // chunk, (9,), generator=generator)]
    want = expected(views, blocks, offsets, chunk)

    host = pinned_random(want.numel())
    copy_chunks_cuda(True, g, blocks, offsets, host.data_ptr(), way=way)
    torch.cuda.synchronize()
    assert torch.equal(host, want), "gather differs from torch indexing"

    # Scatter into a second cache of random bytes: the chunks change, nothing else does.
    tensors, target = make_cache(layout, dtype, dim=dim)
    before = [t.clone() for t in tensors]
    copy_chunks_cuda(False, geometry(target, chunk), blocks, offsets, host.data_ptr(), way=way)
    torch.cuda.synchronize()
    assert torch.equal(expected(target, blocks, offsets, chunk), want), "scatter did not land the chunks"
    for layer, (t, old) in enumerate(zip(tensors, before, strict=True)):
        changed = (t.view(torch.uint8) != old.view(torch.uint8)).nonzero()
        allowed = expected_mask(layout, t, blocks, offsets, chunk)
        assert allowed[tuple(changed.T)].all(), f"scatter wrote outside the chunks in layer {layer}"


def expected_mask(layout, tensor, blocks, offsets, chunk):
    """Bytes of ``tensor`` (as uint8) that belong to the chunks."""
    mask = torch.zeros(tensor.view(torch.uint8).shape, dtype=torch.bool, device="cuda")
    for block, first in zip(blocks, offsets, strict=True):
        window = slice(first, first + chunk)
        if layout == "NHD":
            mask[:, block, window] = True
        elif layout == "HND":
            mask[block, :, :, window] = True
        else:
            mask[block, window] = True
    return mask


@pytest.mark.parametrize("way", WAYS)
def test_a_layer_range_moves_only_its_slice(way):
    _, views = make_cache("NHD", torch.bfloat16)
    g = geometry(views, TOKENS)
    blocks, offsets = [3, 17, 29], [0, 0, 0]
    whole = expected(views, blocks, offsets, TOKENS)
    per_layer = whole.numel() // LAYERS
    host = pinned_random(whole.numel())
    before = host.clone()
    copy_chunks_cuda(True, g, blocks, offsets, host.data_ptr(), layers=(1, 2), max_blocks=2, way=way)
    torch.cuda.synchronize()
    assert torch.equal(host[per_layer : 2 * per_layer], whole[per_layer : 2 * per_layer])
    assert torch.equal(host[:per_layer], before[:per_layer]) and torch.equal(
        host[2 * per_layer :], before[2 * per_layer :]
    )


@pytest.mark.parametrize("to_host", [True, False], ids=["out", "in"])
def test_transfers_larger_than_the_ring_go_round_it(to_host):
    """The copy-engine way stages through 64 MiB of device slots: 88 MB takes more than one lap."""
    caches = [random_tensor((2, 500, TOKENS, 8, 128), torch.bfloat16) for _ in range(LAYERS)]
    views = [(t[0].permute(0, 2, 1, 3), t[1].permute(0, 2, 1, 3)) for t in caches]
    blocks = torch.randperm(500)[:450].tolist()
    offsets = [0] * len(blocks)
    want = expected(views, blocks, offsets, TOKENS)
    assert want.numel() > 64 << 20
    if to_host:
        host = pinned_random(want.numel())
        copy_chunks_cuda(
            True, geometry(views, TOKENS), blocks, offsets, host.data_ptr(), stream=torch.cuda.Stream().cuda_stream
        )
        torch.cuda.synchronize()
        assert torch.equal(host, want)
    else:
        targets = [random_tensor((2, 500, TOKENS, 8, 128), torch.bfloat16) for _ in range(LAYERS)]
        target_views = [(t[0].permute(0, 2, 1, 3), t[1].permute(0, 2, 1, 3)) for t in targets]
        copy_chunks_cuda(False, geometry(target_views, TOKENS), blocks, offsets, want.pin_memory().data_ptr())
        torch.cuda.synchronize()
        assert torch.equal(expected(target_views, blocks, offsets, TOKENS), want)


def test_rows_not_a_multiple_of_16_bytes():
    """Odd head sizes fall back to narrower accesses and still move every byte."""
    _, views = make_cache("NHD", torch.float16, heads=3, dim=37)
    blocks, offsets = [1, 2, 39], [0, 0, 0]
    want = expected(views, blocks, offsets, TOKENS)
    host = pinned_random(want.numel())
    copy_chunks_cuda(True, geometry(views, TOKENS), blocks, offsets, host.data_ptr())
    torch.cuda.synchronize()
    assert torch.equal(host, want)


def test_round_trip_of_a_paged_cache_through_the_store(tmp_path):
    from ucm.store import open_store

    _, views = make_cache("NHD", torch.bfloat16, heads=8, dim=128)
    g = geometry(views, TOKENS)
    blocks = list(range(0, BLOCKS, 3))
    offsets = [0] * len(blocks)
    chunk_bytes = LAYERS * 2 * 8 * TOKENS * 128 * 2
    host = pinned_random(chunk_bytes * len(blocks))
    copy_chunks_cuda(True, g, blocks, offsets, host.data_ptr())
    torch.cuda.synchronize()
    # Staging is [layers][K, V][chunks][...]: chunk i's bytes are its slice of every (layer, plane).
    slabs = host.view(LAYERS * 2, len(blocks), -1)
    ids = [f"chunk-{i}".encode() for i in range(len(blocks))]
    with open_store("posix", {"root": str(tmp_path / "store")}) as store:
        store.wait(store.dump(ids, [list(slabs[:, i]) for i in range(len(blocks))]))
        loaded = pinned_random(host.numel())
        loaded_slabs = loaded.view(LAYERS * 2, len(blocks), -1)
        store.wait(store.load(ids, [list(loaded_slabs[:, i]) for i in range(len(blocks))]))
    assert torch.equal(loaded, host)
    tensors, target = make_cache("NHD", torch.bfloat16, heads=8, dim=128)
    copy_chunks_cuda(False, geometry(target, TOKENS), blocks, offsets, loaded.data_ptr())
    torch.cuda.synchronize()
    for (k, v), (k2, v2) in zip(views, target, strict=True):
        assert torch.equal(k[blocks].view(torch.uint8), k2[blocks].view(torch.uint8))
        assert torch.equal(v[blocks].view(torch.uint8), v2[blocks].view(torch.uint8))
