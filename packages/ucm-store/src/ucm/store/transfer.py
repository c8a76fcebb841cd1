"""The host transfer path: KV chunks between a paged cache in host memory and staging buffers.

Engines' KV caches are paged: each layer's K and V are (viewed as) strided arrays
``[blocks, heads, block_tokens, head_size]``. A staging buffer holds chunks in the store's chunk
format ``[layers][2: K, V][chunks][heads][chunk_tokens][head_size]`` (docs/format.md). The copy
runs in native threads with the GIL released, converting the page layout (strides, including a
transposed K, or vLLM's packing for AMX tiles) in the same pass. Addresses and strides are plain
integers, so no tensor library is needed here.

Caches in CUDA memory (``PagedGeometry.device == "cuda"``) go through the CUDA transfer path
(``csrc/cuda``, built when CMake finds a CUDA toolkit): one call moves every chunk of a layer range
between the device pages and pinned host memory, on a stream the caller chooses, through the copy
engines (by default) or a kernel reading and writing host memory directly. Caches in Ascend NPU
memory (``"npu"``) go through ACL (``csrc/ascend``, built when the CANN toolkit is found).

Stores that can (``KVStore.can_load_into``) also load straight into a host cache: a
:func:`paged_target` lists where each chunk goes, and ``store.load_into(ids, target)`` reads each
chunk in small pieces and scatters every piece while it is still in the CPU cache, with no
staging buffer at all.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass

from ucm.store import _native


@dataclass(frozen=True)
class PagedGeometry:
    """Where one engine's paged cache lives and how its pages are laid out."""

    keys: Sequence[int]  # per layer: address of K[0, 0, 0, 0]
    values: Sequence[int]  # per layer: address of V[0, 0, 0, 0]; empty for a single-plane (MLA) cache, CUDA only
    key_strides: tuple[int, int, int, int]  # element strides of K: block, head, token, dim
    value_strides: tuple[int, int, int, int]
    elem_bytes: int
    heads: int
    head_size: int
    chunk_tokens: int
    device: str = "cpu"  # "cpu", "cuda" (the current CUDA device) or "npu" (the current Ascend NPU)
    #: How tokens and dims lie inside one (block, head) page. "strided": as the token and dim strides
    #: say. "amx" (host caches only): vLLM's CPU pages for AMX tiles (bf16), K ``[tokens/16][head_size/2]
    #: [16][2]`` and V ``[head_size/16][tokens/2][16][2]`` per page, pages at the block and head strides;
    #: the token and dim strides are not used, ``block_tokens`` is needed (docs/format.md).
    packing: str = "strided"
    block_tokens: int = 0


#: Optional native modules of ucm.store: device kind -> (module, what to do when it is missing).
_BACKENDS = {
    "cuda": (
        "_cuda",
        "this ucm-store was built without the CUDA transfer path (no CUDA toolkit was found when it was built); "
        "reinstall it with nvcc on PATH, or with -Ccmake.define.UCM_WITH_CUDA=ON to require it",
    ),
    "npu": (
        "_ascend",
        "this ucm-store was built without the Ascend transfer path (the CANN toolkit was not found when it was "
        "built); source CANN's set_env.sh and reinstall it, with -Ccmake.define.UCM_WITH_ASCEND=ON to require it",
    ),
}


def _backend(device: str):
    """The native transfer module for a device kind; RuntimeError saying how to get it when it was not built."""
    module, missing = _BACKENDS[device]
    try:
        return importlib.import_module(f"ucm.store.{module}")
    except ImportError:
        raise RuntimeError(missing) from None


def cuda_available() -> bool:
    """True when this build has the CUDA transfer path and a CUDA device is visible."""
    try:
        return _backend("cuda").device_count() > 0
    except RuntimeError:
        return False


def copy_chunks_cuda(
    to_host: bool,
    geometry: PagedGeometry,
    blocks: Sequence[int],
    token_offsets: Sequence[int],
    host: int,
    *,
    layers: tuple[int, int] | None = None,
    stream: int = 0,
    max_blocks: int = 0,
    way: str = "copy-engine",
) -> None:
    """Enqueue chunks between a cache in CUDA memory and pinned host memory at ``host``; return at once.

    ``host`` holds ``[layers][planes][chunks][heads][chunk_tokens][head_size]`` for every layer;
    ``layers=(begin, end)`` moves only that range (its slice of ``host``), for layer-by-layer
    transfers. The copy runs on ``stream`` (a ``cudaStream_t`` as an integer, such as
    ``torch.cuda.Stream().cuda_stream``) after the work already queued there; synchronise the
    stream (or an event recorded after it) before reading ``host`` or the cache.

    ``way="copy-engine"`` (the default): a kernel resident on a few SMs converts pages into a
    64 MiB ring of device slots and the copy engines cross the bus; ``way="kernel"``: one kernel
    reads or writes the pinned memory directly, using no device memory. ``max_blocks`` caps the
    kernel's thread blocks (0: 8 for the ring, the whole GPU for ``"kernel"``).
    """
    begin, end = layers if layers is not None else (0, len(geometry.keys))
    geometry = _device_geometry(geometry)
    _backend("cuda").copy_chunks(
        to_host=to_host,
        blocks=list(blocks),
        token_offsets=list(token_offsets),
        host=host,
        layer_begin=begin,
        layer_end=end,
        stream=stream,
        max_blocks=max_blocks,
        way=way,
        **_cache_args(geometry),
    )


