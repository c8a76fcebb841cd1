"""The KVStore contract, checked against every store configuration (posix, memory, plugins, stacked)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from storetest import (
    AVAILABLE_KINDS,
    AVAILABLE_LOAD_KINDS,
    block_ids,
    dump_entries,
    dump_slot,
    load_entries,
    load_slot,
    make_entries,
    store_config,
)

from ucm.store import KVStore, StoreError, open_store


def wait_for_failure(store, task) -> StoreError:
    with pytest.raises(StoreError) as excinfo:
        store.wait(task)
    return excinfo.value


def poll_until_checked(store, task, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not store.check(task):
        assert time.monotonic() < deadline, "check() never became True"
        time.sleep(0.001)


# -- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("num_shards", [1, 2, 4])
@pytest.mark.parametrize("kind", AVAILABLE_KINDS)
def test_one_block_round_trips_through_each_buffer_kind(open_test_store, store_kind, num_shards, kind):
    store = open_test_store(store_kind, num_shards)
    entries = make_entries(block_ids(1, "one"), num_shards)
    load_kind = "memoryview" if kind == "bytes" else kind

    dump_entries(store, entries, [kind], parts=3)

    assert store.lookup([entries[0][0]]) == [True]
    assert load_entries(store, entries, [load_kind], parts=3) == ([], [])
    assert load_entries(store, entries, [load_kind], parts=1) == ([], [])


@pytest.mark.parametrize("num_shards", [1, 2, 4])
def test_ten_thousand_blocks_round_trip_with_mixed_gathered_buffers(open_test_store, store_kind, num_shards):
    store = open_test_store(store_kind, num_shards)
    ids = block_ids(10_000, f"bulk{num_shards}")
    # Small blocks of 256 B .. 4 KiB split over the shards.
    entries = make_entries(ids, num_shards, low=256 // num_shards, high=4096 // num_shards)

    dump_entries(store, entries, AVAILABLE_KINDS, parts=(1, 2, 3))

    assert store.lookup(ids) == [True] * len(ids)
    assert store.lookup_prefix(ids) == len(ids)
    shuffled = [entries[i] for i in np.random.default_rng(7).permutation(len(entries))]
    assert load_entries(store, shuffled, AVAILABLE_LOAD_KINDS, parts=(3, 1, 2)) == ([], [])


def test_ids_of_one_and_sixty_four_bytes_round_trip(open_test_store, store_kind):
    store = open_test_store(store_kind)
    entries = make_entries([b"\x00", b"\xff" * 64, b"k" * 63])

    dump_entries(store, entries)

    assert store.lookup([e[0] for e in entries]) == [True, True, True]
    assert load_entries(store, entries) == ([], [])


def test_block_is_visible_only_once_every_shard_is_written(open_test_store, store_kind):
    store = open_test_store(store_kind, num_shards=2)
    [block_id] = block_ids(1, "shards")
    shard0, shard1 = make_entries([block_id], num_shards=2)

    dump_entries(store, [shard0])
    assert store.lookup([block_id]) == [False]
    assert store.lookup_prefix([block_id]) == 0
    assert load_entries(store, [shard0])[0] == [block_id]

    dump_entries(store, [shard1])
    assert store.lookup([block_id]) == [True]
    assert load_entries(store, [shard0, shard1]) == ([], [])


def test_dumping_a_stored_block_again_succeeds(open_test_store, store_kind):
    store = open_test_store(store_kind, num_shards=2)
    entries = make_entries(block_ids(3, "again"), num_shards=2)
    dump_entries(store, entries)

    dump_entries(store, entries)
    dump_entries(store, entries[::-1])

    assert load_entries(store, entries) == ([], [])


def test_concurrent_threads_share_one_store(open_test_store, store_kind):
    store = open_test_store(store_kind)
    shared = make_entries(block_ids(16, "threads-shared"))

    def worker(index: int) -> list[tuple[list[bytes], list[bytes]]]:
        own = make_entries(block_ids(16, f"threads-{index}"))
        results = []
        for _ in range(10):
            dump_entries(store, own + shared)
            results.append(load_entries(store, shared + own, ["numpy"], parts=2))
        return results

    with ThreadPoolExecutor(4) as pool:
        results = [result for future in [pool.submit(worker, i) for i in range(4)] for result in future.result()]

    assert results == [([], [])] * 40


# -- lookups, removal, prefetch ----------------------------------------------------------------


def test_lookup_reports_each_id_and_prefix_counts_leading_hits(open_test_store, store_kind):
    store = open_test_store(store_kind)
    present = block_ids(4, "present")
    absent = block_ids(2, "absent")
    dump_entries(store, make_entries(present))

    assert store.lookup([present[0], absent[0], present[1], absent[1]]) == [True, False, True, False]
    assert store.lookup([]) == []
    assert store.lookup_prefix(present) == 4
    assert store.lookup_prefix([present[0], present[1], absent[0], present[2]]) == 2
    assert store.lookup_prefix([absent[0], *present]) == 0
    assert store.lookup_prefix([]) == 0


def test_remove_makes_blocks_missing_and_ignores_absent_ids(open_test_store, store_kind):
    store = open_test_store(store_kind, num_shards=2)
    ids = block_ids(3, "remove")
    entries = make_entries(ids, num_shards=2)
    dump_entries(store, entries)

    store.remove([ids[1], *block_ids(1, "never-stored")])

    assert store.lookup(ids) == [True, False, True]
    assert load_entries(store, entries) == ([ids[1]], [])
    dump_entries(store, entries)
    assert load_entries(store, entries) == ([], [])


def test_prefetch_accepts_present_and_absent_ids(open_test_store, store_kind):
    store = open_test_store(store_kind)
    entries = make_entries(block_ids(4, "prefetch"))
    dump_entries(store, entries)

    store.prefetch([e[0] for e in entries] + block_ids(2, "prefetch-absent"))

    assert load_entries(store, entries) == ([], [])


# -- failures of single blocks -------------------------------------------------------------------


def test_load_of_a_missing_block_fails_only_that_block(open_test_store, store_kind):
    store = open_test_store(store_kind, num_shards=2)
    present = make_entries(block_ids(2, "here"), num_shards=2)
    missing = make_entries(block_ids(1, "gone"), num_shards=2)
    dump_entries(store, present)
    batch = present[:2] + missing + present[2:]
    slots = [load_slot(len(data)) for _, _, data in batch]

    task = store.load([e[0] for e in batch], [s.arg for s in slots], [e[1] for e in batch])
    error = wait_for_failure(store, task)

    missing_id = missing[0][0]
    assert error.ids == [missing_id]  # each failed block once, though both its shards failed
    assert set(error.reasons) == {missing_id} and error.reasons[missing_id]
    assert missing_id.hex() in str(error)
    for (block_id, _, data), slot in zip(batch, slots, strict=True):
        if block_id != missing_id:
            assert slot.value() == data


def test_load_into_buffers_of_the_wrong_size_fails_only_those_blocks(open_test_store, store_kind):
    store = open_test_store(store_kind)
    entries = make_entries(block_ids(4, "sizes"), low=1000, high=3000)
    dump_entries(store, entries)
    (a, _, a_data), (b, _, b_data), (c, _, c_data), (d, _, d_data) = entries
    short = load_slot(len(b_data) - 1)
    long = load_slot(len(c_data) + 1, parts=2)
    good = [load_slot(len(a_data)), load_slot(len(d_data), parts=3)]

    task = store.load([a, b, c, d], [good[0].arg, short.arg, long.arg, good[1].arg])
    error = wait_for_failure(store, task)

    assert sorted(error.ids) == sorted([b, c])
    assert good[0].value() == a_data and good[1].value() == d_data
    # The failed loads did not damage the stored blocks.
    assert load_entries(store, entries) == ([], [])


def test_store_error_lists_failed_blocks_once_each_in_submission_order(open_test_store, store_kind):
    store = open_test_store(store_kind, num_shards=2)
    ids = block_ids(1000, "order")
    entries = make_entries(ids, num_shards=2, low=64, high=256)
    dump_entries(store, [e for e in entries if ids.index(e[0]) % 3 == 0])

    failed, wrong = load_entries(store, entries)

    assert wrong == []
    assert failed == [block_id for index, block_id in enumerate(ids) if index % 3 != 0]


def test_check_becomes_true_and_wait_then_returns_or_raises(open_test_store, store_kind):
    store = open_test_store(store_kind)
    entries = make_entries(block_ids(8, "check"), low=64 << 10, high=256 << 10)
    slots = [dump_slot(data) for _, _, data in entries]

    dump_task = store.dump([e[0] for e in entries], [s.arg for s in slots])
    poll_until_checked(store, dump_task)
    assert store.check(dump_task)
    store.wait(dump_task)

    missing = block_ids(1, "check-missing")
    load_task = store.load(missing, [bytearray(10)])
    poll_until_checked(store, load_task)
    assert wait_for_failure(store, load_task).ids == missing


# -- argument errors, raised at submit time -----------------------------------------------------------


@pytest.mark.parametrize("op", ["dump", "load"])
def test_unequal_argument_lengths_raise_value_error_at_once(open_test_store, store_kind, op):
    store = open_test_store(store_kind, num_shards=2)
    ids = block_ids(2, "lengths")
    submit = getattr(store, op)

    with pytest.raises(ValueError):
        submit(ids, [bytearray(8)])
    with pytest.raises(ValueError):
        submit(ids[:1], [bytearray(8), bytearray(8)])
    with pytest.raises(ValueError):
        submit(ids, [bytearray(8), bytearray(8)], [0])


BAD_IDS = {
    "str": "abc",
    "int": 7,
    "bytearray": bytearray(b"abc"),
    "empty": b"",
    "65 bytes": b"x" * 65,
}


@pytest.mark.parametrize("bad_id", list(BAD_IDS.values()), ids=list(BAD_IDS))
@pytest.mark.parametrize("op", ["lookup", "lookup_prefix", "dump", "load", "remove"])
def test_invalid_ids_raise_value_error(open_test_store, store_kind, op, bad_id):
    store = open_test_store(store_kind)
    ids = [block_ids(1, "good")[0], bad_id]

    with pytest.raises(ValueError):
        if op in ("dump", "load"):
            getattr(store, op)(ids, [bytearray(8), bytearray(8)])
        else:
            getattr(store, op)(ids)


@pytest.mark.parametrize("shard", [2, -1])
def test_shard_outside_num_shards_raises_value_error(open_test_store, store_kind, shard):
    store = open_test_store(store_kind, num_shards=2)

    with pytest.raises(ValueError):
        store.dump(block_ids(1, "shard"), [bytearray(8)], [shard])
    with pytest.raises(ValueError):
        store.load(block_ids(1, "shard"), [bytearray(8)], [shard])


@pytest.mark.parametrize("empty", [b"", bytearray(), []], ids=["bytes", "bytearray", "empty list"])
def test_zero_byte_dump_raises_value_error(open_test_store, store_kind, empty):
    store = open_test_store(store_kind)

    with pytest.raises(ValueError):
        store.dump(block_ids(1, "zero"), [empty])


READ_ONLY = {
    "bytes": lambda n: bytes(n),
    "memoryview of bytes": lambda n: memoryview(bytes(n)),
    "read-only numpy": lambda n: np.frombuffer(bytes(n), dtype=np.uint8),
}


@pytest.mark.parametrize("make_buffer", list(READ_ONLY.values()), ids=list(READ_ONLY))
def test_load_into_a_read_only_buffer_raises_value_error(open_test_store, store_kind, make_buffer):
    store = open_test_store(store_kind)
    entries = make_entries(block_ids(1, "ro"))
    dump_entries(store, entries)

    with pytest.raises(ValueError):
        store.load([entries[0][0]], [make_buffer(len(entries[0][2]))])
    with pytest.raises(ValueError):
        store.load([entries[0][0]], [[bytearray(1), make_buffer(len(entries[0][2]) - 1)]])


def test_shard_bytes_mismatch_raises_value_error_naming_the_index(open_test_store, store_kind):
    if store_kind == "example-dict":
        pytest.skip("shard_bytes is a key of the built-in stores only")
    store = open_test_store(store_kind, num_shards=2, shard_bytes=1024)
    ids = block_ids(5, "shard-bytes")
    entries = make_entries(ids, num_shards=2, low=1024, high=1024)
    wrong = [bytearray(1024) for _ in ids]
    wrong[3] = bytearray(1000)

    with pytest.raises(ValueError, match=r"\b3\b"):
        store.dump(ids, wrong)
    with pytest.raises(ValueError, match=r"\b3\b"):
        store.load(ids, wrong)
    with pytest.raises(ValueError, match=r"\b0\b"):
        store.dump(ids[:1], [[bytearray(512), bytearray(513)]])

    dump_entries(store, entries, parts=(1, 2))
    assert load_entries(store, entries, parts=(3, 1)) == ([], [])


# -- lifetime -------------------------------------------------------------------------------


def test_context_manager_closes_the_store(tmp_path, store_kind):
    name, config = store_config(store_kind, tmp_path / "root")
    entries = make_entries(block_ids(20, "with"))

    with open_store(name, config) as store:
        assert isinstance(store, KVStore)
        dump_entries(store, entries)
        assert load_entries(store, entries) == ([], [])
    store.close()  # closing again does nothing

    if "posix" in store_kind:
        # Everything written before close() is in the shared root.
        with open_store("posix", {"root": str(tmp_path / "root")}) as fresh:
            assert load_entries(fresh, entries) == ([], [])


def test_stored_bytes_do_not_alias_the_dumped_buffers(open_test_store, store_kind):
    store = open_test_store(store_kind)
    [(block_id, _, data)] = make_entries(block_ids(1, "alias"))
    source = bytearray(data)

    store.wait(store.dump([block_id], [source]))
    source[:] = bytes(len(source))

    target = bytearray(len(data))
    store.wait(store.load([block_id], [target]))
    assert target == data
