"""The connector's CUDA path, on a vLLM-shaped FlashAttention cache built with torch.

vLLM cannot run on the GPU machine, so this drives the connector's own transfer code
(``ucm.connector.vllm.paged``: the page views, the pinned staging pool and the device copies)
the way the connector does: copy out on a side stream after the compute, dump, load into pinned
staging, copy in on the compute stream.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from ucm.store.transfer import cuda_available  # noqa: E402

if not torch.cuda.is_available() or not cuda_available():
    pytest.skip("needs a CUDA GPU and ucm-store built with the CUDA path", allow_module_level=True)

from ucm.connector.vllm.paged import PagedKV, StagingPool  # noqa: E402
from ucm.store import open_store  # noqa: E402

LAYERS, BLOCKS, TOKENS, HEADS, DIM = 4, 64, 16, 8, 128


def flash_caches(fill: str) -> dict[str, torch.Tensor]:
    """Per layer [2, blocks, tokens, heads, dim] bf16, as vLLM's FlashAttention backend allocates it."""
    caches = {}
    for layer in range(LAYERS):
        shape = (2, BLOCKS, TOKENS, HEADS, DIM)
        if fill == "random":
            caches[f"model.layers.{layer}.self_attn.attn"] = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        else:
            caches[f"model.layers.{layer}.self_attn.attn"] = torch.full(
                shape, float("nan"), device="cuda", dtype=torch.bfloat16
            )
    return caches


@pytest.mark.parametrize("chunk", [16, 8])
def test_chunks_round_trip_through_the_store_into_a_fresh_engine_cache(tmp_path, chunk):
    source = flash_caches("random")
    paged = PagedKV(source, "flash", chunk)
    assert paged.on_device and paged.geometry.device == "cuda"
    pool = StagingPool(paged)
    blocks = [5, 9, 40, 63, 0]
    within = [0, TOKENS // chunk - 1, 0, 0, TOKENS // chunk - 1]
    staging, buffer = pool.take(len(blocks))
    assert buffer.is_pinned()

    # Copy out as a save does: on a side stream, after the compute queued on the current stream.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    paged.copy_async(True, blocks, within, staging, side)
    copied = torch.cuda.Event()
    copied.record(side)
    copied.synchronize()
    ids = [f"chunk-{chunk}-{i}".encode() for i in range(len(blocks))]
    with open_store("posix", {"root": str(tmp_path / "store")}) as store:
        store.wait(store.dump(ids, paged.chunk_buffers(staging)))
        pool.give(buffer)

        # A fresh cache (NaN everywhere) loads the chunks as a warm engine does.
        target = flash_caches("nan")
        fresh = PagedKV(target, "flash", chunk)
        fresh_pool = StagingPool(fresh)
        loaded, loaded_buffer = fresh_pool.take(len(blocks))
        store.wait(store.load(ids, fresh.chunk_buffers(loaded)))
    fresh.copy_async(False, blocks, within, loaded, torch.cuda.current_stream())
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream())
    fresh_pool.give(loaded_buffer, done)
    torch.cuda.synchronize()

    for name in source:
        src, dst = source[name], target[name]
        for block, c in zip(blocks, within, strict=True):
            window = slice(c * chunk, (c + 1) * chunk)
            assert torch.equal(dst[:, block, window], src[:, block, window])
        untouched = torch.ones(BLOCKS, TOKENS, dtype=torch.bool, device="cuda")
        for block, c in zip(blocks, within, strict=True):
            untouched[block, c * chunk : (c + 1) * chunk] = False
        assert dst.permute(1, 2, 0, 3, 4)[untouched].isnan().all(), "the copy in wrote outside its chunks"


def test_staging_is_not_reused_before_its_device_copy_is_over():
    paged = PagedKV(flash_caches("random"), "flash", TOKENS)
    pool = StagingPool(paged)
    staging, buffer = pool.take(2)
    stream = torch.cuda.Stream()
    torch.cuda._sleep(50_000_000)  # keep the default stream busy so the copy is still queued
    stream.wait_stream(torch.cuda.current_stream())
    paged.copy_async(True, [1, 2], [0, 0], staging, stream)
    busy = torch.cuda.Event()
    busy.record(stream)
    pool.give(buffer, busy)
    again, again_buffer = pool.take(2)
    assert again_buffer.data_ptr() == buffer.data_ptr()
    assert busy.query(), "take() handed out a buffer a device copy was still writing"


def test_layer_by_layer_copy_in_is_complete_for_each_layer_once_it_is_waited_for(tmp_path):
    from ucm.connector.vllm.paged import LayerwiseCopyIn

    source = flash_caches("random")
    paged = PagedKV(source, "flash", TOKENS)
    blocks, within = [3, 17, 60], [0, 0, 0]
    staging, _ = StagingPool(paged).take(len(blocks))
    paged.copy_async(True, blocks, within, staging, torch.cuda.current_stream())
    torch.cuda.synchronize()

    target = flash_caches("nan")
    fresh = PagedKV(target, "flash", TOKENS)
    copy_in = LayerwiseCopyIn(fresh, torch.cuda.Stream(priority=-1))
    torch.cuda._sleep(20_000_000)  # compute queued before the load: the copies must wait for it
    last = copy_in.start(blocks, within, staging)
    for name in fresh.layer_names:
        copy_in.wait_layer(name)
        # Read on the current stream, as the layer's attention would.
        got = target[name][:, blocks].clone()
        torch.cuda.current_stream().synchronize()
        assert torch.equal(got, source[name][:, blocks]), f"{name} read before its copy was over"
    last.synchronize()
    copy_in.wait_all()  # nothing left to wait for
