"""Helpers shared by the ucm-store tests and the child processes they start.

Every byte a test dumps is derived from the block id and shard, so any process can tell what a
block must contain without being told: a load that returns other bytes is a store bug.
Child processes import this module: :func:`run_child` puts this directory on ``PYTHONPATH``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

#: Every kind of buffer the stores take: ``address`` is an ``(address, nbytes)`` tuple; ``bytes`` is dump only.
BUFFER_KINDS = ("bytes", "bytearray", "memoryview", "numpy", "torch", "address")

# Found without importing it: child processes that never touch a tensor start faster.
HAVE_TORCH = importlib.util.find_spec("torch") is not None

#: Buffer kinds usable in this environment (torch tensors only where torch is installed).
AVAILABLE_KINDS = tuple(kind for kind in BUFFER_KINDS if kind != "torch" or HAVE_TORCH)
AVAILABLE_LOAD_KINDS = tuple(kind for kind in AVAILABLE_KINDS if kind != "bytes")


def block_ids(count: int, tag: str) -> list[bytes]:
    """``count`` distinct 32-byte ids, like the hashes vLLM uses; ``tag`` keeps tests apart."""
    return [hashlib.sha256(f"{tag}:{index}".encode()).digest() for index in range(count)]


def _seed(block_id: bytes, shard: int, salt: bytes = b"") -> int:
    digest = hashlib.blake2b(block_id + bytes([shard]) + salt, digest_size=8).digest()
    return int.from_bytes(digest, "little")


def shard_size(block_id: bytes, shard: int, low: int, high: int) -> int:
    """A size in ``low..high`` (inclusive) that depends only on the block id and shard."""
    return low + _seed(block_id, shard, b"size") % (high - low + 1)


def payload(block_id: bytes, shard: int, size: int) -> bytes:
    """The ``size`` bytes that shard ``shard`` of ``block_id`` holds in every test."""
    rng = np.random.default_rng(_seed(block_id, shard))
    return rng.integers(0, 256, size, dtype=np.uint8).tobytes()


def split_sizes(total: int, parts: int, seed: int) -> list[int]:
    """Split ``total`` into ``parts`` positive, mostly unequal sizes (fewer parts if total is tiny)."""
    parts = max(1, min(parts, total))
    rng = np.random.default_rng(seed)
    cuts = sorted(rng.choice(np.arange(1, total), size=parts - 1, replace=False).tolist()) if parts > 1 else []
    edges = [0, *cuts, total]
    return [edges[i + 1] - edges[i] for i in range(parts)]


class Buffer:
    """One buffer of a given kind, as passed to the store, plus a way to read its bytes back."""

    def __init__(self, kind: str, nbytes: int, data: bytes | None = None):
        self.kind = kind
        if kind == "bytes":
            assert data is not None, "bytes buffers are read-only: dump only"
            self._backing = data
            self.obj = data
            return
        if kind in ("bytearray", "memoryview"):
            self._backing = bytearray(data) if data is not None else bytearray(b"\xa5" * nbytes)
            self.obj = self._backing if kind == "bytearray" else memoryview(self._backing)
            return
        array = np.frombuffer(data, dtype=np.uint8).copy() if data is not None else np.full(nbytes, 0xA5, np.uint8)
        if kind == "numpy":
            # KV caches are 2-D half-precision arrays when the size allows it.
            self._backing = array.view(np.float16).reshape(2, -1) if nbytes % 4 == 0 else array
            self.obj = self._backing
        elif kind == "torch":
            import torch

            tensor = torch.from_numpy(array)
            self._backing = tensor.view(torch.bfloat16).reshape(2, -1) if nbytes % 4 == 0 else tensor
            self.obj = self._backing
        elif kind == "address":
            self._backing = array
            self.obj = (array.ctypes.data, nbytes)
        else:
            raise ValueError(f"unknown buffer kind {kind!r}")

    def value(self) -> bytes:
        if self.kind in ("bytes", "bytearray", "memoryview"):
            return bytes(self._backing)
        if self.kind == "torch":
            import torch

            return self._backing.contiguous().view(torch.uint8).numpy().tobytes()
        return self._backing.tobytes()


class Slot:
    """The buffers of one ``(id, shard)`` entry of a batch: a single buffer or a gathered list."""

    def __init__(self, kind: str, sizes: Sequence[int], data: bytes | None, as_list: bool):
        offsets = np.cumsum([0, *sizes]).tolist()
        self.buffers = [
            Buffer(kind, size, None if data is None else data[offsets[i] : offsets[i + 1]])
            for i, size in enumerate(sizes)
        ]
        self.arg = [b.obj for b in self.buffers] if as_list else self.buffers[0].obj

    def value(self) -> bytes:
        return b"".join(b.value() for b in self.buffers)


def dump_slot(data: bytes, kind: str = "bytearray", parts: int = 1, seed: int = 0) -> Slot:
    """A slot holding ``data``; ``parts > 1`` gathers it from a list of that many buffers."""
    return Slot(kind, split_sizes(len(data), parts, seed), data, as_list=parts > 1)


def load_slot(nbytes: int, kind: str = "bytearray", parts: int = 1, seed: int = 0) -> Slot:
    """An empty slot of ``nbytes`` (filled with 0xa5); ``parts > 1`` scatters into a list of that many buffers."""
    return Slot(kind, split_sizes(nbytes, parts, seed), None, as_list=parts > 1)


Entry = tuple[bytes, int, bytes]  # (block id, shard, the shard's bytes)


def make_entries(ids: Sequence[bytes], num_shards: int = 1, low: int = 256, high: int = 4096) -> list[Entry]:
    """Every shard of every block in ``ids``, each ``low..high`` bytes long."""
    return [
        (block_id, shard, payload(block_id, shard, shard_size(block_id, shard, low, high)))
        for block_id in ids
        for shard in range(num_shards)
    ]


def _kind_and_parts(index: int, kinds: Sequence[str], parts: int | Sequence[int]) -> tuple[str, int]:
    counts = [parts] if isinstance(parts, int) else list(parts)
    return kinds[index % len(kinds)], counts[index % len(counts)]


def dump_entries(store, entries: Sequence[Entry], kinds: Sequence[str] = ("bytearray",), parts=1) -> None:
    """Dump ``entries`` in one batch; entry ``i`` uses buffer kind ``kinds[i % len]`` gathered from ``parts``."""
    slots = []
    for index, (_, _, data) in enumerate(entries):
        kind, count = _kind_and_parts(index, kinds, parts)
        slots.append(dump_slot(data, kind, count, seed=index))
    task = store.dump([e[0] for e in entries], [s.arg for s in slots], [e[1] for e in entries])
    store.wait(task)


def load_entries(store, entries: Sequence[Entry], kinds: Sequence[str] = ("bytearray",), parts=1):
    """Load ``entries`` in one batch; return ``(failed ids, ids whose loaded bytes are wrong)``.

    Only entries of blocks the store did not report as failed are compared.
    """
    from ucm.store import StoreError

    slots = []
    for index, (_, _, data) in enumerate(entries):
        kind, count = _kind_and_parts(index, kinds, parts)
        slots.append(load_slot(len(data), kind, count, seed=index + 1))
    task = store.load([e[0] for e in entries], [s.arg for s in slots], [e[1] for e in entries])
    try:
        store.wait(task)
        failed: list[bytes] = []
    except StoreError as error:
        failed = list(error.ids)
    failed_set = set(failed)
    wrong = []
    for (block_id, _, data), slot in zip(entries, slots, strict=True):
        if block_id not in failed_set and slot.value() != data and block_id not in wrong:
            wrong.append(block_id)
    return failed, wrong


# -- store configurations ------------------------------------------------------------------

#: Every store configuration the contract tests run against.
STORE_KINDS = (
    "posix",
    "posix+shm",
    "memory",
    "memory+posix",
    "example-dict",
    "memory+example-dict",
    "redis",
    "memory+redis",
)

#: Set by the ``redis_server`` fixture (tests/store/conftest.py); child processes inherit it.
REDIS_URL_ENV = "UCM_TEST_REDIS_URL"

MEMORY_CAPACITY = 256 << 20
SHARED_MEMORY_CAPACITY = 16 << 20


def store_config(kind: str, root: Path, num_shards: int = 1, **options) -> tuple[str, dict]:
    """``(store name, config)`` for one of :data:`STORE_KINDS`; ``options`` go to the outer store."""
    if kind == "posix":
        return "posix", {"root": str(root), "num_shards": num_shards, **options}
    if kind == "posix+shm":
        # The shared host-memory tier in front of the files; its arenas go where the session says.
        config = {"root": str(root), "num_shards": num_shards, "shared_memory_bytes": SHARED_MEMORY_CAPACITY}
        return "posix", {**config, **options}
    if kind == "example-dict":
        return "example-dict", {"num_shards": num_shards, **options}
    if kind == "redis":
        # The root's path keeps the keys of one test apart from every other test's.
        return "redis", {"url": os.environ[REDIS_URL_ENV], "prefix": f"{root}:", "num_shards": num_shards, **options}
    if kind == "memory":
        return "memory", {"capacity_bytes": MEMORY_CAPACITY, "num_shards": num_shards, **options}
    if kind.startswith("memory+"):
        backend_name, backend_config = store_config(kind.removeprefix("memory+"), root, num_shards)
        config = {"capacity_bytes": MEMORY_CAPACITY, "num_shards": num_shards, **options}
        config["backend"] = {"name": backend_name, "config": backend_config}
        return "memory", config
    raise ValueError(kind)


# -- child processes -----------------------------------------------------------------------


def run_child(script: str, *args, timeout: float = 120) -> str:
    """Run ``script`` in a fresh interpreter with ``args`` (JSON-encoded in ``sys.argv[1:]``); return stdout.

    The script can ``import storetest``. A failing child fails the test with its stderr.
    """
    proc = subprocess.run(child_argv(script, args), env=child_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stderr}"
    return proc.stdout


def start_child(script: str, *args) -> subprocess.Popen:
    """Start ``script`` like :func:`run_child` without waiting for it; its stdout and stderr are text pipes."""
    return subprocess.Popen(
        child_argv(script, args), env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def run_child_on_mount(script: str, args, mount_point: Path, mount: str, timeout: float = 120):
    """Run ``script`` like :func:`run_child`, in a private user and mount namespace where ``mount`` (``mount``'s
    arguments before the mount point, e.g. ``-t ramfs none``) is mounted at ``mount_point``; the host is left
    untouched. Skips the test where such a mount is not allowed. Returns the finished process, whose stdout
    starts after the line the mount printed."""
    import pytest  # children import this module too: they do without pytest

    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs unshare(1) to mount a filesystem of its own")
    mount_then_run = f'mount {mount} "$0" && echo mounted && exec "$@"'
    proc = subprocess.run(
        [unshare, "-Urm", "sh", "-c", mount_then_run, str(mount_point), *child_argv(script, args)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if not proc.stdout.startswith("mounted"):
        pytest.skip(f"cannot mount {mount} in a user namespace here: {proc.stderr.strip()}")
    proc.stdout = proc.stdout.split("\n", 1)[1]
    return proc


def child_args() -> list:
    """In a child script: the arguments its parent passed."""
    return [json.loads(arg) for arg in sys.argv[1:]]


def child_argv(script: str, args) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(script), *(json.dumps(arg) for arg in args)]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    return env


# -- posix root layout ---------------------------------------------------------------------


def block_files(root: Path, block_id: bytes) -> list[Path]:
    """The payload files of a block in a posix root: ``<hex>`` or its shard files ``<hex>.<k>``."""
    name = block_id.hex()
    files = list(root.glob(f"blocks/*/{name}")) + list(root.glob(f"blocks/*/{name}.*"))
    return sorted(path for path in files if path.suffix != ".ok")


def temp_files(root: Path) -> list[Path]:
    return sorted(root.glob("blocks/*/.tmp.*"))


def disk_bytes(root: Path) -> int:
    """Bytes of every file under ``root/blocks`` (files removed while counting count as 0)."""
    total = 0
    for directory, _, names in os.walk(root / "blocks"):
        for name in names:
            try:
                total += os.stat(os.path.join(directory, name)).st_size
            except FileNotFoundError:
                pass
    return total


# -- large blocks ------------------------------------------------------------------------------


def big_entry(block_id: bytes) -> Entry:
    """An 8..16 MiB single-shard block: large enough that writing it takes a while."""
    return (block_id, 0, payload(block_id, 0, shard_size(block_id, 0, 8 << 20, 16 << 20)))


#: Child script: dump large blocks ``block_ids(count, tag)`` to a posix root, keeping two batches in flight.
BIG_WRITER = """
import storetest
from ucm.store import open_store

root, tag, count, options = storetest.child_args()
store = open_store("posix", {"root": root, **options})
print("ready", flush=True)
ids = storetest.block_ids(count, tag)
pending = None
for start in range(0, count, 8):
    entries = [storetest.big_entry(block_id) for block_id in ids[start : start + 8]]
    task = store.dump([e[0] for e in entries], [e[2] for e in entries])
    if pending is not None:
        store.wait(pending[0])
    pending = (task, entries)
store.wait(pending[0])
print("done", flush=True)
"""


def supports_o_direct(directory: Path) -> bool:
    probe = directory / f".odirect-{uuid.uuid4().hex}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    probe.unlink()
    return True
