"""UCM's KV block stores: ``open_store(name, config)`` and the ``KVStore`` contract.

Stores are found by name in the ``ucm.stores`` entry-point group; ``posix`` and ``memory``
come with this distribution. See docs/store.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ucm.store._base import KVStore, Option, StoreError, validate_config
from ucm.store.plugins import PluginNotFoundError, available_plugins, load_plugin

__all__ = [
    "KVStore",
    "Option",
    "PluginNotFoundError",
    "StoreError",
    "available_stores",
    "open_store",
]

STORE_GROUP = "ucm.stores"


def available_stores() -> list[str]:
    """Names of the installed stores."""
    return available_plugins(STORE_GROUP)


def open_store(name: str, config: Mapping[str, Any] | None = None) -> KVStore:
    """Open the store registered as ``name`` with ``config`` (validated against its ``config_schema``).

    Raises ``ValueError`` for an unknown store (listing the installed ones), or an unknown,
    missing or mistyped config key (naming it).
    """
    store_class = load_plugin(STORE_GROUP, name, KVStore)
    return store_class(validate_config(name, store_class.config_schema, config))
