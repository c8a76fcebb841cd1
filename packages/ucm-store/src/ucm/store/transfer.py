"""The host transfer path: KV chunks between a paged cache in host memory and staging buffers.

Engines' KV caches are paged: each layer's K and V are (viewed as) strided arrays
``[blocks, heads, block_tokens, head_size]``. A staging buffer holds chunks in the store's chunk
format ``[layers][2: K, V][chunks][heads][chunk_tokens][head_size]`` (docs/format.md). The copy
runs in native threads with the GIL released, converting the page layout (strides, including a
transposed K) in the same pass. Addresses and strides are plain integers, so no tensor library is
needed here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ucm.store import _native


@dataclass(frozen=True)
class PagedGeometry:
    """Where one engine's paged cache lives and how its pages are laid out."""

    keys: Sequence[int]  # per layer: address of K[0, 0, 0, 0]
    values: Sequence[int]  # per layer: address of V[0, 0, 0, 0]
    key_strides: tuple[int, int, int, int]  # element strides of K: block, head, token, dim
    value_strides: tuple[int, int, int, int]
    elem_bytes: int
    heads: int
    head_size: int
    chunk_tokens: int


def _copy(to_staging: bool, geometry: PagedGeometry, blocks, token_offsets, staging: int) -> None:
    _native.copy_chunks(
        to_staging,
        list(geometry.keys),
        list(geometry.values),
        geometry.key_strides,
        geometry.value_strides,
        geometry.elem_bytes,
        list(blocks),
        list(token_offsets),
        geometry.heads,
        geometry.chunk_tokens,
        geometry.head_size,
        staging,
    )


def gather_chunks(geometry: PagedGeometry, blocks: Sequence[int], token_offsets: Sequence[int], staging: int) -> None:
    """Copy chunk i (tokens ``token_offsets[i]`` on of cache block ``blocks[i]``) into ``staging``."""
    _copy(True, geometry, blocks, token_offsets, staging)


def scatter_chunks(geometry: PagedGeometry, blocks: Sequence[int], token_offsets: Sequence[int], staging: int) -> None:
    """Copy the chunks in ``staging`` into the cache; the inverse of :func:`gather_chunks`."""
    _copy(False, geometry, blocks, token_offsets, staging)
