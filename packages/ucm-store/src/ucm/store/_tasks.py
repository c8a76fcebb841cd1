"""Tasks of the native stores, as handed to callers of ``dump`` and ``load``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ucm.store._base import StoreError


@dataclass
class NativeTask:
    """A native batch plus the name of the operation, for error messages."""

    op: str
    native: Any  # ucm.store._native.Task
    after: Callable[[], None] | None = None  # runs once the batch is over (device buffers: see _device.py)
    _failures: list[tuple[bytes, str]] | None = None

    def failures(self) -> list[tuple[bytes, str]]:
        if self._failures is None:
            failures = self.native.wait()
            self._run_after()
            self._failures = failures
        return self._failures

    def done(self) -> bool:
        if not self.native.done():
            return False
        self._run_after()
        return True

    def _run_after(self) -> None:
        after, self.after = self.after, None
        if after is not None:
            after()


def raise_failures(op: str, failures: list[tuple[bytes, str]]) -> None:
    if failures:
        raise StoreError.from_failures(op, failures)
