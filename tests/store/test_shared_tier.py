"""The posix store's shared host-memory tier (``shared_memory_bytes``): processes of one host share
copies of the shards in a memory filesystem, and a copy is served only while it is the store's file.

Every test uses real processes and a real arena file; the arena's layout is in csrc/core/shared_tier.h.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import signal
import struct
import time
from pathlib import Path

import pytest
from storetest import (
    big_entry,
    block_files,
    block_ids,
    dump_entries,
    load_entries,
    make_entries,
    payload,
    run_child,
    run_child_on_mount,
    start_child,
    supports_o_direct,
)

from ucm.store import StoreError, open_store

HEADER_BYTES = 4096
SLOT_HEADER_BYTES = 128


@pytest.fixture
def tier(tmp_path):
    """``tier(**options)``: a posix store config on ``tmp_path/root`` with a tier in its own directory."""
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    directory = Path(os.environ.get("UCM_SHARED_MEMORY_DIR") or shm) / f"tier-{tmp_path.name}"
    directory.mkdir(parents=True, exist_ok=True)

    def config(**options):
        return {
            "root": str(tmp_path / "root"),
            "shared_memory_bytes": 64 << 20,
            "shared_memory_dir": str(directory),
            **options,
        }

    config.directory = directory
    yield config
    for path in directory.glob("*"):
        path.unlink()
    directory.rmdir()


class Arena:
    """The one arena file of a tier directory, read and changed the way a damaged or dead process would."""

    def __init__(self, directory: Path):
        (self.path,) = directory.glob("*.arena")
        header = self.path.read_bytes()[:HEADER_BYTES]
        self.ways, self.payload_bytes, self.slots, self.stride, _, self.data_offset = struct.unpack_from(
            "<IQQQQQ", header, 12
        )

    def slot_header(self, index: int) -> tuple[int, int]:
        """``(sequence count, id length)`` of slot ``index``."""
        with open(self.path, "rb") as f:
            f.seek(HEADER_BYTES + index * SLOT_HEADER_BYTES)
            raw = f.read(SLOT_HEADER_BYTES)
        return struct.unpack_from("<Q", raw, 0)[0], struct.unpack_from("<I", raw, 52)[0]

    def filled(self) -> list[int]:
        return [i for i in range(self.slots) if self.slot_header(i)[1] != 0]

    def poke(self, offset: int, data: bytes) -> None:
        with open(self.path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            m[offset : offset + len(data)] = data

    def own(self, index: int, claimed_s: int) -> None:
        """Leave slot ``index`` owned by a writer (odd count) that claimed it at ``claimed_s``."""
        seq, _ = self.slot_header(index)
        base = HEADER_BYTES + index * SLOT_HEADER_BYTES
        self.poke(base, struct.pack("<Q", seq | 1))
        self.poke(base + 24, struct.pack("<Q", claimed_s))


def kill(child) -> None:
    child.send_signal(signal.SIGKILL)
    child.communicate()


#: Child script: dump ``count`` blocks of ``size`` bytes tagged ``tag`` into a posix store with ``config``.
DUMPER = """
import storetest
from ucm.store import open_store

config, tag, count, size = storetest.child_args()
with open_store("posix", config) as store:
    ids = storetest.block_ids(count, tag)
    storetest.dump_entries(store, [(i, 0, storetest.payload(i, 0, size)) for i in ids])
    store.wait_shared_memory()
    print(store.shared_memory_stats()["written"])
"""

#: Child script: load them back in a fresh process; prints the tier's counters and any wrong or failed block.
LOADER = """
import json, storetest
from ucm.store import open_store

config, tag, count, size = storetest.child_args()
with open_store("posix", config) as store:
    entries = [(i, 0, storetest.payload(i, 0, size)) for i in storetest.block_ids(count, tag)]
    failed, wrong = storetest.load_entries(store, entries)
    stats = store.shared_memory_stats()
    print(json.dumps({"failed": len(failed), "wrong": len(wrong), "quick_hits": store.shared_memory_hits(), **stats}))
