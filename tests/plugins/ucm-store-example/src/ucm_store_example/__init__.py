"""A UCM store kept in a Python dict, written and installed apart from ``ucm-store``.

It shows what a third-party store needs: subclass :class:`ucm.store.KVStore`, declare a
``config_schema``, and register the class in the ``ucm.stores`` entry-point group (see this
distribution's ``pyproject.toml``). Copies run at submit time, so every task is finished
when ``dump``/``load`` return.
"""

from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ucm.store import KVStore, Option, StoreError

__all__ = ["DictStore", "DictTask"]


@dataclass(frozen=True)
class DictTask:
    """A finished dump or load and the blocks it failed for."""

    op: str
    failures: tuple[tuple[bytes, str], ...]


class DictStore(KVStore):
    """Blocks in a dict of ``id -> [shard bytes or None, ...]``, least recently used evicted first."""

    config_schema = {
        "num_shards": Option(int, 1, help="shards per block; a block is visible once all of them are written"),
        "capacity_blocks": Option(int, help="most blocks kept; the least recently used go first (default: no limit)"),
    }

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        self._num_shards = self.config.get("num_shards", 1)
        self._capacity_blocks = self.config.get("capacity_blocks")
        for key, value in (("num_shards", self._num_shards), ("capacity_blocks", self._capacity_blocks)):
            if value is not None and value < 1:
                raise ValueError(f"store 'example-dict': config key {key!r} must be at least 1, got {value}")
        self._lock = threading.Lock()
        self._blocks: OrderedDict[bytes, list[bytes | None]] = OrderedDict()

    def lookup(self, ids: Sequence[bytes]) -> list[bool]:
        ids = self._check_ids(ids)
        with self._lock:
            return [self._complete(block_id) is not None for block_id in ids]

    def dump(self, ids: Sequence[bytes], buffers: Sequence[Any], shards: Sequence[int] | None = None) -> DictTask:
        ids, buffers, shards = self._check_batch(ids, buffers, shards)
        payloads = []
        for index, buffer in enumerate(buffers):
            views = _views(buffer, index, writable=False)
            payload = b"".join(views)
            if not payload:
                raise ValueError(f"buffers[{index}] hold 0 bytes; a shard must not be empty")
            payloads.append(payload)
        with self._lock:
            for block_id, shard, payload in zip(ids, shards, payloads, strict=True):
                block = self._blocks.setdefault(block_id, [None] * self._num_shards)
                if block[shard] is None:
                    block[shard] = payload
                self._blocks.move_to_end(block_id)
            while self._capacity_blocks is not None and len(self._blocks) > self._capacity_blocks:
                self._blocks.popitem(last=False)
        return DictTask("dump", ())

    def load(self, ids: Sequence[bytes], buffers: Sequence[Any], shards: Sequence[int] | None = None) -> DictTask:
        ids, buffers, shards = self._check_batch(ids, buffers, shards)
        targets = [_views(buffer, index, writable=True) for index, buffer in enumerate(buffers)]
        failures = []
        with self._lock:
            for block_id, shard, views in zip(ids, shards, targets, strict=True):
                block = self._complete(block_id)
                if block is None:
                    failures.append((block_id, "block is not stored"))
                    continue
                self._blocks.move_to_end(block_id)
                payload = block[shard]
                wanted = sum(view.nbytes for view in views)
                if wanted != len(payload):
                    failures.append((block_id, f"stored shard {shard} is {len(payload)} bytes, buffers hold {wanted}"))
                    continue
                offset = 0
                for view in views:
                    view[:] = payload[offset : offset + view.nbytes]
                    offset += view.nbytes
        return DictTask("load", tuple(failures))

    def wait(self, task: DictTask) -> None:
        if task.failures:
            raise StoreError.from_failures(task.op, task.failures)

    def check(self, task: DictTask) -> bool:
        return True

    def remove(self, ids: Sequence[bytes]) -> None:
        ids = self._check_ids(ids)
        with self._lock:
            for block_id in ids:
                self._blocks.pop(block_id, None)

    def _check_ids(self, ids: Sequence[bytes]) -> list[bytes]:
        ids = list(ids)
        return self._check_batch(ids, ids, None)[0]

    def _complete(self, block_id: bytes) -> list[bytes] | None:
        """The block's shards if every one of them is written, else None (caller holds the lock)."""
        block = self._blocks.get(block_id)
        if block is None or any(shard is None for shard in block):
            return None
        return block


def _views(buffer: Any, index: int, *, writable: bool) -> list[memoryview]:
    """Byte views of ``buffers[index]``: one buffer, a list of them, or ``(address, nbytes)`` of host memory."""
    if isinstance(buffer, list):
        return [view for part in buffer for view in _views(part, index, writable=writable)]
    if isinstance(buffer, tuple):
        if len(buffer) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in buffer):
            raise ValueError(f"buffers[{index}]: a tuple buffer must be (address, nbytes), got {buffer!r}")
        address, nbytes = buffer
        if address <= 0 or nbytes < 0:
            raise ValueError(f"buffers[{index}]: invalid (address, nbytes) = ({address:#x}, {nbytes})")
        return [memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")]
    try:
        view = memoryview(buffer).cast("B")
    except TypeError as error:
        if not hasattr(buffer, "__dlpack__"):
            raise ValueError(f"buffers[{index}]: not a contiguous buffer ({type(buffer).__name__}): {error}") from None
        view = _dlpack_bytes(buffer)
    if writable and view.readonly:
        raise ValueError(f"buffers[{index}]: load needs a writable buffer, got a read-only {type(buffer).__name__}")
    return [view]


def _dlpack_bytes(buffer: Any) -> memoryview:
    """Bytes of a CPU DLPack tensor; reinterpreted as uint8 first, since NumPy lacks dtypes such as bfloat16."""
    import numpy as np

    if hasattr(buffer, "view") and type(buffer).__module__.startswith("torch"):
        import torch

        buffer = buffer.view(torch.uint8)
    return memoryview(np.from_dlpack(buffer)).cast("B")
