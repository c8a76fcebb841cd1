"""The ``mooncake`` store: blocks in a Mooncake Store cluster (its master, metadata service and the
memory segments its clients contribute), over TCP or RDMA.

Needs the ``mooncake`` Python package: ``pip install ucm-store[mooncake]`` (the CPU build,
``mooncake-transfer-engine-non-cuda``) or Mooncake's CUDA build where the NVIDIA driver is
installed. Each shard is one object, key ``prefix + id.hex() + "/" + shard``; a block is present
once every shard's object exists. Objects are written whole by Mooncake's put protocol (an object
becomes visible when its put ends), and every load checks that the object has exactly the size the
caller's buffers hold. Transfers are Mooncake's batch calls straight from and into the caller's
memory (registered with Mooncake for the duration of the call), on a small thread pool.

Unlike ``posix`` and ``redis``, the bytes carry no checksum of UCM's: Mooncake's own transfer and
allocation are trusted. Building each batch's key and address lists is Python work per block (the
Mooncake API takes Python lists); the copies are Mooncake's native code.
"""

from __future__ import annotations

import concurrent.futures
import logging
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ucm.store._base import KVStore, Option, StoreError
from ucm.store._device import submit_staged

log = logging.getLogger(__name__)

_BATCH = 256  # shards per Mooncake batch call


class _Task:
    def __init__(self, op: str, future: concurrent.futures.Future, after: Any = None):
        self.op, self.future, self.after = op, future, after
        self._failures: list[tuple[bytes, str]] | None = None

    def failures(self) -> list[tuple[bytes, str]]:
        if self._failures is None:
            self._failures = self.future.result()
            after, self.after = self.after, None
            if after is not None:
                after()
        return self._failures


def _address(obj: Any, writable: bool) -> tuple[int, int]:
    """(address, nbytes) of one host buffer: a pair, a tensor, or anything with the buffer protocol."""
    if isinstance(obj, tuple) and len(obj) == 2 and all(isinstance(v, int) for v in obj):
        return obj
    if hasattr(obj, "data_ptr") and hasattr(obj, "is_contiguous"):  # a torch tensor
        if obj.device.type != "cpu":
            raise ValueError("store 'mooncake' takes host memory")
        if not obj.is_contiguous():
            raise ValueError("store 'mooncake': a tensor buffer must be contiguous")
        return obj.data_ptr(), obj.numel() * obj.element_size()
    array = np.frombuffer(obj, dtype=np.uint8)
    if writable and not array.flags.writeable:
        raise ValueError("store 'mooncake': a load needs writable buffers")
    return array.ctypes.data, array.nbytes


def _check_reachable(master: str, timeout_s: float = 3.0) -> None:
    """Fail at once, naming the master, where Mooncake's own setup would retry for a minute and more."""
    host, _, port = master.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"store 'mooncake': master must be host:port, got {master!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ValueError(f"store 'mooncake': cannot reach the master at {master}: {exc}") from None


def _coalesce(pieces) -> list[tuple[int, int]]:
    """The address ranges covering ``pieces``, adjacent and overlapping ones merged (registered once each)."""
    merged: list[list[int]] = []
    for address, size in sorted(pieces):
        if merged and address <= merged[-1][0] + merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], address + size - merged[-1][0])
        else:
            merged.append([address, size])
    return [(a, s) for a, s in merged]


