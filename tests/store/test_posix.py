"""The posix store: damaged files, O_DIRECT, capacity eviction and writers killed mid-dump."""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import shutil
import signal
import time
import uuid
from pathlib import Path

import pytest
from storetest import (
    AVAILABLE_KINDS,
    AVAILABLE_LOAD_KINDS,
    BIG_WRITER,
    big_entry,
    block_files,
    block_ids,
    disk_bytes,
    dump_entries,
    load_entries,
    make_entries,
    run_child,
    run_child_on_mount,
    start_child,
    supports_o_direct,
    temp_files,
)

from ucm.store import open_store

TRAILER_BYTES = 128


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "root"


def test_new_store_on_the_same_root_sees_every_committed_block(open_test_store, root):
    writer = open_test_store("posix", num_shards=2)
    entries = make_entries(block_ids(50, "reopen"), num_shards=2)
    dump_entries(writer, entries, AVAILABLE_KINDS, parts=(1, 2))

    reader = open_test_store("posix", num_shards=2)

    assert reader.lookup([e[0] for e in entries]) == [True] * len(entries)
    assert load_entries(reader, entries, AVAILABLE_LOAD_KINDS) == ([], [])


# -- damaged block files -------------------------------------------------------------------------


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0x5A]))


DAMAGE = {
    "flip first byte": lambda path, size: flip_byte(path, 0),
    "flip middle byte": lambda path, size: flip_byte(path, size // 2),
    "flip last payload byte": lambda path, size: flip_byte(path, size - 1),
    "cut the last trailer byte": lambda path, size: os.truncate(path, size + TRAILER_BYTES - 1),
    "truncate to half": lambda path, size: os.truncate(path, size // 2),
    "truncate to zero": lambda path, size: os.truncate(path, 0),
    "cut the trailer": lambda path, size: os.truncate(path, size),
}


@pytest.mark.parametrize("direct_io", [False, True], ids=["buffered", "O_DIRECT"])
@pytest.mark.parametrize("num_shards", [1, 2, 4])
@pytest.mark.parametrize("damage", list(DAMAGE.values()), ids=list(DAMAGE))
def test_damaged_block_file_fails_only_that_block(open_test_store, root, num_shards, damage, direct_io):
    if direct_io and not supports_o_direct(root.parent):
        pytest.skip("the filesystem refuses O_DIRECT")
    store = open_test_store("posix", num_shards, direct_io=direct_io)
    ids = block_ids(4, "damage")
    entries = make_entries(ids, num_shards, low=4096, high=8192)
    dump_entries(store, entries)
    victim = ids[2]
    files = block_files(root, victim)
    assert len(files) == num_shards, files
    last_shard_size = len(entries[3 * num_shards - 1][2])

    damage(files[-1], last_shard_size)

    assert load_entries(store, entries) == ([victim], [])
    # Loading the undamaged blocks alone still works, and so does repairing the damaged one.
    intact = [e for e in entries if e[0] != victim]
    assert load_entries(store, intact) == ([], [])
    store.remove([victim])
    dump_entries(store, entries)
    assert load_entries(store, entries) == ([], [])


def test_block_file_copied_over_another_block_is_rejected(open_test_store, root):
    store = open_test_store("posix")
    (a, _, _), (b, _, _) = entries = make_entries(block_ids(2, "swap"), low=4096, high=4096)
    dump_entries(store, entries)
    [a_file], [b_file] = block_files(root, a), block_files(root, b)

    shutil.copyfile(a_file, b_file)

    assert load_entries(store, entries) == ([b], [])


def test_shard_file_copied_over_another_shard_is_rejected(open_test_store, root):
    store = open_test_store("posix", num_shards=2)
    entries = make_entries(block_ids(1, "shard-swap"), num_shards=2, low=4096, high=4096)
    block_id = entries[0][0]
    dump_entries(store, entries)
    shard0, shard1 = block_files(root, block_id)

    shutil.copyfile(shard0, shard1)

    assert load_entries(store, entries) == ([block_id], [])


def test_any_damaged_trailer_byte_fails_the_load_or_leaves_the_bytes_intact(open_test_store, root):
    store = open_test_store("posix")
    entries = make_entries(block_ids(1, "trailer"), low=5000, high=5000)
    block_id, _, data = entries[0]
    dump_entries(store, entries)
    [path] = block_files(root, block_id)
    original = path.read_bytes()
    assert len(original) == len(data) + TRAILER_BYTES

    for offset in range(len(data), len(original)):
        flip_byte(path, offset)
        failed, wrong = load_entries(store, entries)
        assert wrong == [], f"wrong bytes returned with trailer byte {offset - len(data)} flipped"
        assert failed in ([], [block_id])
        path.write_bytes(original)

    assert load_entries(store, entries) == ([], [])


# -- O_DIRECT ------------------------------------------------------------------------------------


def test_direct_io_round_trips_any_size(open_test_store, root, tmp_path):
    if not supports_o_direct(tmp_path):
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")
    store = open_test_store("posix", num_shards=2, direct_io=True)
    entries = make_entries(block_ids(40, "odirect"), num_shards=2, low=1, high=300_000)
    entries += make_entries(block_ids(4, "odirect-aligned"), num_shards=2, low=4096, high=4096)
    entries += make_entries(block_ids(2, "odirect-big"), num_shards=2, low=4 << 20, high=4 << 20)

    dump_entries(store, entries, AVAILABLE_KINDS, parts=(1, 3))

    assert load_entries(store, entries, AVAILABLE_LOAD_KINDS, parts=(2, 1)) == ([], [])
    buffered = open_test_store("posix", num_shards=2)
    assert load_entries(buffered, entries) == ([], [])
    # And blocks written without O_DIRECT load through O_DIRECT.
    others = make_entries(block_ids(10, "buffered"), num_shards=2, low=1, high=100_000)
    dump_entries(buffered, others)
    assert load_entries(store, others) == ([], [])


@pytest.mark.parametrize("reader_direct", [False, True], ids=["read buffered", "read O_DIRECT"])
@pytest.mark.parametrize("writer_direct", [False, True], ids=["written buffered", "written O_DIRECT"])
def test_a_load_of_another_size_names_both_sizes_and_keeps_the_file(
    open_test_store, root, tmp_path, writer_direct, reader_direct
):
    # A caller asking for the wrong size is not damage: the error says so and the file stays,
    # also when O_DIRECT padded the file after its trailer. 5000 and 12000 bytes leave padding;
    # 8064 bytes plus the trailer fill two pages exactly.
    if (writer_direct or reader_direct) and not supports_o_direct(tmp_path):
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")
    from ucm.store import StoreError

    writer = open_test_store("posix", direct_io=writer_direct)
    reader = open_test_store("posix", direct_io=reader_direct)
    entries = [make_entries(block_ids(1, f"other-size-{size}"), low=size, high=size)[0] for size in (5000, 8064, 12000)]
    dump_entries(writer, entries)
    files = {block_id: block_files(root, block_id) for block_id, _, _ in entries}

    for block_id, _, data in entries:
        for asked in (len(data) - 1000, len(data) + 1000, len(data) + 4096):
            task = reader.load([block_id], [bytearray(asked)])
            with pytest.raises(StoreError) as excinfo:
                reader.wait(task)
            reason = excinfo.value.reasons[block_id]
            assert f"stored shard holds {len(data)} bytes but the buffers hold {asked}" in reason, reason
            assert block_files(root, block_id) == files[block_id], "a size mismatch removed the file"

    assert load_entries(reader, entries) == ([], [])


def test_direct_io_on_dev_shm_round_trips_or_raises_value_error_naming_o_direct():
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    shm_root = shm / f"ucm-test-{uuid.uuid4().hex}"
    try:
        if supports_o_direct(shm):  # tmpfs takes O_DIRECT since Linux 6.6
            with open_store("posix", {"root": str(shm_root), "direct_io": True}) as store:
                entries = make_entries(block_ids(8, "shm"), low=1, high=20_000)
                dump_entries(store, entries)
                assert load_entries(store, entries) == ([], [])
        else:
            with pytest.raises(ValueError, match="O_DIRECT") as excinfo:
                open_store("posix", {"root": str(shm_root), "direct_io": True})
            assert str(shm_root) in str(excinfo.value)
    finally:
        shutil.rmtree(shm_root, ignore_errors=True)


OPEN_WITH_DIRECT_IO = """
import storetest
from ucm.store import open_store

[root] = storetest.child_args()
try:
    open_store("posix", {"root": root, "direct_io": True})
except ValueError as error:
    print(error)
else:
    raise SystemExit("direct_io was accepted on a filesystem that refuses O_DIRECT")
"""


def test_direct_io_on_a_filesystem_refusing_o_direct_raises_value_error_naming_o_direct(tmp_path):
    mount_point = tmp_path / "ramfs"
    mount_point.mkdir()
    root = mount_point / "store"
    # ramfs refuses O_DIRECT.
    proc = run_child_on_mount(OPEN_WITH_DIRECT_IO, [str(root)], mount_point, "-t ramfs none", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "O_DIRECT" in proc.stdout and str(root) in proc.stdout, proc.stdout


# -- capacity and eviction -------------------------------------------------------------------------

BLOCK = 64 << 10
BLOCK_FILE = BLOCK + TRAILER_BYTES
# Room for 20 and a half block files, so no pass lands exactly on the limit.
CAPACITY = 20 * BLOCK_FILE + BLOCK_FILE // 2
# Time for background eviction passes started by earlier dumps to finish: a pass that read a block's
# mtime before a load bumped it may still evict that block (see the report on eviction races).
EVICTION_SETTLE = 0.5
# File mtimes advance in ticks of a few milliseconds, coarser than the time between two small dumps.
MTIME_TICK = 0.02


def age_blocks(root: Path, ids: list[bytes]) -> None:
    """Give the blocks' files distinct old mtimes, ``ids[0]`` the oldest."""
    base = time.time() - 10_000
    for index, block_id in enumerate(ids):
        for path in block_files(root, block_id):
            os.utime(path, (base + index, base + index))


def assert_evicted_oldest_first(store, oldest_first: list[bytes]) -> int:
    """The present blocks of ``oldest_first`` are a suffix of it; return how many were evicted."""
    present = store.lookup(oldest_first)
    evicted = present.index(True) if True in present else len(present)
    assert present == [False] * evicted + [True] * (len(present) - evicted), present
    return evicted


def test_evict_now_removes_least_recently_loaded_blocks_first(open_test_store, root):
    store = open_test_store("posix", capacity_bytes=CAPACITY)
    old = make_entries(block_ids(16, "old"), low=BLOCK, high=BLOCK)
    dump_entries(store, old)
    old_ids = [e[0] for e in old]
    age_blocks(root, old_ids)
    time.sleep(EVICTION_SETTLE)
    assert load_entries(store, old[:4]) == ([], [])  # makes the first four the most recent
    new = make_entries(block_ids(12, "new"), low=BLOCK, high=BLOCK)

    dump_entries(store, new)
    store.evict_now()

    assert disk_bytes(root) <= CAPACITY
    evicted = assert_evicted_oldest_first(store, old_ids[4:])
    assert evicted >= 8  # 28 blocks were written; at most 20 fit
    assert load_entries(store, old[:4] + new + old[4 + evicted :]) == ([], [])
    assert sorted(load_entries(store, old[4 : 4 + evicted])[0]) == sorted(old_ids[4 : 4 + evicted])


def test_evict_now_under_capacity_keeps_every_block(open_test_store, root):
    store = open_test_store("posix", capacity_bytes=CAPACITY)
    entries = make_entries(block_ids(10, "under"), low=BLOCK, high=BLOCK)
    dump_entries(store, entries)

    assert store.evict_now() == 0

    assert load_entries(store, entries) == ([], [])


EVICTOR = """
import storetest
from ucm.store import open_store

root, capacity = storetest.child_args()
with open_store("posix", {"root": root, "capacity_bytes": capacity}) as store:
    print(store.evict_now())
"""


def test_eviction_from_a_second_process_sharing_the_root(open_test_store, root):
    store = open_test_store("posix")  # no capacity: this process never evicts
    entries = make_entries(block_ids(30, "shared-evict"), low=BLOCK, high=BLOCK)
    dump_entries(store, entries)
    ids = [e[0] for e in entries]
    age_blocks(root, ids)
    before = disk_bytes(root)

    freed = int(run_child(EVICTOR, str(root), CAPACITY))

    after = disk_bytes(root)
    assert after <= CAPACITY
    # The child's store may start its background pass as it opens, before evict_now: the two
    # passes together freed what the disk lost, evict_now only its own share of it.
    assert before - after > 0 and 0 <= freed <= before - after
    evicted = assert_evicted_oldest_first(store, ids)
    assert evicted >= 10
    failed, wrong = load_entries(store, entries)
    assert sorted(failed) == sorted(ids[:evicted]) and wrong == []


def test_background_eviction_keeps_disk_usage_within_capacity(open_test_store, root):
    store = open_test_store("posix", capacity_bytes=CAPACITY)
    entries = make_entries(block_ids(80, "background"), low=BLOCK, high=BLOCK)
    for start in range(0, len(entries), 4):
        dump_entries(store, entries[start : start + 4])
        time.sleep(MTIME_TICK)  # so each batch is newer than the last by the filesystem's clock

    deadline = time.monotonic() + 20
    while disk_bytes(root) > CAPACITY:
        assert time.monotonic() < deadline, f"{disk_bytes(root)} bytes on disk, capacity {CAPACITY}"
        time.sleep(0.05)

    present = [e for e, hit in zip(entries, store.lookup([e[0] for e in entries]), strict=True) if hit]
    assert entries[-4:] == present[-4:]  # the newest blocks survive
    assert load_entries(store, present) == ([], [])


# -- writers killed with SIGKILL ---------------------------------------------------------------------

KILL_REPETITIONS = 4
WRITER_BLOCKS = 2000  # far more than a writer gets through before it is killed


@pytest.fixture
def big_roots(tmp_path):
    """A directory for roots full of large blocks, deleted after the test (pytest keeps recent tmp dirs)."""
    path = tmp_path / "big"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_big_writer(root: Path, tag: str, **options):
    child = start_child(BIG_WRITER, str(root), tag, WRITER_BLOCKS, options)
    line = child.stdout.readline()
    if line != "ready\n":
        child.kill()
        pytest.fail(f"writer did not start: {line!r} {child.communicate()[1]}")
    return child


def kill(child) -> None:
    child.send_signal(signal.SIGKILL)
    child.communicate()
    assert child.returncode == -signal.SIGKILL, "the writer finished before it was killed"


def assert_only_whole_blocks_visible(store, ids: list[bytes]) -> int:
    """Every block the store reports loads intact; absent ones near the writer's progress fail to load."""
    present = store.lookup(ids)
    last = max((i for i, hit in enumerate(present) if hit), default=-1)
    for block_id, hit in zip(ids[: last + 16], present, strict=False):
        entry = big_entry(block_id)
        failed, wrong = load_entries(store, [entry])
        assert wrong == [], f"block {block_id.hex()} loaded wrong bytes"
        assert failed == ([] if hit else [block_id]), f"block {block_id.hex()}: lookup said {hit}"
    return sum(present)


@pytest.mark.slow
def test_writer_killed_mid_dump_leaves_no_partial_block(big_roots):
    rng = random.Random()
    committed = 0
    for repetition in range(KILL_REPETITIONS):
        root = big_roots / f"root{repetition}"
        tag = f"kill{repetition}"
        child = start_big_writer(root, tag)
        time.sleep(rng.uniform(0.2, 1.0))
        kill(child)

        with open_store("posix", {"root": str(root)}) as store:
            committed += assert_only_whole_blocks_visible(store, block_ids(WRITER_BLOCKS, tag))
        shutil.rmtree(root)
    assert committed > 0, "no writer committed any block before it was killed"


def wait_for_temp_files(root: Path, child, timeout: float = 20) -> None:
    """Wait until the running ``child`` has temp files under ``root``; skip (killing it) if it never has."""
    deadline = time.monotonic() + timeout
    while not temp_files(root):
        if time.monotonic() > deadline or child.poll() is not None:
            child.kill()
            child.communicate()
            pytest.skip("the writer never showed .tmp files; nothing to clean up")
        time.sleep(0.002)


@pytest.mark.slow
@pytest.mark.parametrize("cleanup", ["evict_now", "open with capacity"])
def test_temp_files_of_a_killed_writer_are_removed(big_roots, cleanup):
    for attempt in range(5):
        root = big_roots / f"root{attempt}"
        child = start_big_writer(root, f"tmp{attempt}", fsync=True)
        wait_for_temp_files(root, child)
        kill(child)
        if temp_files(root):
            break
        shutil.rmtree(root)
    else:
        pytest.skip("every killed writer had renamed its temp files already")
    ids = block_ids(WRITER_BLOCKS, f"tmp{attempt}")

    if cleanup == "evict_now":
        store = open_store("posix", {"root": str(root)})  # no capacity: no background pass
        committed = [block_id for block_id, hit in zip(ids, store.lookup(ids), strict=True) if hit]
        store.evict_now()
    else:
        with open_store("posix", {"root": str(root)}) as reader:
            committed = [block_id for block_id, hit in zip(ids, reader.lookup(ids), strict=True) if hit]
        store = open_store("posix", {"root": str(root), "capacity_bytes": 1 << 40})
        deadline = time.monotonic() + 10
        while temp_files(root) and time.monotonic() < deadline:
            time.sleep(0.01)

    with store:
        assert temp_files(root) == []
        assert store.lookup(committed) == [True] * len(committed)
        assert_only_whole_blocks_visible(store, ids)


LIVE_WRITER_BLOCKS = 24


@pytest.mark.slow
def test_evict_now_spares_temp_files_of_a_live_writer(big_roots):
    root = big_roots / "root"
    child = start_child(BIG_WRITER, str(root), "live", LIVE_WRITER_BLOCKS, {"fsync": True})
    assert child.stdout.readline() == "ready\n", child.communicate()[1]
    wait_for_temp_files(root, child)
    child.send_signal(signal.SIGSTOP)
    try:
        time.sleep(0.2)  # let every thread of the writer stop
        in_flight = temp_files(root)
        with open_store("posix", {"root": str(root), "capacity_bytes": 1 << 40}) as store:
            store.evict_now()
        still_there = temp_files(root)
    finally:
        child.send_signal(signal.SIGCONT)
    out, err = child.communicate(timeout=120)

    assert child.returncode == 0, f"the writer failed after an eviction pass:\n{err}"
    assert out == "done\n"
    assert still_there == in_flight
    with open_store("posix", {"root": str(root)}) as store:
        ids = block_ids(LIVE_WRITER_BLOCKS, "live")
        assert store.lookup(ids) == [True] * len(ids)
        assert load_entries(store, [big_entry(block_id) for block_id in ids[:8]]) == ([], [])


# -- prewarm -------------------------------------------------------------------------------------

_LIBC = ctypes.CDLL(None, use_errno=True)
_PAGE = mmap.PAGESIZE


def cached_pages(path: Path) -> int:
    """Pages of the file that the OS page cache holds now (mincore)."""
    size = path.stat().st_size
    with open(path, "rb") as file, mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY) as view:
        pages = (size + _PAGE - 1) // _PAGE
        vector = (ctypes.c_ubyte * pages)()
        address = ctypes.addressof(ctypes.c_char.from_buffer(view))
        if _LIBC.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vector) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return sum(byte & 1 for byte in vector)


def drop_from_page_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if any(cached_pages(path) for path in paths):
        pytest.skip("this filesystem keeps its files in memory (tmpfs?): nothing for prewarm to read back")


def wait_prewarm(store, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while (stats := store.prewarm_stats())["running"]:
        assert time.monotonic() < deadline, stats
        time.sleep(0.01)
    return stats


def test_prewarm_reads_the_most_recently_used_blocks_back_within_its_budget(open_test_store, root):
    # A restarted engine's first loads come from memory for the blocks used last before it stopped.
    store = open_test_store("posix")
    entries = make_entries(block_ids(8, "prewarm"), low=BLOCK, high=BLOCK)
    dump_entries(store, entries)
    ids = [e[0] for e in entries]
    age_blocks(root, ids)  # ids[0] the least recently used
    files = [block_files(root, block_id)[0] for block_id in ids]
    drop_from_page_cache(files)

    store.prewarm(3 * BLOCK_FILE)
    stats = wait_prewarm(store)

    assert (stats["files"], stats["bytes"]) == (3, 3 * BLOCK_FILE)
    pages = (BLOCK_FILE + _PAGE - 1) // _PAGE
    assert [cached_pages(path) for path in files] == [0] * 5 + [pages] * 3
    assert load_entries(store, entries) == ([], [])  # reading them back changed nothing


def test_prewarm_of_one_shard_reads_only_that_shards_files(open_test_store, root):
    # Each tensor-parallel rank reads back its own head range, not its neighbours'.
    store = open_test_store("posix", num_shards=2)
    entries = make_entries(block_ids(4, "prewarm-shard"), num_shards=2, low=BLOCK, high=BLOCK)
    dump_entries(store, entries)
    files = [path for block_id in {e[0] for e in entries} for path in block_files(root, block_id)]
    assert len(files) == 8
    drop_from_page_cache(files)

    store.prewarm(1 << 40, shard=1)
    stats = wait_prewarm(store)

    assert stats["files"] == 4
    assert {path.suffix: bool(cached_pages(path)) for path in files} == {".0": False, ".1": True}


def test_prewarm_of_a_new_store_creates_its_directories_ahead_of_the_first_saves(open_test_store, root):
    # On a disk filesystem a mkdir can cost as much as writing a chunk: an engine starting on a new
    # store makes the fan-out directories at start-up, not one per first save into each.
    store = open_test_store("posix")
    blocks = root / "blocks"
    assert not any(blocks.iterdir())
    store.prewarm(1 << 20)
    stats = wait_prewarm(store)
    assert stats["files"] == 0
    dirs = sorted(p.name for p in blocks.iterdir())
    assert dirs == [f"{d:03x}" for d in range(4096)] and all((blocks / d).is_dir() for d in dirs)
    entries = make_entries(block_ids(20, "after-prewarm"), low=BLOCK, high=BLOCK)
    dump_entries(store, entries)
    assert load_entries(open_test_store("posix"), entries) == ([], [])
    assert len(list(blocks.iterdir())) == 4096  # the saves found their directories there


def test_prewarm_leaves_out_files_written_after_it_began(open_test_store, root):
    # A new store's pass makes 4096 directories first, which can take seconds on a disk while the
    # engine already saves: what was saved after the pass began is in memory already, and reading
    # it back (and saying so in the log) would be wasted work.
    store = open_test_store("posix")
    entries = make_entries(block_ids(4, "prewarm-later"), low=BLOCK, high=BLOCK)
    dump_entries(store, entries)
    ids = [e[0] for e in entries]
    age_blocks(root, ids[:2])
    later = time.time() + 600  # as a save made while the pass runs looks to it
    for block_id in ids[2:]:
        for path in block_files(root, block_id):
            os.utime(path, (later, later))

    store.prewarm(1 << 40)
    stats = wait_prewarm(store)

    assert (stats["files"], stats["bytes"]) == (2, 2 * BLOCK_FILE)
    assert load_entries(store, entries) == ([], [])  # all four still load


def test_closing_a_store_stops_its_prewarm_pass(open_test_store):
    # An engine shut down while prewarm is still reading a large store does not wait for the pass
    # to read the rest: the store's close stops it at the next file or directory.
    store = open_test_store("posix")
    entries = make_entries(block_ids(600, "prewarm-close"), low=BLOCK, high=BLOCK)
    dump_entries(store, entries)

    store.prewarm(1 << 40)
    store.close()

    stats = store.prewarm_stats()
    assert not stats["running"]
    assert stats["files"] < len(entries), stats
    assert load_entries(open_test_store("posix"), entries) == ([], [])  # the store itself is whole


def test_prewarm_budget_must_be_a_non_negative_int(open_test_store):
    store = open_test_store("posix")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="budget_bytes"):
            store.prewarm(bad)
    store.prewarm(0)  # off: nothing runs
    assert store.prewarm_stats() == {"running": False, "files": 0, "bytes": 0, "seconds": 0.0}
