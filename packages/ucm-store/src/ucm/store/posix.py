"""The ``posix`` store: one file per block shard under a directory on a local disk or an NFS mount.

Many processes and hosts may share one root. Visibility is atomic (a shard is written to a
temporary file and renamed into place; a multi-shard block becomes visible when its commit
marker appears), every shard carries a checksum verified on load, and with ``capacity_bytes``
the least recently loaded blocks are evicted by whichever process notices the root is full.
With ``shared_memory_bytes``, the processes of one host also share a host-memory tier: a copy of
each shard written or loaded is kept in a memory filesystem, and loads are served from there
while the copy matches the store's file. The layout is described in docs/store.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ucm.store import _native
from ucm.store._base import Option
from ucm.store._native_store import NativeStore

FORMAT_NAME = "ucm-store"
FORMAT_VERSION = 1
MANIFEST = "ucm-store.json"
SHARED_MEMORY_DIR_ENV = "UCM_SHARED_MEMORY_DIR"


class PosixStore(NativeStore):
    config_schema = {
        "root": Option((str, os.PathLike), required=True, help="directory of the store (local disk or NFS mount)"),
        "num_shards": Option(int, 1, minimum=1, help="shards per block (e.g. tensor-parallel ranks)"),
        "threads": Option(int, 8, minimum=1, help="I/O threads"),
        "direct_io": Option(bool, False, help="read and write with O_DIRECT, bypassing the page cache"),
        "capacity_bytes": Option(int, None, minimum=1, help="evict least recently used blocks above this size"),
        "fsync": Option(bool, False, help="flush each shard to stable storage before it becomes visible"),
        "shard_bytes": Option(int, None, minimum=1, help="reject transfers whose buffers do not total this size"),
        "shared_memory_bytes": Option(
            int, 0, minimum=0, help="size of a host-memory tier that this host's processes share (0: none)"
        ),
        "shared_memory_dir": Option(
            (str, os.PathLike),
            None,
            help="memory filesystem of the shared tier (default: $UCM_SHARED_MEMORY_DIR, else /dev/shm)",
        ),
    }

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        root = os.path.abspath(os.fspath(self.config["root"]))
        self.config["root"] = root
        _prepare_root(root)
        shm_dir = shared_memory_dir(self.config["shared_memory_dir"])
        self.config["shared_memory_dir"] = shm_dir
        if self.config["shared_memory_bytes"] and not os.path.isdir(shm_dir):
            raise ValueError(
                f"store 'posix': shared_memory_dir {shm_dir!r} is not a directory; "
                "point it at a memory filesystem (tmpfs) or set shared_memory_bytes to 0"
            )
        try:
            self._native = _native.PosixStore(
                root=root,
                num_shards=self.config["num_shards"],
                threads=self.config["threads"],
                direct_io=self.config["direct_io"],
                capacity_bytes=self.config["capacity_bytes"] or 0,
                fsync=self.config["fsync"],
                shard_bytes=self.config["shard_bytes"] or 0,
                shared_memory_bytes=self.config["shared_memory_bytes"],
                shared_memory_dir=shm_dir,
                shared_memory_name=shared_memory_name(root),
            )
        except ValueError as exc:
            raise ValueError(f"store 'posix': {exc}") from None
        self._closed = False

    def lookup(self, ids: Sequence[bytes]) -> list[bool]:
        return self._native.lookup(ids)

    def lookup_prefix(self, ids: Sequence[bytes]) -> int:
        return self._native.lookup_prefix(ids)

    def prefetch(self, ids: Sequence[bytes]) -> None:
        self._native.prefetch(ids)

    def prewarm(self, budget_bytes: int, shard: int | None = None) -> None:
        """Read the most recently used shard files back into the OS page cache, newest first (recency
        is the file's mtime, as for eviction), on a background thread at the lowest CPU priority."""
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
            raise ValueError(f"store 'posix': prewarm budget_bytes must be an int >= 0, got {budget_bytes!r}")
        self._native.prewarm(budget_bytes, -1 if shard is None else shard)

    def prewarm_stats(self) -> dict[str, Any]:
        return self._native.prewarm_stats()

    def wait_shared_memory(self) -> None:
        """Wait until the shared tier holds copies of the files this store has written or loaded from
        disk so far (a background thread at the lowest CPU priority makes them; ``close`` makes the
        ones still queued, for at most 5 seconds)."""
        self._native.wait_shared_memory()

    def shared_memory_stats(self) -> dict[str, Any]:
        """Counters of the shared host-memory tier: loads it served (``hits``), did not hold
        (``misses``), held only for a file since replaced (``stale``) or lost to a concurrent writer or
        damage (``failed``); shards copied in (``written``) or not (``unwritten``); its ``arenas``,
        ``slots``, ``filled`` slots, slots a writer holds (``writing``), and any ``error`` opening it."""
        return self._native.shared_memory_stats()

    def shared_memory_hits(self) -> int:
        """``shared_memory_stats()["hits"]`` without the rest, which scans the tier's slot headers:
        cheap enough to ask on every engine step."""
        return self._native.shared_memory_hits()

    def remove(self, ids: Sequence[bytes]) -> None:
        self._native.remove(ids)

    def evict_now(self) -> int:
        """Run one eviction pass now (also removes temporary files of dead writers); return bytes freed."""
        return self._native.evict_now()


def shared_memory_dir(configured: str | os.PathLike | None = None) -> str:
    """Where a store keeps its shared tier's arena files: ``configured`` (a store's
    ``shared_memory_dir``), else ``$UCM_SHARED_MEMORY_DIR``, else ``/dev/shm``."""
    return os.fspath(configured or os.environ.get(SHARED_MEMORY_DIR_ENV) or "/dev/shm")


def shared_memory_name(root: str | os.PathLike) -> str:
    """The prefix of the shared tier's arena files of a store root (one tier per root and host)."""
    digest = hashlib.blake2b(os.fsencode(os.path.realpath(root)), digest_size=8).hexdigest()
    return f"ucm-{digest}"


def shared_memory_files(root: str | os.PathLike, directory: str | os.PathLike | None = None) -> list[str]:
    """The arena files of a store root's shared tier, in ``directory`` (default: where stores put
    them); removing them frees their memory (processes that map one keep it until they exit)."""
    directory = shared_memory_dir(directory)
    prefix = shared_memory_name(root) + "-"
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(os.path.join(directory, n) for n in names if n.startswith(prefix) and n.endswith(".arena"))


def _prepare_root(root: str) -> None:
    """Create the root if needed and check that it holds this format (or nothing yet)."""
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"store 'posix': cannot create root {root!r}: {exc.strerror}") from None
    manifest = os.path.join(root, MANIFEST)
    wanted = {"format": FORMAT_NAME, "version": FORMAT_VERSION}
    try:
        with open(manifest, encoding="utf-8") as f:
            found = json.load(f)
    except FileNotFoundError:
        tmp = f"{manifest}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(wanted, f)
        os.replace(tmp, manifest)
        return
    except (OSError, ValueError) as exc:
        raise ValueError(f"store 'posix': cannot read {manifest}: {exc}") from None
    if found.get("format") != FORMAT_NAME or found.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"store 'posix': root {root!r} holds {found!r}, not {wanted!r}; use another root or a matching version"
        )
