"""The ``memory`` store: a host-memory LRU tier, optionally in front of another store.

Lookups and loads are served from memory first and then from the ``backend``; blocks loaded
from the backend are kept in memory for the next hit. A dump's task finishes once the block is
in memory; a background thread then writes it to the backend, with at most
``write_behind_bytes`` queued (further dumps wait for room). ``flush()`` and ``close()`` wait for
every queued write, so nothing is lost while the process lives and exits normally.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ucm.store import _native
from ucm.store._base import KVStore, Option, StoreError
from ucm.store._device import submit_staged
from ucm.store._tasks import NativeTask, raise_failures

log = logging.getLogger(__name__)

_WRITE_BATCH = 256  # shards handed to the backend per dump call


@dataclass
class _TieredLoad:
    ids: list[bytes]
    memory: NativeTask
    missing: list[bytes] = field(default_factory=list)  # absent from memory, and no backend
    backend_task: Any = None
    backend_batch: tuple[list[bytes], list[Any], list[int]] | None = None
    failures: list[tuple[bytes, str]] | None = None  # set once finished
    after: Any = None  # device buffers: copies the loaded bytes to them (see _device.py)


class MemoryStore(KVStore):
    config_schema = {
        "capacity_bytes": Option(int, required=True, minimum=1, help="host memory the tier may hold"),
        "num_shards": Option(int, 1, minimum=1, help="shards per block (e.g. tensor-parallel ranks)"),
        "threads": Option(int, 8, minimum=1, help="copy threads"),
        "backend": Option(dict, None, help='store behind the tier: {"name": ..., "config": {...}}'),
        "write_behind_bytes": Option(int, None, minimum=1, help="bytes queued for the backend (default capacity/4)"),
        "shard_bytes": Option(int, None, minimum=1, help="reject transfers whose buffers do not total this size"),
    }

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        self._backend = self._open_backend(self.config["backend"])
        write_behind = 0
        if self._backend is not None:
            write_behind = self.config["write_behind_bytes"] or max(1, self.config["capacity_bytes"] // 4)
        self._cache = _native.MemoryCache(
            capacity_bytes=self.config["capacity_bytes"],
            num_shards=self.config["num_shards"],
            threads=self.config["threads"],
            write_behind_bytes=write_behind,
            shard_bytes=self.config["shard_bytes"] or 0,
        )
        self._closed = False
        self._stop_writer = False
        self.write_behind_failures = 0
        self._writer = None
        if self._backend is not None:
            self._writer = threading.Thread(target=self._write_behind, name="ucm-memory-write-behind", daemon=True)
            self._writer.start()

    def _open_backend(self, spec: Mapping[str, Any] | None) -> KVStore | None:
        if spec is None:
            return None
        from ucm.store import open_store

        unknown = set(spec) - {"name", "config"}
        if unknown or "name" not in spec:
            raise ValueError(
                "store 'memory': config key 'backend' must be {'name': ..., 'config': {...}}, "
                f"got keys {sorted(spec)}"
            )
        backend_config = dict(spec.get("config") or {})
        backend_config.setdefault("num_shards", self.config["num_shards"])
        if backend_config["num_shards"] != self.config["num_shards"]:
            raise ValueError(
                f"store 'memory': backend num_shards {backend_config['num_shards']} differs from "
                f"num_shards {self.config['num_shards']}"
            )
        return open_store(spec["name"], backend_config)

    @property
    def backend(self) -> KVStore | None:
        return self._backend

    # -- lookups ---------------------------------------------------------------------------
    def lookup(self, ids: Sequence[bytes]) -> list[bool]:
        found = self._cache.lookup(ids)
        if self._backend is not None:
            absent = [i for i, hit in enumerate(found) if not hit]
            if absent:
                for i, hit in zip(absent, self._backend.lookup([ids[i] for i in absent]), strict=True):
                    found[i] = hit
        return found

    def lookup_prefix(self, ids: Sequence[bytes]) -> int:
        ids = list(ids)
        position = self._cache.lookup_prefix(ids)
        if self._backend is None:
            return position
        # Alternate between the tiers: each run of leading hits may come from either.
        while position < len(ids):
            step = self._backend.lookup_prefix(ids[position:])
            position += step
            if position == len(ids):
                break
            step = self._cache.lookup_prefix(ids[position:])
            if step == 0:
                break
            position += step
        return position

    # -- transfers -------------------------------------------------------------------------
    def dump(self, ids: Sequence[bytes], buffers: Sequence[Any], shards: Sequence[int] | None = None) -> NativeTask:
        dirty = self._backend is not None
        native, after = submit_staged(buffers, False, lambda host: self._cache.dump(ids, host, shards, dirty=dirty))
        return NativeTask("dump", native, after)

    def load(self, ids: Sequence[bytes], buffers: Sequence[Any], shards: Sequence[int] | None = None) -> _TieredLoad:
        # Misses go to the backend with the same host buffers (pinned copies of device buffers).
        (native, missing, buffers), after = submit_staged(
            buffers, True, lambda host: (*self._cache.load(ids, host, shards), host)
        )
        task = _TieredLoad(ids, NativeTask("load", native), after=after)
        if not missing:
            return task
        if self._backend is None:
            task.missing = [ids[i] for i in missing]
            return task
        batch = (
            [ids[i] for i in missing],
            [buffers[i] for i in missing],
            [0] * len(missing) if shards is None else [shards[i] for i in missing],
        )
        task.backend_batch = batch
        task.backend_task = self._backend.load(*batch)
        return task

    def wait(self, task: NativeTask | _TieredLoad) -> None:
        if isinstance(task, NativeTask):
            raise_failures(task.op, task.failures())
            return
        raise_failures("load", self._finish_load(task))

    def check(self, task: NativeTask | _TieredLoad) -> bool:
        if isinstance(task, NativeTask):
            return task.done()
        if task.failures is not None:
            return True
        if not task.memory.done():
            return False
        if task.backend_task is not None and not self._backend.check(task.backend_task):
            return False
        self._finish_load(task)
        return True

    def _finish_load(self, task: _TieredLoad) -> list[tuple[bytes, str]]:
        if task.failures is not None:
            return task.failures
        failures = task.memory.failures()
        failures += [(block_id, "not found") for block_id in task.missing]
        if task.backend_task is not None:
            failed: set[bytes] = set()
            try:
                self._backend.wait(task.backend_task)
            except StoreError as exc:
                failed = set(exc.ids)
                failures += [(block_id, exc.reasons.get(block_id, str(exc))) for block_id in exc.ids]
            self._promote(task.backend_batch, failed)
        if failures:
            order = {block_id: index for index, block_id in reversed(list(enumerate(task.ids)))}
            failures.sort(key=lambda failure: order.get(failure[0], len(order)))
        task.failures = failures
        after, task.after = task.after, None
        if after is not None:
            after()
        return failures

    def _promote(self, batch: tuple[list[bytes], list[Any], list[int]], failed: set[bytes]) -> None:
        """Keep blocks just loaded from the backend in memory (they are not written back)."""
        ids, buffers, shards = batch
        keep = [i for i, block_id in enumerate(ids) if block_id not in failed]
        if keep:
            promoted = self._cache.dump(
                [ids[i] for i in keep], [buffers[i] for i in keep], [shards[i] for i in keep], dirty=False
            )
            promoted.wait()

    # -- the rest of the contract ----------------------------------------------------------
    def prefetch(self, ids: Sequence[bytes]) -> None:
        if self._backend is not None:
            self._backend.prefetch(ids)

    def prewarm(self, budget_bytes: int, shard: int | None = None) -> None:
        if self._backend is not None:  # what the backend reads faster next time; this tier starts empty
            self._backend.prewarm(budget_bytes, shard)

    def prewarm_stats(self) -> dict[str, Any] | None:
        return None if self._backend is None else self._backend.prewarm_stats()

    def remove(self, ids: Sequence[bytes]) -> None:
        self._cache.remove(ids)  # also cancels their writes still queued for the backend
        if self._backend is not None:
            self._cache.wait_in_flight()  # a write already under way must land before its removal
            self._backend.remove(ids)

    def used_bytes(self) -> int:
        """Bytes of block data held in memory now."""
        return self._cache.used_bytes()

    def flush(self) -> None:
        """Wait until every dumped block has been handed to the backend."""
        if self._backend is not None:
            self._cache.wait_clean()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.flush()
        self._stop_writer = True
        self._cache.close()
        if self._writer is not None:
            self._writer.join()
        if self._backend is not None:
            self._backend.close()

    def _write_behind(self) -> None:
        while True:
            taken = self._cache.take_dirty(_WRITE_BATCH, 0.2)
            if not taken:
                if self._stop_writer:
                    return
                continue
            ids = [block_id for block_id, _, _, _ in taken]
            shards = [shard for _, shard, _, _ in taken]
            buffers = [(address, size) for _, _, address, size in taken]
            try:
                self._backend.wait(self._backend.dump(ids, buffers, shards))
            except StoreError as exc:
                self.write_behind_failures += len(exc.ids)
                log.warning("memory store: the backend did not take %d block(s): %s", len(exc.ids), exc)
            except Exception:  # keep the writer alive: the blocks stay in memory
                self.write_behind_failures += len(ids)
                log.exception("memory store: writing %d block(s) to the backend failed", len(ids))
            finally:
                self._cache.finish_dirty(taken)
