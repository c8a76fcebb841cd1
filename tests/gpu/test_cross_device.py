"""Unlike engines meeting in the store: a CPU engine's cache (vLLM's CPU layout, block size 128) saves a
prompt's chunks; a CUDA engine's cache (FlashAttention layout, block size 32) loads them, through the
connector's own transfer code on each side. Every K and V element of every token must arrive.

This is the heterogeneous PD path (prefill on one kind of hardware, decode on another) below vLLM:
vLLM does not run on the GPU machine, so both caches are vLLM-shaped tensors built with torch.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from ucm.store.transfer import cuda_available  # noqa: E402

if not torch.cuda.is_available() or not cuda_available():
    pytest.skip("needs a CUDA GPU and ucm-store built with the CUDA path", allow_module_level=True)

from ucm.connector.vllm.paged import PagedKV, StagingPool  # noqa: E402
from ucm.store import open_store  # noqa: E402

LAYERS, HEADS, DIM, CHUNK = 4, 8, 128, 32
CPU_BLOCK, GPU_BLOCK, CPU_BLOCKS, GPU_BLOCKS = 128, 32, 12, 48


def cpu_caches() -> dict[str, torch.Tensor]:
    """vLLM's CPU layout per layer: [blocks, heads, block tokens, 2 * dim], K then V (K transposed per block)."""
    return {
        f"model.layers.{n}.self_attn.attn": torch.randn(CPU_BLOCKS, HEADS, CPU_BLOCK, 2 * DIM).to(torch.bfloat16)
        for n in range(LAYERS)
    }


def gpu_caches() -> dict[str, torch.Tensor]:
    """FlashAttention's layout per layer: [2, blocks, block tokens, heads, dim], NaN until written."""
    shape = (2, GPU_BLOCKS, GPU_BLOCK, HEADS, DIM)
    return {
        f"model.layers.{n}.self_attn.attn": torch.full(shape, float("nan"), device="cuda", dtype=torch.bfloat16)
        for n in range(LAYERS)
    }


def token_kv(paged: PagedKV, layer: str, block: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [heads, dim] of one token, read through the connector's own views of the cache."""
    key, value = paged.views[paged.layer_names.index(layer)]
    return key[block, :, offset].float().cpu(), value[block, :, offset].float().cpu()


def test_a_cpu_engines_chunks_load_into_a_cuda_engines_cache(tmp_path):
    tokens = 9 * CHUNK  # a prompt's full chunks: 2 CPU blocks and a quarter, 9 GPU blocks
    cpu = PagedKV(cpu_caches(), "cpu", CHUNK)
    assert not cpu.on_device
    cpu_blocks = [7, 2, 10]  # the CPU engine's block table for the prompt
    cpu_targets = [(cpu_blocks[t // CPU_BLOCK], (t % CPU_BLOCK) // CHUNK) for t in range(0, tokens, CHUNK)]
    staging = torch.empty(cpu.staging_shape(len(cpu_targets)), dtype=cpu.dtype)
    cpu.gather([b for b, _ in cpu_targets], [c for _, c in cpu_targets], staging)
    ids = [f"prompt-chunk-{n}".encode() for n in range(len(cpu_targets))]
    with open_store("posix", {"root": str(tmp_path / "store")}) as store:
        store.wait(store.dump(ids, cpu.chunk_buffers(staging)))

        gpu = PagedKV(gpu_caches(), "flash", CHUNK)
        assert gpu.on_device
        gpu_blocks = [40, 3, 17, 0, 22, 31, 8, 47, 12]  # the CUDA engine's block table, one chunk per block
        pool = StagingPool(gpu)
        loaded, buffer = pool.take(len(ids))
        store.wait(store.load(ids, gpu.chunk_buffers(loaded)))
    gpu.copy_async(False, gpu_blocks, [0] * len(ids), loaded, torch.cuda.current_stream())
    torch.cuda.synchronize()
    pool.give(buffer)

    for layer in cpu.layer_names:
        for t in range(tokens):
            cpu_k, cpu_v = token_kv(cpu, layer, cpu_blocks[t // CPU_BLOCK], t % CPU_BLOCK)
            gpu_k, gpu_v = token_kv(gpu, layer, gpu_blocks[t // GPU_BLOCK], t % GPU_BLOCK)
            assert torch.equal(gpu_k, cpu_k) and torch.equal(gpu_v, cpu_v), f"{layer}, token {t}"