def copy_chunks_ascend(
    to_host: bool,
    geometry: PagedGeometry,
    blocks: Sequence[int],
    token_offsets: Sequence[int],
    host: int,
    *,
    layers: tuple[int, int] | None = None,
    stream: int = 0,
) -> None:
    """Enqueue chunks between a cache in NPU memory and host memory at ``host`` on an ACL ``stream``.

    ``host`` and ``layers`` are as for :func:`copy_chunks_cuda`. One ACL 2-D copy per (layer,
    K/V, chunk, head). Built only with the CANN toolkit, and not yet run on an NPU by this project.
    """
    args = _cache_args(_device_geometry(geometry))
    if layers is not None:
        begin, end = layers
        layer_bytes = (
            2 * len(blocks) * geometry.heads * geometry.chunk_tokens * geometry.head_size * geometry.elem_bytes
        )
        args["keys"], args["values"] = args["keys"][begin:end], args["values"][begin:end]
        host += begin * layer_bytes
    _backend("npu").copy_chunks(
        to_host=to_host,
        blocks=list(blocks),
        token_offsets=list(token_offsets),
        host=host,
        stream=stream,
        **args,
    )


def _cache_args(geometry: PagedGeometry) -> dict:
    """The geometry as the native copy functions take it (keyword arguments)."""
    return {
        "keys": list(geometry.keys),
        "values": list(geometry.values),
        "key_strides": geometry.key_strides,
        "value_strides": geometry.value_strides,
        "elem_bytes": geometry.elem_bytes,
        "heads": geometry.heads,
        "chunk_tokens": geometry.chunk_tokens,
        "head_size": geometry.head_size,
    }


def _device_geometry(geometry: PagedGeometry) -> PagedGeometry:
    """``geometry``, checked for a device copy: packed pages exist only in host memory."""
    if geometry.packing != "strided":
        raise ValueError(f"page packing {geometry.packing!r} exists only in host memory, not on {geometry.device!r}")
    return geometry


def _host_cache_args(geometry: PagedGeometry) -> dict:
    """The geometry as the host path's native functions take it, with the page packing."""
    return _cache_args(geometry) | {"packing": geometry.packing, "block_tokens": geometry.block_tokens}


def _copy(to_staging: bool, geometry: PagedGeometry, blocks, token_offsets, staging: int) -> None:
    if geometry.device == "cuda":
        # Synchronous, like the host path: enqueue on the default stream and wait for it.
        copy_chunks_cuda(to_staging, geometry, blocks, token_offsets, staging)
        _backend("cuda").synchronize(0)
        return
    if geometry.device == "npu":
        copy_chunks_ascend(to_staging, geometry, blocks, token_offsets, staging)
        _backend("npu").synchronize(0)
        return
    if geometry.device != "cpu":
        raise ValueError(f"no transfer path for device {geometry.device!r} (have 'cpu', 'cuda' and 'npu')")
    _native.copy_chunks(
        to_staging=to_staging,
        blocks=list(blocks),
        token_offsets=list(token_offsets),
        staging=staging,
        **_host_cache_args(geometry),
    )


def gather_chunks(geometry: PagedGeometry, blocks: Sequence[int], token_offsets: Sequence[int], staging: int) -> None:
    """Copy chunk i (tokens ``token_offsets[i]`` on of cache block ``blocks[i]``) into ``staging``."""
    _copy(True, geometry, blocks, token_offsets, staging)


def scatter_chunks(geometry: PagedGeometry, blocks: Sequence[int], token_offsets: Sequence[int], staging: int) -> None:
    """Copy the chunks in ``staging`` into the cache; the inverse of :func:`gather_chunks`."""
    _copy(False, geometry, blocks, token_offsets, staging)


def paged_target(geometry: PagedGeometry, blocks: Sequence[int], token_offsets: Sequence[int]) -> _native.PagedScatter:
    """Where ``store.load_into`` puts chunk i: tokens ``token_offsets[i]`` on of cache block ``blocks[i]``.

    ``len(target)`` is the number of chunks and ``target.chunk_bytes`` the stored size of each.
    Host caches only: a CUDA cache is loaded into pinned staging and copied with
    :func:`copy_chunks_cuda`.
    """
    if geometry.device != "cpu":
        raise ValueError(f"load_into needs a cache in host memory, not on {geometry.device!r}")
    return _native.PagedScatter(blocks=list(blocks), token_offsets=list(token_offsets), **_host_cache_args(geometry))
