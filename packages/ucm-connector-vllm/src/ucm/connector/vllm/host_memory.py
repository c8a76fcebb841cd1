"""How much memory this process may still take: the budget behind the connector's defaults for the
host-memory cache, prewarm and the shared tier.

``MemAvailable`` alone overstates it inside a container: there the process's memory cgroup (v1 or
v2), or one of its ancestors, sets a limit well below the host's memory. Exceeding it gets the engine
killed, so the defaults take the smaller of the two.
"""

from __future__ import annotations

import os

#: Where the kernel mounts the cgroup hierarchies, and where it says which groups this process is in.
CGROUP_MOUNT = "/sys/fs/cgroup"
PROC_SELF_CGROUP = "/proc/self/cgroup"
PROC_MEMINFO = "/proc/meminfo"

#: cgroup v1 reports "no limit" as a huge page-rounded number rather than "max".
_V1_UNLIMITED = 1 << 62


def available_memory_bytes(
    meminfo: str = PROC_MEMINFO, proc_cgroup: str = PROC_SELF_CGROUP, mount: str = CGROUP_MOUNT
) -> int:
    """``MemAvailable``, or less where a memory cgroup of this process allows less; 0 where
    ``meminfo`` cannot be read (the callers then turn the memory-hungry defaults off)."""
    available = 0
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        return 0
    headroom = cgroup_memory_headroom(proc_cgroup, mount)
    return available if headroom is None else min(available, headroom)


def cgroup_memory_headroom(proc_cgroup: str = PROC_SELF_CGROUP, mount: str = CGROUP_MOUNT) -> int | None:
    """The least headroom (limit less usage, inactive file pages counted as free) over this process's
    memory cgroup and its ancestors; None where no limit is set or none can be read."""
    try:
        with open(proc_cgroup, encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    least: int | None = None
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":
            groups = _groups(mount, path)  # v2: one unified hierarchy
            files = ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            groups = _groups(os.path.join(mount, "memory"), path)
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        for group in groups:
            headroom = _headroom(group, *files)
            if headroom is not None and (least is None or headroom < least):
                least = headroom
    return least


def _groups(root: str, path: str) -> list[str]:
    """``root/path`` and its ancestors up to ``root``. Where ``path`` is not under ``root`` (a
    container that sees its own group as the root), just ``root``."""
    parts = [p for p in path.split("/") if p]
    if parts and not os.path.isdir(os.path.join(root, *parts)):
        parts = []
    return [os.path.join(root, *parts[:n]) for n in range(len(parts), -1, -1)]


def _headroom(group: str, limit_file: str, usage_file: str, inactive_key: str) -> int | None:
    try:
        with open(os.path.join(group, limit_file), encoding="ascii") as f:
            limit = f.read().strip()
        if limit == "max" or int(limit) >= _V1_UNLIMITED:
            return None
        with open(os.path.join(group, usage_file), encoding="ascii") as f:
            usage = int(f.read().strip())
        inactive = 0
        try:
            with open(os.path.join(group, "memory.stat"), encoding="ascii") as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == inactive_key:
                        inactive = int(value)
                        break
        except OSError:
            pass
        return max(0, int(limit) - max(0, usage - inactive))
    except (OSError, ValueError):
        return None
