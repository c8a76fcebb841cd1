"""Moving chunks between the engine's paged KV cache and the store's chunk format.

The chunk format (docs/format.md): one chunk of C tokens of one tensor-parallel shard is
``[layers, 2 (K, V), heads of the shard, C, head_size]`` in the cache dtype, C-contiguous, layers
in model order. The engine's page layout does not reach the store: each layout is viewed here as
K and V tensors ``[blocks, heads, block_tokens, head_size]``, and the host transfer path of
``ucm.store.transfer`` copies chunks through those strides in one native pass.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ucm.store.transfer import (
    PagedGeometry,
    copy_chunks_ascend,
    copy_chunks_cuda,
    gather_chunks,
    paged_target,
    scatter_chunks,
)

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _layer_order(name: str) -> tuple[int, str]:
    match = _LAYER_INDEX.search(name)
    return (int(match.group(1)) if match else -1, name)


def kv_views(cache, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V views ``[blocks, heads, block_tokens, head_size]`` of one layer's paged cache."""
    if layout == "split":
        # vllm-ascend: separate K and V tensors per layer, each [blocks, block_tokens, heads, head_size].
        if len(cache) != 2 or any(t.dim() != 4 for t in cache):
            raise ValueError(
                "UcmConnector: expected a (K, V) pair of [blocks, tokens, heads, head_size] tensors per layer, got "
                f"{[tuple(t.shape) for t in cache]}"
            )
        return cache[0].permute(0, 2, 1, 3), cache[1].permute(0, 2, 1, 3)
    if layout == "cpu":
        # [blocks, heads, block_tokens, 2 * head_size]; per (block, head): K transposed [D, N], then V [N, D].
        blocks, heads, tokens, double = cache.shape
        dim = double // 2
        bs, hs, _, _ = cache.stride()
        offset = cache.storage_offset()
        key = cache.as_strided((blocks, heads, tokens, dim), (bs, hs, 1, tokens), offset)
        value = cache.as_strided((blocks, heads, tokens, dim), (bs, hs, dim, 1), offset + tokens * dim)
        return key, value
    if layout == "flash":
        # [2, blocks, block_tokens, heads, head_size] (per token K and V), whatever its strides.
        if cache.dim() != 5 or cache.shape[0] != 2:
            raise ValueError(
                f"UcmConnector: expected a FlashAttention-style KV cache [2, blocks, tokens, heads, head_size], "
                f"got shape {tuple(cache.shape)}"
            )
        return cache[0].permute(0, 2, 1, 3), cache[1].permute(0, 2, 1, 3)
    raise ValueError(f"UcmConnector: unsupported KV cache layout {layout!r}")


def cpu_page_packing(dtype: torch.dtype, block_tokens: int, head_size: int, kv_cache_dtype: str = "auto") -> str:
    """How vLLM's CPU attention packs its pages, asked as its metadata builder asks (the model's
    ``dtype`` and the cache config's ``kv_cache_dtype``): "amx" where it picks its AMX kernels (bf16
    on CPUs with AMX tiles), else "strided" (the ``cpu`` layout of :func:`kv_views`)."""
    try:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        isa = _get_attn_isa(dtype, block_tokens, head_size, kv_cache_dtype)
    except (ImportError, TypeError):  # the rule of vLLM 0.32, should the function move or change
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        isa = "amx" if amx and dtype == torch.bfloat16 and block_tokens % 32 == 0 else "vec"
    return "amx" if isa == "amx" else "strided"


