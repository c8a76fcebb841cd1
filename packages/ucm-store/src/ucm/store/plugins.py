"""The one plug-in loader of UCM: every entry-point group (``ucm.stores``, ``ucm.sparse``, ...) goes through it."""

from __future__ import annotations

import functools
from importlib.metadata import EntryPoint, entry_points


class PluginNotFoundError(ValueError):
    """No plug-in of that name is installed in the group."""


@functools.cache
def _group(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


def available_plugins(group: str) -> list[str]:
    """Names of the plug-ins installed in ``group``, sorted."""
    return sorted(_group(group))


@functools.cache
def load_plugin(group: str, name: str, base: type | None = None) -> type:
    """Import the class registered as ``name`` in ``group``; check that it subclasses ``base``.

    Raises :class:`PluginNotFoundError` (a ``ValueError``) listing what is installed, or
    ``TypeError`` when the entry point names something that is not a ``base`` subclass.
    """
    entry = _group(group).get(name)
    if entry is None:
        installed = ", ".join(available_plugins(group)) or "none"
        raise PluginNotFoundError(
            f"no {group!r} plug-in named {name!r} is installed (installed: {installed}); "
            "check the spelling, or install the distribution that provides it"
        )
    loaded = entry.load()
    if base is not None and not (isinstance(loaded, type) and issubclass(loaded, base)):
        raise TypeError(f"{group!r} plug-in {name!r} ({entry.value}) is not a subclass of {base.__qualname__}")
    return loaded