class MooncakeStore(KVStore):
    config_schema = {
        "master": Option(str, required=True, help="the Mooncake master, host:port"),
        "metadata_server": Option(str, required=True, help="http://host:port/metadata, etcd://..., or P2PHANDSHAKE"),
        "local_hostname": Option(str, "127.0.0.1", help="this client's address as other clients reach it"),
        "protocol": Option(str, "tcp", help="tcp or rdma"),
        "device_name": Option(str, "", help="RDMA devices (e.g. mlx5_0), empty for tcp"),
        "global_segment_size": Option(int, 512 << 20, minimum=0, help="bytes this process adds to the pool"),
        "local_buffer_size": Option(int, 128 << 20, minimum=1, help="bytes of this client's transfer buffer"),
        "prefix": Option(str, "ucm/", help="prefix of every key this store writes"),
        "num_shards": Option(int, 1, minimum=1, help="shards per block (e.g. tensor-parallel ranks)"),
        "threads": Option(int, 2, minimum=1, help="threads running transfers"),
    }

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        try:
            from mooncake.store import MooncakeDistributedStore
        except ImportError as exc:
            raise ValueError(
                f"store 'mooncake' needs Mooncake's Python package ({exc}): pip install 'ucm-store[mooncake]' "
                "(the CPU build) or mooncake-transfer-engine (the CUDA build)"
            ) from None
        c = self.config
        if c["protocol"] not in ("tcp", "rdma"):
            raise ValueError(f"store 'mooncake': protocol must be 'tcp' or 'rdma', got {c['protocol']!r}")
        _check_reachable(c["master"])
        self._client = MooncakeDistributedStore()
        rc = self._client.setup(
            c["local_hostname"],
            c["metadata_server"],
            c["global_segment_size"],
            c["local_buffer_size"],
            c["protocol"],
            c["device_name"],
            c["master"],
        )
        if rc != 0:
            raise ValueError(
                f"store 'mooncake': setup failed with code {rc} (master {c['master']}, metadata "
                f"{c['metadata_server']}): is the master running and reachable?"
            )
        self._pool = concurrent.futures.ThreadPoolExecutor(c["threads"], thread_name_prefix="ucm-mooncake")
        self._closed = False

    def _key(self, block_id: bytes, shard: int) -> str:
        return f"{self.config['prefix']}{block_id.hex()}/{shard}"

    # -- lookups ---------------------------------------------------------------------------
    def lookup(self, ids: Sequence[bytes]) -> list[bool]:
        ids = list(ids)
        shards = self.config["num_shards"]
        keys = [self._key(i, s) for i in ids for s in range(shards)]
        found = self._client.batch_is_exist(keys) if keys else []
        return [all(r == 1 for r in found[n * shards : (n + 1) * shards]) for n in range(len(ids))]

    def lookup_prefix(self, ids: Sequence[bytes]) -> int:
        found = self.lookup(ids)
        return found.index(False) if False in found else len(found)

    # -- transfers --------------------------------------------------------------------------
    def dump(self, ids: Sequence[bytes], buffers: Sequence[Any], shards: Sequence[int] | None = None) -> _Task:
        return self._submit("dump", ids, buffers, shards)

    def load(self, ids: Sequence[bytes], buffers: Sequence[Any], shards: Sequence[int] | None = None) -> _Task:
        return self._submit("load", ids, buffers, shards)

    def _submit(self, op: str, ids, buffers, shards) -> _Task:
        ids = list(ids)
        shards = [0] * len(ids) if shards is None else list(shards)
        if len(buffers) != len(ids) or len(shards) != len(ids):
            raise ValueError(f"got {len(ids)} ids, {len(buffers)} buffers and {len(shards)} shards")
        for n, shard in enumerate(shards):
            if not 0 <= shard < self.config["num_shards"]:
                raise ValueError(f"shards[{n}] = {shard} is outside 0..{self.config['num_shards'] - 1} (num_shards)")
        load = op == "load"
        futures: list[concurrent.futures.Future] = []

        def submit(host: list[Any]) -> None:
            pieces = []
            for n, entry in enumerate(host):
                parts = entry if isinstance(entry, list) else [entry]
                pieces.append([_address(p, load) for p in parts])
                if sum(size for _, size in pieces[-1]) == 0:
                    raise ValueError(f"buffers[{n}] hold no bytes")
            keys = [self._key(i, s) for i, s in zip(ids, shards, strict=True)]
            # `host` is passed along so that the buffers it holds live until the transfer is over.
            futures.append(self._pool.submit(self._run, load, ids, keys, pieces, host))

        _, after = submit_staged(buffers, load, submit)
        return _Task(op, futures[0], after)

    def _run(self, load: bool, ids: list[bytes], keys: list[str], pieces: list[list[tuple[int, int]]], buffers: Any):
        failures: list[tuple[bytes, str]] = []
        registered = []
        try:
            for address, size in _coalesce(p for parts in pieces for p in parts):
                if self._client.register_buffer(address, size) == 0:
                    registered.append(address)
            skip: set[int] = set()
            shards = self.config["num_shards"]
            if load and shards > 1:
                # A block counts only once every shard is written.
                for n, present in enumerate(self.lookup(ids)):
                    if not present:
                        skip.add(n)
                        failures.append((ids[n], f"not in the store (not all {shards} shards written)"))
            for first in range(0, len(keys), _BATCH):
                batch = [n for n in range(first, min(len(keys), first + _BATCH)) if n not in skip]
                if not batch:
                    continue
                ptrs = [[a for a, _ in pieces[n]] for n in batch]
                sizes = [[s for _, s in pieces[n]] for n in batch]
                call = self._client.batch_get_into_multi_buffers if load else self._client.batch_put_from_multi_buffers
                results = call([keys[n] for n in batch], ptrs, sizes)
                for k, (n, result) in enumerate(zip(batch, results, strict=True)):
                    expected = sum(sizes[k])
                    if load and result == expected:
                        continue
                    if not load and result == 0:
                        continue
                    if load and result >= 0:
                        reason = f"stored object holds {result} bytes but the buffers hold {expected}"
                    elif load and result == -704:
                        reason = "not in the store"
                    elif load and result == -600:
                        reason = f"the stored object does not fit the buffers ({expected} bytes)"
                    else:
                        reason = f"mooncake {'get' if load else 'put'} failed with code {result}"
                    failures.append((ids[n], reason))
        except Exception as exc:  # the client itself failed: every block of the task fails
            failures = [(i, f"mooncake client error: {exc}") for i in ids]
        finally:
            for address in registered:
                self._client.unregister_buffer(address)
        return failures

    def wait(self, task: _Task) -> None:
        failures = task.failures()
        if failures:
            raise StoreError.from_failures(task.op, failures)

    def check(self, task: _Task) -> bool:
        if not task.future.done():
            return False
        task.failures()
        return True

    def prefetch(self, ids: Sequence[bytes]) -> None:
        pass

    def remove(self, ids: Sequence[bytes]) -> None:
        keys = [self._key(i, s) for i in ids for s in range(self.config["num_shards"])]
        if keys:
            self._client.batch_remove(keys, True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pool.shutdown(wait=True)
            self._client.close()
