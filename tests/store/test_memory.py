"""The memory store: LRU within its capacity, and write-behind to a backend store."""

from __future__ import annotations

import pytest
from storetest import block_ids, dump_entries, load_entries, make_entries, run_child

from ucm.store import open_store

BLOCK = 4096


@pytest.fixture
def root(tmp_path):
    return tmp_path / "root"


def lru_store(open_test_store, blocks: int, **options):
    """A memory store with room for ``blocks`` blocks of ``BLOCK`` bytes (and some slack for bookkeeping)."""
    return open_test_store("memory", capacity_bytes=blocks * BLOCK + BLOCK // 2, **options)


def test_full_store_evicts_the_least_recently_used_block(open_test_store):
    store = lru_store(open_test_store, 10)
    entries = make_entries(block_ids(11, "lru"), low=BLOCK, high=BLOCK)
    ids = [e[0] for e in entries]
    for entry in entries[:10]:
        dump_entries(store, [entry])
    assert load_entries(store, entries[:1]) == ([], [])  # block 0 is now the most recently used

    dump_entries(store, entries[10:])

    present = store.lookup(ids)
    assert present[0] and present[10], "the recently loaded and the newest block must stay"
    assert not present[1], "block 1 was the least recently used"
    assert sum(present) <= 10
    kept = [e for e, hit in zip(entries, present, strict=True) if hit]
    assert load_entries(store, kept) == ([], [])
    assert load_entries(store, entries[1:2]) == ([ids[1]], [])


def test_recently_loaded_blocks_outlive_newer_unused_ones(open_test_store):
    store = lru_store(open_test_store, 16)
    old = make_entries(block_ids(16, "lru-old"), low=BLOCK, high=BLOCK)
    new = make_entries(block_ids(8, "lru-new"), low=BLOCK, high=BLOCK)
    for entry in old:
        dump_entries(store, [entry])
    assert load_entries(store, old[:8]) == ([], [])

    dump_entries(store, new)

    assert store.lookup([e[0] for e in old[:8] + new]) == [True] * 16
    assert store.lookup([e[0] for e in old[8:]]) == [False] * 8
    assert load_entries(store, old[:8] + new) == ([], [])


def test_a_batch_larger_than_the_capacity_keeps_what_fits(open_test_store):
    store = lru_store(open_test_store, 16)
    entries = make_entries(block_ids(64, "oversized"), low=BLOCK, high=BLOCK)

    dump_entries(store, entries)

    present = store.lookup([e[0] for e in entries])
    assert 0 < sum(present) <= 16
    kept = [e for e, hit in zip(entries, present, strict=True) if hit]
    assert load_entries(store, kept) == ([], [])


def test_lookup_prefix_counts_hits_in_memory_and_in_the_backend(open_test_store):
    store = open_test_store("memory+posix", capacity_bytes=16 * BLOCK)
    entries = make_entries(block_ids(48, "tiers"), low=BLOCK, high=BLOCK)
    for entry in entries:
        dump_entries(store, [entry])
    store.flush()
    ids = [e[0] for e in entries]  # the first 32 are only in the backend now, the last 16 also in memory
    mixed = [ids[i // 2] if i % 2 == 0 else ids[47 - i // 2] for i in range(48)]

    assert store.lookup_prefix(ids) == 48
    assert store.lookup_prefix(mixed) == 48
    assert store.lookup_prefix(ids[40:] + ids[:8] + block_ids(1, "tiers-absent") + ids[8:]) == 16


def test_flush_puts_every_block_in_the_backend(open_test_store, root):
    store = open_test_store("memory+posix", num_shards=2)
    entries = make_entries(block_ids(300, "flush"), num_shards=2)
    dump_entries(store, entries)

    store.flush()

    with open_store("posix", {"root": str(root), "num_shards": 2}) as disk:
        assert disk.lookup([e[0] for e in entries]) == [True] * len(entries)
        assert load_entries(disk, entries) == ([], [])


def test_close_puts_every_block_in_the_backend_beyond_the_write_behind_bound(root):
    # Ten times the capacity, forty times the write-behind bound.
    name = "memory"
    config = {"capacity_bytes": 64 * BLOCK, "backend": {"name": "posix", "config": {"root": str(root)}}}
    entries = make_entries(block_ids(640, "close"), low=BLOCK, high=BLOCK)
    store = open_store(name, config)
    try:
        for start in range(0, len(entries), 64):
            dump_entries(store, entries[start : start + 64])
    finally:
        store.close()

    with open_store("posix", {"root": str(root)}) as disk:
        assert load_entries(disk, entries) == ([], [])


@pytest.mark.parametrize("batch", [1, 10, 400], ids=lambda n: f"batches of {n}")
def test_blocks_evicted_from_memory_load_from_the_backend(open_test_store, batch):
    store = open_test_store("memory+posix", capacity_bytes=16 * BLOCK)
    entries = make_entries(block_ids(400, f"evicted{batch}"), low=BLOCK, high=BLOCK)
    for start in range(0, len(entries), batch):
        dump_entries(store, entries[start : start + batch])

    # Straight away, while the backend may still be writing ...
    assert store.lookup([e[0] for e in entries]) == [True] * len(entries)
    assert load_entries(store, entries) == ([], [])
    # ... and once it is done.
    store.flush()
    assert load_entries(store, entries[::-1]) == ([], [])


POSIX_WRITER = """
import storetest
from ucm.store import open_store

root, tag, count, num_shards, shards = storetest.child_args()
entries = storetest.make_entries(storetest.block_ids(count, tag), num_shards)
with open_store("posix", {"root": root, "num_shards": num_shards}) as store:
    storetest.dump_entries(store, [e for e in entries if e[1] in shards])
"""


def test_blocks_written_to_the_backend_by_another_process_are_found(open_test_store, root):
    store = open_test_store("memory+posix")
    entries = make_entries(block_ids(50, "other"))
    ids = [e[0] for e in entries]
    assert store.lookup(ids) == [False] * len(ids)

    run_child(POSIX_WRITER, str(root), "other", 50, 1, [0])

    assert store.lookup(ids) == [True] * len(ids)
    assert store.lookup_prefix(ids) == len(ids)
    assert load_entries(store, entries) == ([], [])


def test_removed_blocks_do_not_come_back_from_pending_backend_writes(open_test_store, root):
    store = open_test_store("memory+posix", capacity_bytes=64 << 20)
    entries = make_entries(block_ids(500, "resurrect"), low=8192, high=8192)
    ids = [e[0] for e in entries]
    dump_entries(store, entries)

    store.remove(ids)
    store.flush()

    assert store.lookup(ids) == [False] * len(ids)
    with open_store("posix", {"root": str(root)}) as disk:
        assert disk.lookup(ids) == [False] * len(ids)