class PagedKV:
    """The engine's KV cache, layer by layer, with gather and scatter of whole chunks.

    ``views`` are K and V ``[blocks, heads, block_tokens, head_size]`` per layer. ``packing`` (for vLLM's CPU
    cache, what :func:`cpu_page_packing` says): see ``ucm.store.transfer.PagedGeometry``. With "amx" only the views'
    block and head strides are right: inside a page the tokens and dims are packed
    (docs/format.md), and only the transfer path knows how."""

    def __init__(self, kv_caches: Mapping[str, torch.Tensor], layout: str, chunk_tokens: int, packing: str = "strided"):
        self.layer_names = sorted(kv_caches, key=_layer_order)
        self.views = [kv_views(kv_caches[name], layout) for name in self.layer_names]
        key = self.views[0][0]
        self.block_tokens = key.shape[2]
        self.heads = key.shape[1]
        self.head_size = key.shape[3]
        self.dtype = key.dtype
        if self.block_tokens % chunk_tokens != 0:
            raise ValueError(
                f"UcmConnector: chunk_tokens {chunk_tokens} must divide the engine's block size {self.block_tokens}"
            )
        self.packing = packing
        if packing != "strided" and (layout != "cpu" or key.device.type != "cpu"):
            raise ValueError(f"UcmConnector: page packing {packing!r} exists only in vLLM's CPU cache")
        if packing == "amx" and key.element_size() != 2:
            raise ValueError(
                f"UcmConnector: vLLM packs this CPU cache ({self.dtype}) for AMX tiles, which UcmConnector converts "
                "only for 16-bit elements (a bf16 cache); run without a quantized KV cache here"
            )
        if packing == "amx" and chunk_tokens % 16 != 0:
            raise ValueError(
                f"UcmConnector: vLLM packs this CPU cache for AMX tiles in groups of 16 tokens; chunk_tokens "
                f"{chunk_tokens} must be a multiple of 16 here"
            )
        self.chunk_tokens = chunk_tokens
        self.chunks_per_block = self.block_tokens // chunk_tokens
        self.piece_bytes = self.heads * chunk_tokens * self.head_size * key.element_size()
        self.chunk_bytes = 2 * len(self.views) * self.piece_bytes
        strides = {(k.stride(), v.stride()) for k, v in self.views}
        devices = {k.device for k, _ in self.views}
        if len(strides) != 1 or len(devices) != 1:
            raise ValueError("UcmConnector: every layer's KV cache must share one page layout on one device")
        self.device = devices.pop()
        if self.device.type not in ("cpu", "cuda", "npu"):
            raise ValueError(f"UcmConnector: no transfer path for KV caches on {self.device.type!r}")
        key_strides, value_strides = strides.pop()
        self.geometry = PagedGeometry(
            keys=[k.data_ptr() for k, _ in self.views],
            values=[v.data_ptr() for _, v in self.views],
            key_strides=key_strides,
            value_strides=value_strides,
            elem_bytes=key.element_size(),
            heads=self.heads,
            head_size=self.head_size,
            chunk_tokens=chunk_tokens,
            device=self.device.type,
            packing=self.packing,
            block_tokens=self.block_tokens,
        )

    @property
    def on_device(self) -> bool:
        """The cache is in accelerator memory (CUDA or Ascend), so copies are asynchronous, on streams."""
        return self.device.type != "cpu"

    @property
    def api(self):
        """``torch.cuda`` or ``torch.npu``: streams and events of the cache's device."""
        return getattr(torch, self.device.type)

    def staging_shape(self, count: int) -> tuple[int, ...]:
        return (len(self.views), 2, count, self.heads, self.chunk_tokens, self.head_size)

    def chunk_buffers(self, staging: torch.Tensor) -> list[list[tuple[int, int]]]:
        """Per chunk, the (address, nbytes) pieces of ``staging`` that make up its stored bytes, in order."""
        count = staging.shape[2]
        slabs = 2 * len(self.views)
        starts = staging.data_ptr() + (np.arange(slabs)[:, None] * count + np.arange(count)[None, :]) * self.piece_bytes
        piece = self.piece_bytes
        return [[(int(address), piece) for address in starts[:, i]] for i in range(count)]

    def _positions(self, chunk_in_block: list[int]) -> list[int]:
        return [c * self.chunk_tokens for c in chunk_in_block]

    def gather(self, blocks: list[int], chunk_in_block: list[int], staging: torch.Tensor) -> None:
        """Copy chunks out of the cache into ``staging`` (of ``staging_shape``)."""
        gather_chunks(self.geometry, blocks, self._positions(chunk_in_block), staging.data_ptr())

    def copy_async(
        self, to_staging: bool, blocks: list[int], chunk_in_block: list[int], staging, stream, layers=None
    ) -> None:
        """Device caches: enqueue a gather (``to_staging``) or scatter with pinned ``staging`` on ``stream``."""
        if self.device.type == "cuda":
            copy, handle = copy_chunks_cuda, stream.cuda_stream
        else:
            copy, handle = copy_chunks_ascend, stream.npu_stream
        positions = self._positions(chunk_in_block)
        copy(to_staging, self.geometry, blocks, positions, staging.data_ptr(), layers=layers, stream=handle)

    def scatter(self, blocks: list[int], chunk_in_block: list[int], staging: torch.Tensor) -> None:
        """Copy chunks from ``staging`` into the cache."""
        scatter_chunks(self.geometry, blocks, self._positions(chunk_in_block), staging.data_ptr())

    def target(self, blocks: list[int], chunk_in_block: list[int]):
        """Where a store's ``load_into`` puts each chunk: straight into the cache, no staging."""
        return paged_target(self.geometry, blocks, self._positions(chunk_in_block))