"""


def test_a_fresh_process_loads_what_another_saved_from_shared_memory(tier):
    config = tier()
    assert run_child(DUMPER, config, "fresh", 40, 100_000).strip() == "40"
    got = json.loads(run_child(LOADER, config, "fresh", 40, 100_000))
    assert (got["failed"], got["wrong"]) == (0, 0)
    assert got["hits"] == 40 and got["misses"] == 0 and got["filled"] == 40
    assert got["quick_hits"] == 40


def test_a_dump_puts_its_shards_in_the_tier_before_it_completes(tier):
    # The save threads copy what they write into the tier themselves: once the dump is waited for,
    # the copies are there, with no wait for a background thread, and another process loads them
    # from memory.
    config = tier()
    entries = make_entries(block_ids(120, "at-once"), low=100_000, high=100_000)
    with open_store("posix", config) as store:
        dump_entries(store, entries)
        stats = store.shared_memory_stats()
        assert (stats["written"], stats["filled"]) == (120, 120)
    got = json.loads(run_child(LOADER, config, "at-once", 0, 0))  # opens the tier only
    assert got["filled"] == 120
    with open_store("posix", config) as store:
        assert load_entries(store, entries) == ([], [])
        assert store.shared_memory_stats()["hits"] == 120


@pytest.mark.parametrize("size", [100_001, 2 * 4096 - 128], ids=["padded", "aligned"])
def test_blocks_saved_with_direct_io_are_shared_too(tier, tmp_path, size):
    # O_DIRECT files are zero padded after their trailer to a multiple of 4096 bytes (or not at
    # all when the payload and trailer fill whole pages); the tier must find the trailer in both.
    if not supports_o_direct(tmp_path):
        pytest.skip(f"{tmp_path} refuses O_DIRECT")
    config = tier(direct_io=True)
    assert run_child(DUMPER, config, "direct", 12, size).strip() == "12"
    got = json.loads(run_child(LOADER, config, "direct", 12, size))
    assert (got["failed"], got["wrong"]) == (0, 0)
    assert got["hits"] == 12 and got["misses"] == 0


def test_without_the_tier_nothing_is_kept_in_shared_memory(tier):
    config = tier(shared_memory_bytes=0)
    run_child(DUMPER, config, "off", 5, 10_000)
    got = json.loads(run_child(LOADER, config, "off", 5, 10_000))
    assert (got["failed"], got["wrong"], got["hits"], got["arenas"]) == (0, 0, 0, 0)
    assert list(tier.directory.iterdir()) == []


def test_prewarm_copies_files_written_without_the_tier_into_it(tier):
    # As after a reboot: the files are there, the memory filesystem is empty.
    ids = block_ids(12, "prewarm")
    entries = make_entries(ids, low=40_000, high=40_000)
    with open_store("posix", tier(shared_memory_bytes=0)) as store:
        dump_entries(store, entries)
    with open_store("posix", tier()) as store:
        store.prewarm(1 << 30)
        deadline = time.monotonic() + 20
        while store.prewarm_stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert store.shared_memory_stats()["filled"] == 12
    with open_store("posix", tier()) as store:
        assert load_entries(store, entries) == ([], [])
        assert store.shared_memory_stats()["hits"] == 12


#: Child script: dump and load back ``count`` blocks through a tier whose memory filesystem is small.
DUMP_AND_LOAD = """
import json, storetest
from ucm.store import open_store

config, tag, count, size = storetest.child_args()
with open_store("posix", config) as store:
    entries = [(i, 0, storetest.payload(i, 0, size)) for i in storetest.block_ids(count, tag)]
    storetest.dump_entries(store, entries)
    store.wait_shared_memory()
    failed, wrong = storetest.load_entries(store, entries)
    print(json.dumps({"failed": len(failed), "wrong": len(wrong), **store.shared_memory_stats()}))
