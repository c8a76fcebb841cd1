"""CUDA buffers in ``dump`` and ``load``: staged through pinned host memory by the CUDA path.

A buffer (or a part of a gathered buffer) that is a contiguous CUDA tensor, found through
``__cuda_array_interface__`` or DLPack, is swapped for a pinned host buffer of the same size. A
dump copies the device bytes into it before the store sees the batch; a load copies them back to
the device once the store's task is over. Copies are ``cudaMemcpyAsync`` calls on the legacy
default stream, ordered after the work already queued on the device; no Python-side ``.cpu()``.
Batches without device buffers pass through untouched.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

_DLPACK_CUDA = (2, 13)  # kDLCUDA, kDLCUDAManaged


def _cuda():
    try:
        from ucm.store import _cuda
    except ImportError:
        raise ValueError(
            "a buffer is a CUDA tensor, but this ucm-store was built without the CUDA transfer path; "
            "reinstall it with nvcc on PATH, or pass host memory"
        ) from None
    return _cuda


def cuda_buffer(obj: Any, name: str) -> tuple[int, int] | None:
    """``(address, nbytes)`` of a contiguous CUDA buffer, or None when ``obj`` is not on a CUDA device."""
    if isinstance(obj, (bytes, bytearray, memoryview, tuple, list)):
        return None
    try:
        interface = obj.__cuda_array_interface__
    except Exception:  # absent, or a dtype the exporter cannot describe (torch: fp8): try DLPack below
        interface = None
    if interface is not None:
        shape = tuple(interface["shape"])
        itemsize = int(interface["typestr"][2:])
        count = math.prod(shape)
        strides = interface.get("strides")
        if strides is not None and count > 1:
            expected = itemsize
            for size, stride in zip(reversed(shape), reversed(strides), strict=True):
                if size != 1 and stride != expected:
                    raise ValueError(f"{name} is not contiguous; pass a contiguous tensor")
                expected *= size
        return int(interface["data"][0]), count * itemsize
    device = getattr(obj, "__dlpack_device__", None)
    if device is not None and device()[0] in _DLPACK_CUDA:
        address, nbytes, _ = _cuda().dlpack_buffer(obj, name)
        return address, nbytes
    return None


class PinnedPool:
    """Pinned host buffers, reused: pinning memory costs far more than copying into it."""

    def __init__(self, keep: int = 8):
        self.keep = keep
        self._idle: list[Any] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> Any:
        with self._lock:
            for index, buffer in enumerate(self._idle):
                if len(buffer) >= nbytes:
                    return self._idle.pop(index)
        return _cuda().PinnedBuffer(max(nbytes, 1 << 20))

    def give(self, buffers: Sequence[Any]) -> None:
        with self._lock:
            self._idle.extend(buffers)
            self._idle.sort(key=len)
            del self._idle[: max(0, len(self._idle) - self.keep)]


_POOL = PinnedPool()


def stage(buffers: Sequence[Any], load: bool) -> tuple[list[Any], Callable[[], None] | None]:
    """``(host buffers, finish)``: ``finish`` (None when nothing was on a device) must run once the
    store's task is over; for a load it copies the loaded bytes to the device buffers."""
    staged: list[tuple[int, Any, int]] = []  # (device address, pinned buffer, nbytes)

    def swap(obj: Any, name: str) -> Any:
        found = cuda_buffer(obj, name)
        if found is None:
            return obj
        address, nbytes = found
        pinned = _POOL.take(nbytes)
        staged.append((address, pinned, nbytes))
        return memoryview(pinned)[:nbytes]

    out: list[Any] = []
    for index, entry in enumerate(buffers):
        if type(entry) is list and all(type(part) is tuple for part in entry):
            out.append(entry)  # (address, nbytes) pieces of host memory, as the connector saves: nothing to stage
            continue
        is_pair = isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], int)
        if isinstance(entry, (list, tuple)) and not is_pair:
            out.append([swap(part, f"buffers[{index}][{p}]") for p, part in enumerate(entry)])
        else:
            out.append(swap(entry, f"buffers[{index}]"))
    if not staged:
        return list(buffers), None
    cuda = _cuda()
    if not load:
        cuda.copy_and_wait([(pinned.address, address, nbytes) for address, pinned, nbytes in staged], 0)

    def finish() -> None:
        try:
            if load:
                cuda.copy_and_wait([(address, pinned.address, nbytes) for address, pinned, nbytes in staged], 0)
        finally:
            _POOL.give([pinned for _, pinned, _ in staged])

    return out, finish


def submit_staged(buffers: Sequence[Any], load: bool, submit: Callable[[list[Any]], Any]) -> tuple[Any, Any]:
    """``(submit(host buffers), finish)``, with :func:`stage`; if ``submit`` raises, ``finish`` runs first."""
    host, finish = stage(buffers, load)
    try:
        return submit(host), finish
    except BaseException:
        if finish is not None:
            finish()
        raise
