"""What the stores backed by one native object (``posix``, ``redis``) share: transfers and tasks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ucm.store._base import KVStore
from ucm.store._device import submit_staged
from ucm.store._tasks import NativeTask, raise_failures


class NativeStore(KVStore):
    """A store whose ``_native`` object has ``dump``/``load``/``load_into(ids, ..., shards)`` returning
    native tasks, and ``close()``. Subclasses set ``self._native`` and ``self._closed = False``."""

    _native: Any
    _closed: bool
    can_load_into = True

    def dump(self, ids: Sequence[bytes], buffers: Sequence[Any], shards: Sequence[int] | None = None) -> NativeTask:
        return self._transfer("dump", ids, buffers, shards)

    def load(self, ids: Sequence[bytes], buffers: Sequence[Any], shards: Sequence[int] | None = None) -> NativeTask:
        return self._transfer("load", ids, buffers, shards)

    def _transfer(self, op: str, ids, buffers, shards) -> NativeTask:
        submit = self._native.load if op == "load" else self._native.dump
        native, after = submit_staged(buffers, op == "load", lambda host: submit(ids, host, shards))
        return NativeTask(op, native, after)

    def load_into(self, ids: Sequence[bytes], target: Any, shards: Sequence[int] | None = None) -> NativeTask:
        return NativeTask("load", self._native.load_into(ids, target, shards))

    def wait(self, task: NativeTask) -> None:
        raise_failures(task.op, task.failures())

    def check(self, task: NativeTask) -> bool:
        return task.done()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._native.close()