"""


def test_a_full_memory_filesystem_leaves_shards_out_of_the_tier_and_the_process_alive(tier):
    # 40 shards of 100 kB through a tier on a 1-MiB memory filesystem: the copies that do not fit
    # are counted as unwritten (a copy written through the mapping into a hole of a full memory
    # filesystem would kill the process with SIGBUS), and every load is right.
    proc = run_child_on_mount(DUMP_AND_LOAD, [tier(), "full", 40, 100_000], tier.directory, "-t tmpfs -o size=1m none")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert (got["failed"], got["wrong"]) == (0, 0)
    # (A load that missed the tier tries the copy again, and counts again.)
    assert 0 < got["written"] < 40 and got["unwritten"] >= 40 - got["written"], got
    assert got["hits"] == got["written"]


def test_a_damaged_copy_is_never_served_and_the_store_file_is(tier):
    config = tier()
    ids = block_ids(6, "damaged")
    entries = make_entries(ids, low=50_000, high=50_000)
    with open_store("posix", config) as store:
        dump_entries(store, entries)
    arena = Arena(tier.directory)
    victim = arena.filled()[2]
    arena.poke(arena.data_offset + victim * arena.stride + 12_345, b"\xff\x00\xff")

    with open_store("posix", config) as store:
        failed, wrong = load_entries(store, entries)
        assert (failed, wrong) == ([], [])
        stats = store.shared_memory_stats()
        assert (stats["hits"], stats["failed"]) == (5, 1)
        # The damaged slot was emptied, and the copy is made again from the verified file.
        deadline = time.monotonic() + 10
        while store.shared_memory_stats()["filled"] < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        failed, wrong = load_entries(store, entries)
        assert (failed, wrong) == ([], [])
        assert store.shared_memory_stats()["hits"] == 11


def test_a_block_written_again_without_the_tier_is_not_shadowed_by_its_old_copy(tier):
    block = block_ids(1, "replaced")[0]
    old, new = payload(block, 0, 30_000), payload(block, 1, 30_000)
    with open_store("posix", tier()) as store:
        dump_entries(store, [(block, 0, old)])
    # Another process (without the tier) removes the block and writes other bytes under its id.
    with open_store("posix", tier(shared_memory_bytes=0)) as other:
        other.remove([block])
        dump_entries(other, [(block, 0, new)])
    with open_store("posix", tier()) as store:
        failed, wrong = load_entries(store, [(block, 0, new)])
        assert (failed, wrong) == ([], [])
        assert store.shared_memory_stats()["stale"] == 1


def test_a_file_truncated_in_place_fails_its_load_despite_the_copy(tier):
    ids = block_ids(2, "truncated")
    entries = make_entries(ids, low=30_000, high=30_000)
    with open_store("posix", tier()) as store:
        dump_entries(store, entries)
        store.wait_shared_memory()
        (victim,) = block_files(Path(store.config["root"]), ids[0])
        os.truncate(victim, victim.stat().st_size // 2)  # the same inode, now damaged
        failed, wrong = load_entries(store, entries)
        assert (failed, wrong) == ([ids[0]], [])
        stats = store.shared_memory_stats()
        assert (stats["hits"], stats["stale"]) == (1, 1)


def test_removed_blocks_are_not_served_from_shared_memory(tier):
    ids = block_ids(3, "removed")
    entries = make_entries(ids, low=20_000, high=20_000)
    with open_store("posix", tier()) as store:
        dump_entries(store, entries)
        store.wait_shared_memory()
        store.remove(ids[:1])
        assert store.shared_memory_stats()["filled"] == 2
        failed, wrong = load_entries(store, entries)
        assert (failed, wrong) == ([ids[0]], [])


def test_slots_of_a_dead_writer_are_taken_over_and_live_ones_are_not(tier):
    # Two slots in one set: every shard competes for them.
    config = tier(shared_memory_bytes=2 * 8192)
    ids = block_ids(4, "owned")
    entries = make_entries(ids, low=8000, high=8000)
    with open_store("posix", config) as store:
        dump_entries(store, entries[:2])
    arena = Arena(tier.directory)
    assert (arena.slots, arena.ways) == (2, 2)
    now = int(time.time())
    arena.own(0, now)  # a writer at work, or one that died a moment ago
    arena.own(1, now)
    with open_store("posix", config) as store:
        dump_entries(store, entries[2:3])
        store.wait_shared_memory()
        assert store.shared_memory_stats()["unwritten"] == 1  # no slot to take: it did not wait
        arena.own(0, now - 3600)  # that writer died an hour ago
        dump_entries(store, entries[3:4])
        store.wait_shared_memory()
        assert store.shared_memory_stats()["written"] == 1
        assert load_entries(store, entries[3:4]) == ([], [])
        stats = store.shared_memory_stats()
        assert (stats["hits"], stats["writing"]) == (1, 1)  # the live writer's slot stays its own
        # The others come from their files.
        assert load_entries(store, entries[:3]) == ([], [])


#: Child script: remove one block and write it again with alternating bytes, until killed.
REWRITER = """
import time
import storetest
from ucm.store import open_store

