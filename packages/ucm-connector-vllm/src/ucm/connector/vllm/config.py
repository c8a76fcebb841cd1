"""The connector's settings: ``kv_connector_extra_config`` keys, checked and with defaults."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any


def default_store_root() -> str:
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "ucm", "kv")


def _check_int(extra: Mapping[str, Any], key: str, minimum: int) -> None:
    """An optional integer setting (``None``: the default) must be an int, not a bool, and >= ``minimum``."""
    value = extra.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
        raise ValueError(f"UcmConnector: {key!r} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class ConnectorConfig:
    #: Name of the store (entry point in ``ucm.stores``).
    store: str = "posix"
    #: The store's config; default: a ``posix`` root under the user's cache directory.
    store_config: dict[str, Any] = field(default_factory=dict)
    #: Tokens per stored chunk; default: the engine's block size. Must divide the block size.
    chunk_tokens: int | None = None
    #: Replaces the model path in the key namespace, so copies of one model at different paths share blocks.
    namespace: str | None = None
    #: Load external hits asynchronously (other requests keep running while a load is in flight).
    load_async: bool = True
    #: At start-up, bytes of the store's most recently used chunks to read back into memory in the
    #: background (the store's ``prewarm``); default: the size of this engine's KV cache, at most a
    #: quarter of the memory available and at most 4 GiB; 0 turns it off.
    prewarm_bytes: int | None = None
    #: Bytes of chunks copied out of the KV cache and not yet in the store, at most: a save beyond it
    #: is skipped (a later request recomputes those chunks) rather than holding more memory while the
    #: store falls behind. Default: a quarter of the memory available at start, divided among the
    #: tensor-parallel ranks, at most 4 GiB per rank. A ``kv_producer`` never skips (it waits for
    #: every save). 0: skip whenever a save is in flight.
    save_backlog_bytes: int | None = None
    #: Sparse attention for decode (``ucm-sparse``): algorithm, budget, windows, stride (docs/sparse.md).
    sparse: dict[str, Any] | None = None

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> ConnectorConfig:
        extra = dict(extra or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, known, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(
                f"UcmConnector: unknown kv_connector_extra_config key(s) {', '.join(hints)}; "
                f"known keys: {', '.join(sorted(known))}"
            )
        if "store_config" in extra and not isinstance(extra["store_config"], Mapping):
            raise ValueError("UcmConnector: kv_connector_extra_config 'store_config' must be a dict")
        _check_int(extra, "chunk_tokens", minimum=1)
        _check_int(extra, "prewarm_bytes", minimum=0)
        _check_int(extra, "save_backlog_bytes", minimum=0)
        if extra.get("sparse") is not None:
            if not isinstance(extra["sparse"], Mapping):
                raise ValueError("UcmConnector: kv_connector_extra_config 'sparse' must be a dict")
            extra["sparse"] = dict(extra["sparse"])
        config = cls(**extra)
        if not isinstance(config.store, str):
            raise ValueError(f"UcmConnector: 'store' must be a store name, got {config.store!r}")
        return config

    def resolved_store_config(self, num_shards: int) -> dict[str, Any]:
        """The store config to open, with the default root and the tensor-parallel shard count filled in."""
        config = dict(self.store_config)
        if self.store == "posix":
            config.setdefault("root", default_store_root())
        config.setdefault("num_shards", num_shards)
        return config
