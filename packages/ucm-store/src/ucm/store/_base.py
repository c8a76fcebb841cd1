"""The store contract: what every UCM KV block store provides.

A store holds *blocks* addressed by opaque ids (``bytes`` of 1..64 bytes). A block is
split into ``num_shards`` shards (tensor-parallel ranks each write their own); a block
is visible to :meth:`KVStore.lookup` and :meth:`KVStore.load` only once every shard of
it has been written successfully. Stores are caches: a block may disappear (eviction,
another process removing it) and a load of it then fails, but a load never returns
bytes other than the ones that were dumped under that id.
"""

from __future__ import annotations

import abc
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

MAX_ID_BYTES = 64


class StoreError(Exception):
    """A dump or load task failed for some of its blocks.

    ``ids`` lists the ids of the blocks that failed (in submission order, each once);
    ``reasons`` maps each of them to a human readable cause.
    """

    def __init__(self, message: str, ids: Sequence[bytes] = (), reasons: Mapping[bytes, str] | None = None):
        super().__init__(message)
        self.ids: list[bytes] = list(ids)
        self.reasons: dict[bytes, str] = dict(reasons or {})

    @classmethod
    def from_failures(cls, op: str, failures: Sequence[tuple[bytes, str]]) -> StoreError:
        """Build the error of a ``dump`` or ``load`` (``op``) from its ``(id, reason)`` failures."""
        reasons: dict[bytes, str] = {}
        for block_id, reason in failures:
            reasons.setdefault(block_id, reason)
        shown = "; ".join(f"{bid.hex()}: {why}" for bid, why in list(reasons.items())[:4])
        more = f" (and {len(reasons) - 4} more)" if len(reasons) > 4 else ""
        return cls(f"{op} failed for {len(reasons)} block(s): {shown}{more}", list(reasons), reasons)


@dataclass(frozen=True)
class Option:
    """One configuration key of a store."""

    type: type | tuple[type, ...]
    default: Any = None
    required: bool = False
    help: str = ""
    minimum: int | None = None