config, block, size = storetest.child_args()
block = bytes.fromhex(block)
versions = [storetest.payload(block, shard, size) for shard in (0, 1)]
with open_store("posix", config) as store:
    print("ready", flush=True)
    i = 0
    while True:
        store.remove([block])
        store.wait(store.dump([block], [versions[i % 2]]))
        store.wait_shared_memory()
        time.sleep(0.005)  # leave the copy in place a moment, as a real workload would
        i += 1
"""


@pytest.mark.slow
def test_a_reader_racing_a_rewriting_process_gets_one_version_whole_or_a_failure(tier):
    size = 4 << 20
    config = tier()
    block = block_ids(1, "race")[0]
    versions = {payload(block, shard, size) for shard in (0, 1)}
    child = start_child(REWRITER, config, block.hex(), size)
    assert child.stdout.readline() == "ready\n", child.stderr.read()
    outcomes = {"whole": 0, "failed": 0}
    try:
        with open_store("posix", config) as store:
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                into = bytearray(size)
                try:
                    store.wait(store.load([block], [into]))
                except StoreError:
                    outcomes["failed"] += 1
                    continue
                assert bytes(into) in versions, "a load returned bytes of neither version"
                outcomes["whole"] += 1
            stats = store.shared_memory_stats()
    finally:
        kill(child)
    assert outcomes["whole"] > 0 and stats["hits"] > 0, (outcomes, stats)


@pytest.mark.slow
def test_a_writer_killed_while_filling_the_tier_leaves_only_whole_copies(tier):
    config = tier(shared_memory_bytes=256 << 20)
    rng = random.Random()
    tag = "killed"
    child = start_child(
        "import storetest\nfrom ucm.store import open_store\n"
        "config, tag = storetest.child_args()\n"
        "with open_store('posix', config) as store:\n"
        "    print('ready', flush=True)\n"
        "    for block in storetest.block_ids(400, tag):\n"
        "        store.wait(store.dump([block], [storetest.big_entry(block)[2]]))\n"
        "        store.wait_shared_memory()\n",
        config,
        tag,
    )
    assert child.stdout.readline() == "ready\n", child.stderr.read()
    time.sleep(rng.uniform(0.5, 1.5))
    kill(child)
    ids = block_ids(400, tag)
    with open_store("posix", config) as store:
        present = [block for block, hit in zip(ids, store.lookup(ids), strict=True) if hit]
        assert present, "the writer saved nothing before it was killed"
        failed, wrong = load_entries(store, [big_entry(block) for block in present])
        assert (failed, wrong) == ([], [])
        stats = store.shared_memory_stats()
        assert stats["hits"] + stats["misses"] == len(present) and stats["hits"] > 0


def test_a_shared_memory_dir_that_is_not_a_directory_is_named(tmp_path):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(ValueError, match="shared_memory_dir .*no-such-dir.* is not a directory"):
        open_store(
            "posix",
            {"root": str(tmp_path / "root"), "shared_memory_bytes": 1 << 20, "shared_memory_dir": str(missing)},
        )
