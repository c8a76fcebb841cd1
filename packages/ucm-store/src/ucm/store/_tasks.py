"""Tasks of the native stores, as handed to callers of ``dump`` and ``load``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ucm.store._base import StoreError


@dataclass
class NativeTask:
    """A native batch plus the name of the operation, for error messages."""

    op: str
    native: Any  # ucm.store._native.Task

    def failures(self) -> list[tuple[bytes, str]]:
        return self.native.wait()

    def done(self) -> bool:
        return self.native.done()


def raise_failures(op: str, failures: list[tuple[bytes, str]]) -> None:
    if failures:
        raise StoreError.from_failures(op, failures)
