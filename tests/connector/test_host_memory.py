"""The memory budget behind the connector's defaults (host-memory cache, prewarm, shared tier) stays
within a container's memory limit, cgroup v1 or v2, set on its group or one above it.

The kernel's files are laid out in ``tmp_path`` the way /proc and /sys/fs/cgroup show them.
"""

from __future__ import annotations

from pathlib import Path

from ucm.connector.vllm.host_memory import available_memory_bytes, cgroup_memory_headroom

GIB = 1 << 30


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def host(tmp_path: Path, available: int, cgroup: str) -> dict[str, str]:
    write(tmp_path / "meminfo", f"MemTotal: {64 * GIB // 1024} kB\nMemAvailable: {available // 1024} kB\n")
    write(tmp_path / "self-cgroup", cgroup)
    return {
        "meminfo": str(tmp_path / "meminfo"),
        "proc_cgroup": str(tmp_path / "self-cgroup"),
        "mount": str(tmp_path / "cgroup"),
    }


def v2_group(tmp_path: Path, path: str, limit: str, current: int, inactive: int = 0) -> None:
    group = tmp_path / "cgroup" / path
    write(group / "memory.max", limit + "\n")
    write(group / "memory.current", f"{current}\n")
    write(group / "memory.stat", f"anon {current - inactive}\nfile {inactive}\ninactive_file {inactive}\n")


def v1_group(tmp_path: Path, path: str, limit: int, usage: int, inactive: int = 0) -> None:
    group = tmp_path / "cgroup" / "memory" / path
    write(group / "memory.limit_in_bytes", f"{limit}\n")
    write(group / "memory.usage_in_bytes", f"{usage}\n")
    write(group / "memory.stat", f"inactive_file {inactive}\ntotal_inactive_file {inactive}\n")


def test_without_a_limit_the_budget_is_mem_available(tmp_path):
    files = host(tmp_path, 20 * GIB, "0::/\n")
    v2_group(tmp_path, "", "max", 3 * GIB)
    assert available_memory_bytes(**files) == 20 * GIB


def test_a_v2_limit_on_the_process_group_caps_the_budget_and_inactive_file_pages_count_as_free(tmp_path):
    files = host(tmp_path, 20 * GIB, "0::/pod/engine\n")
    v2_group(tmp_path, "pod/engine", str(8 * GIB), current=6 * GIB, inactive=1 * GIB)
    assert available_memory_bytes(**files) == 3 * GIB


def test_a_v2_limit_on_a_parent_group_caps_the_budget(tmp_path):
    # Kubernetes sets the pod's limit on the pod's group; the container's own group says "max".
    files = host(tmp_path, 20 * GIB, "0::/kubepods/pod1/engine\n")
    v2_group(tmp_path, "kubepods/pod1/engine", "max", current=2 * GIB)
    v2_group(tmp_path, "kubepods/pod1", str(4 * GIB), current=3 * GIB)
    assert available_memory_bytes(**files) == 1 * GIB


def test_a_v1_memory_controller_limit_caps_the_budget(tmp_path):
    files = host(tmp_path, 20 * GIB, "4:memory:/job/engine\n3:cpuset:/\n1:name=systemd:/\n")
    v1_group(tmp_path, "job/engine", limit=10 * GIB, usage=9 * GIB, inactive=2 * GIB)
    v1_group(tmp_path, "job", limit=(1 << 63) - 4096, usage=9 * GIB)  # v1's "no limit"
    assert available_memory_bytes(**files) == 3 * GIB


def test_a_container_that_sees_its_group_as_the_root_uses_the_mount(tmp_path):
    # Without a cgroup namespace the path names the host's group, which the container mounts as its root.
    files = host(tmp_path, 20 * GIB, "0::/system.slice/docker-1234.scope\n")
    v2_group(tmp_path, "", str(6 * GIB), current=5 * GIB)
    assert available_memory_bytes(**files) == 1 * GIB


def test_a_group_over_its_limit_leaves_nothing_and_unreadable_files_leave_mem_available(tmp_path):
    files = host(tmp_path, 20 * GIB, "0::/tight\n")
    v2_group(tmp_path, "tight", str(2 * GIB), current=3 * GIB)
    assert available_memory_bytes(**files) == 0
    assert cgroup_memory_headroom(str(tmp_path / "no-such-file"), files["mount"]) is None
    (tmp_path / "cgroup" / "tight" / "memory.current").write_text("not a number\n")
    assert available_memory_bytes(**files) == 20 * GIB


def test_without_meminfo_the_budget_is_zero(tmp_path):
    files = host(tmp_path, 20 * GIB, "0::/\n")
    (tmp_path / "meminfo").unlink()
    assert available_memory_bytes(**files) == 0