def validate_config(store_name: str, schema: Mapping[str, Option], config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check ``config`` against ``schema``; return it with defaults filled in.

    Raises ``ValueError`` naming an unknown key (with the closest known key, if any),
    a missing required key, or a value of the wrong type.
    """
    config = dict(config or {})
    for key in config:
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"store {store_name!r}: unknown config key {key!r}{hint} (known keys: {', '.join(sorted(schema))})"
            )
    resolved: dict[str, Any] = {}
    for key, option in schema.items():
        if key not in config or config[key] is None:
            if option.required:
                raise ValueError(f"store {store_name!r}: missing required config key {key!r} ({option.help})")
            resolved[key] = option.default
            continue
        value = config[key]
        types = option.type if isinstance(option.type, tuple) else (option.type,)
        if isinstance(value, bool) and bool not in types:
            raise ValueError(f"store {store_name!r}: config key {key!r} must be {_type_names(types)}, got {value!r}")
        if int in types and float not in types and isinstance(value, float):
            raise ValueError(f"store {store_name!r}: config key {key!r} must be an integer, got {value!r}")
        if not isinstance(value, types):
            raise ValueError(
                f"store {store_name!r}: config key {key!r} must be {_type_names(types)}, got {type(value).__name__}"
            )
        if option.minimum is not None and value < option.minimum:
            raise ValueError(
                f"store {store_name!r}: config key {key!r} must be at least {option.minimum}, got {value!r}"
            )
        resolved[key] = value
    return resolved


def _type_names(types: tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in types)


def check_ids(ids: Sequence[bytes]) -> list[bytes]:
    """Return ``ids`` as a list, raising ``ValueError`` for any id that is not 1..64 bytes."""
    ids = list(ids)
    for index, block_id in enumerate(ids):
        if not isinstance(block_id, bytes):
            raise ValueError(f"ids[{index}] must be bytes, got {type(block_id).__name__}")
        if not 1 <= len(block_id) <= MAX_ID_BYTES:
            raise ValueError(f"ids[{index}] is {len(block_id)} bytes; ids must be 1..{MAX_ID_BYTES} bytes")
    return ids


class KVStore(abc.ABC):
    """Base class of every store. Subclasses are registered in the ``ucm.stores`` entry-point group.

    Stores are thread-safe. ``dump``/``load`` return at once with a task; the copying and I/O
    run in the background. Every task must eventually be passed to :meth:`wait` (or polled
    with :meth:`check` until it returns True) so that its buffers are released.

    Buffers: ``buffers[i]`` is one buffer or a list of buffers, gathered (dump) or scattered
    (load) in order, holding shard ``shards[i]`` of block ``ids[i]``. A buffer is anything that
    exposes the Python buffer protocol or DLPack (CPU), or an ``(address, nbytes)`` tuple of host
    memory that stays valid until the task finishes.
    """

    #: Configuration keys this store accepts; ``open_store`` validates the config against it.
    config_schema: ClassVar[Mapping[str, Option]] = {}

    def __init__(self, config: Mapping[str, Any]):
        self.config = dict(config)

    # -- lookups ---------------------------------------------------------------------------
    @abc.abstractmethod
    def lookup(self, ids: Sequence[bytes]) -> list[bool]:
        """For each id, whether the whole block (every shard) is present. Never raises for a miss."""

    def lookup_prefix(self, ids: Sequence[bytes]) -> int:
        """How many leading ids are present (stops looking at the first miss)."""
        count = 0
        for present in self.lookup(ids):
            if not present:
                break
            count += 1
        return count

    # -- transfers -------------------------------------------------------------------------
    @abc.abstractmethod
    def dump(self, ids: Sequence[bytes], buffers: Sequence[Any], shards: Sequence[int] | None = None) -> Any:
        """Start writing shard ``shards[i]`` of block ``ids[i]`` from ``buffers[i]``; return a task.

        Writing a block that is already stored is a successful no-op.
        """

    @abc.abstractmethod
    def load(self, ids: Sequence[bytes], buffers: Sequence[Any], shards: Sequence[int] | None = None) -> Any:
        """Start reading shard ``shards[i]`` of block ``ids[i]`` into ``buffers[i]``; return a task.

        A block that is missing, corrupt, or whose stored size differs from the buffers' total
        fails; the task's error names it. Buffers of failed blocks hold unspecified bytes.
        """

    #: True when :meth:`load_into` is implemented.
    can_load_into: bool = False

    def load_into(self, ids: Sequence[bytes], target: Any, shards: Sequence[int] | None = None) -> Any:
        """Start reading shard ``shards[i]`` of block ``ids[i]`` straight into chunk i of ``target``.

        ``target`` comes from :func:`ucm.store.transfer.paged_target`: a paged cache and where
        each chunk goes in it. Returns a task, as :meth:`load` does. The bytes of a failed chunk
        reach the cache before the failure is known; the caller must recompute what that chunk
        covers. Stores without this (``can_load_into`` false) are loaded into staging buffers
        and scattered with :func:`ucm.store.transfer.scatter_chunks`.
        """
        raise NotImplementedError(f"store {type(self).__name__} cannot load straight into a paged cache")

    @abc.abstractmethod
    def wait(self, task: Any) -> None:
        """Block until ``task`` has finished; raise :class:`StoreError` listing the failed ids."""

    @abc.abstractmethod
    def check(self, task: Any) -> bool:
        """True once ``task`` has finished, successfully or not (then ``wait`` returns at once)."""

    def prefetch(self, ids: Sequence[bytes]) -> None:  # noqa: B027 - optional hint, no-op by default
        """Hint that these blocks will be loaded soon. May do nothing."""

    def prewarm(self, budget_bytes: int, shard: int | None = None) -> None:  # noqa: B027 - optional, no-op
        """Start bringing up to ``budget_bytes`` of the most recently used blocks into memory in the
        background (shard ``shard`` of each block only, where given), so that the first loads after a
        process starts do not wait for a disk or a network. Returns at once; may do nothing."""

    def prewarm_stats(self) -> dict[str, Any] | None:
        """Progress of :meth:`prewarm`: ``running``, ``files``, ``bytes``, ``seconds``; None where it does
        nothing."""
        return None

    @abc.abstractmethod
    def remove(self, ids: Sequence[bytes]) -> None:
        """Remove these blocks (absent ids are ignored)."""

    def close(self) -> None:  # noqa: B027 - stores without resources need nothing here
        """Finish pending background work and release resources. Idempotent."""

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- helpers for subclasses ------------------------------------------------------------
    def _check_batch(self, ids: Sequence[bytes], buffers: Sequence[Any], shards: Sequence[int] | None) -> tuple:
        ids = check_ids(ids)
        buffers = list(buffers)
        if len(buffers) != len(ids):
            raise ValueError(f"got {len(ids)} ids but {len(buffers)} buffers")
        num_shards = self.config.get("num_shards", 1)
        if shards is None:
            shards = [0] * len(ids)
        else:
            shards = list(shards)
            if len(shards) != len(ids):
                raise ValueError(f"got {len(ids)} ids but {len(shards)} shards")
            for index, shard in enumerate(shards):
                if not isinstance(shard, int) or not 0 <= shard < num_shards:
                    raise ValueError(f"shards[{index}] = {shard!r} is outside 0..{num_shards - 1} (num_shards)")
        return ids, buffers, shards