class LayerwiseCopyIn:
    """Device caches: chunks from pinned staging into the cache one layer at a time, on a side stream.

    Each layer's copy is its own launch with its own event, so the forward pass waits (on the
    device, never the host) only for the layer it is about to read: the other layers' copies run
    beside its compute.
    """

    def __init__(self, kv: PagedKV, stream):
        self.kv = kv
        self.stream = stream
        self._events: dict[str, list[Any]] = {}

    def start(self, blocks: list[int], chunk_in_block: list[int], staging: torch.Tensor) -> Any:
        """Enqueue the copies; return the event after the last one (``staging`` is free after it)."""
        # The blocks may have been read by compute still queued on the current stream (a request
        # that held them before): the copies start after it.
        self.stream.wait_stream(self.kv.api.current_stream(self.kv.device))
        event = None
        for layer, name in enumerate(self.kv.layer_names):
            self.kv.copy_async(False, blocks, chunk_in_block, staging, self.stream, layers=(layer, layer + 1))
            event = self.kv.api.Event()
            event.record(self.stream)
            self._events.setdefault(name, []).append(event)
        return event

    def wait_layer(self, name: str) -> None:
        """Make the current stream wait for every copy into layer ``name`` started so far."""
        current = self.kv.api.current_stream(self.kv.device)
        for event in self._events.pop(name, ()):
            current.wait_event(event)

    def wait_all(self) -> None:
        for name in list(self._events):
            self.wait_layer(name)


class StagingPool:
    """Staging buffers for chunks, reused across steps.

    Fresh memory costs a page fault per page on first touch (on the 2-core test machines, moving
    93 MiB into a fresh buffer took 4x as long as into a used one), so buffers are kept and
    handed out again for any chunk count they can hold. At most ``keep`` idle buffers are kept
    (the largest ones), so memory stays bounded by the largest transfers in flight.
    """

    def __init__(self, kv: PagedKV, keep: int = 4):
        self.kv = kv
        self.keep = keep
        # Flat byte buffers, smallest first, each with the device event after the last copy that
        # used it (None when none did).
        self._idle: list[tuple[torch.Tensor, Any]] = []

    def take(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(staging, buffer)``: a ``staging_shape(count)`` tensor over ``buffer``, reused when one is large enough."""
        nbytes = count * self.kv.chunk_bytes
        for index, (buffer, busy_until) in enumerate(self._idle):
            if buffer.numel() >= nbytes:
                del self._idle[index]
                if busy_until is not None:
                    busy_until.synchronize()  # a device copy queued earlier may still use it
                break
        else:
            # Pinned for a device cache: the device's copy engines read and write it directly.
            buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.kv.on_device)
        return buffer[:nbytes].view(self.kv.dtype).view(self.kv.staging_shape(count)), buffer

    def give(self, buffer: torch.Tensor, busy_until: Any = None) -> None:
        """Return a buffer from :meth:`take` once no host code uses it; ``busy_until``: the device event after
        the last copy queued on it (it is not handed out again before that event)."""
        self._idle.append((buffer, busy_until))
        self._idle.sort(key=lambda entry: entry[0].numel())
        while len(self._idle) > self.keep:
            _, dropped_busy_until = self._idle.pop(0)
            if dropped_busy_until is not None:
                dropped_busy_until.synchronize()  # the memory is freed once dropped

    @property
    def idle_bytes(self) -> int:
        return sum(buffer.numel() for buffer, _ in self._idle)
