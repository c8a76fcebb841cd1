"""Several processes sharing one posix root or one Redis server, directly or through their own memory stores."""

from __future__ import annotations

import json

import pytest
from storetest import (
    AVAILABLE_KINDS,
    AVAILABLE_LOAD_KINDS,
    block_ids,
    dump_entries,
    load_entries,
    make_entries,
    run_child,
    start_child,
    store_config,
)

from ucm.store import open_store

#: Child script: open a store, dump shards ``shards`` of ``block_ids(count, tag)``, close it.
WRITER = """
import storetest
from ucm.store import open_store

name, config, tag, count, num_shards, shards = storetest.child_args()
entries = storetest.make_entries(storetest.block_ids(count, tag), num_shards)
with open_store(name, config) as store:
    storetest.dump_entries(store, [e for e in entries if e[1] in shards], storetest.AVAILABLE_KINDS, parts=(1, 2))
"""

#: Child script: open a store and report lookup and load results for every shard of ``block_ids(count, tag)``.
READER = """
import json
import storetest
from ucm.store import open_store

name, config, tag, count, num_shards = storetest.child_args()
ids = storetest.block_ids(count, tag)
entries = storetest.make_entries(ids, num_shards)
with open_store(name, config) as store:
    present = store.lookup(ids)
    failed, wrong = storetest.load_entries(store, entries, storetest.AVAILABLE_LOAD_KINDS, parts=(2, 1))
print(json.dumps({"present": sum(present), "failed": len(failed), "wrong": len(wrong)}))
"""


def read_in_child(kind: str, root, tag: str, count: int, num_shards: int) -> dict:
    name, config = store_config(kind, root, num_shards)
    return json.loads(run_child(READER, name, config, tag, count, num_shards))


@pytest.mark.parametrize("num_shards", [1, 2])
@pytest.mark.parametrize(
    ("writer_kind", "reader_kind"),
    [("posix", "posix"), ("posix", "memory+posix"), ("redis", "redis"), ("redis", "memory+redis")],
)
def test_another_process_reads_what_this_one_wrote(
    open_test_store, tmp_path, request, num_shards, writer_kind, reader_kind
):
    if writer_kind == "redis":
        request.getfixturevalue("redis_server")
    store = open_test_store(writer_kind, num_shards)
    entries = make_entries(block_ids(200, "handover"), num_shards)
    dump_entries(store, entries, AVAILABLE_KINDS, parts=(1, 3))

    result = read_in_child(reader_kind, tmp_path / "root", "handover", 200, num_shards)

    assert result == {"present": 200, "failed": 0, "wrong": 0}


def test_this_process_reads_what_another_one_wrote(open_test_store, tmp_path):
    store = open_test_store("posix", num_shards=2)
    entries = make_entries(block_ids(200, "from-child"), num_shards=2)
    assert store.lookup([e[0] for e in entries]) == [False] * len(entries)

    run_child(WRITER, *store_config("posix", tmp_path / "root", 2), "from-child", 200, 2, [0, 1])

    assert store.lookup([e[0] for e in entries]) == [True] * len(entries)
    assert load_entries(store, entries, AVAILABLE_LOAD_KINDS) == ([], [])


@pytest.mark.parametrize("reader_kind", ["posix", "memory+posix"])
def test_memory_over_posix_blocks_reach_another_process_after_close(tmp_path, reader_kind):
    name, config = store_config("memory+posix", tmp_path / "root", num_shards=2)
    entries = make_entries(block_ids(500, "closed"), num_shards=2)
    with open_store(name, config) as store:
        dump_entries(store, entries)

    result = read_in_child(reader_kind, tmp_path / "root", "closed", 500, 2)

    assert result == {"present": 500, "failed": 0, "wrong": 0}


@pytest.mark.parametrize("kind", ["posix", "memory+posix", "redis"])
def test_shards_dumped_by_different_processes_complete_a_block(open_test_store, tmp_path, request, kind):
    if "redis" in kind:
        request.getfixturevalue("redis_server")
    store = open_test_store(kind, num_shards=2)
    ids = block_ids(20, "tp")
    entries = make_entries(ids, num_shards=2)
    dump_entries(store, [e for e in entries if e[1] == 0])
    if kind == "memory+posix":
        store.flush()
    assert store.lookup(ids) == [False] * len(ids)
    assert sorted(load_entries(store, entries)[0]) == sorted(ids)

    run_child(WRITER, *store_config(kind, tmp_path / "root", 2), "tp", 20, 2, [1])

    assert store.lookup(ids) == [True] * len(ids)
    assert load_entries(store, entries) == ([], [])


def test_shards_dumped_concurrently_by_two_processes_complete_every_block(open_test_store, tmp_path):
    name, config = store_config("posix", tmp_path / "root", 2)
    writers = [start_child(WRITER, name, config, "tp-concurrent", 2000, 2, [rank]) for rank in (0, 1)]
    for writer in writers:
        _, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err

    store = open_test_store("posix", num_shards=2)
    entries = make_entries(block_ids(2000, "tp-concurrent"), num_shards=2)
    assert store.lookup_prefix([e[0] for e in entries[::2]]) == 2000
    assert load_entries(store, entries) == ([], [])


#: Child script: for ``seconds``, randomly dump, load (and optionally remove) blocks shared with other processes.
HAMMER = """
import json
import random
import time

import storetest
from ucm.store import open_store, StoreError

name, config, num_shards, with_remove, seconds, seed = storetest.child_args()
entries = storetest.make_entries(storetest.block_ids(64, "hammer"), num_shards, low=4096, high=96 << 10)
rng = random.Random(seed)
stats = {"loads": 0, "loaded": 0, "load_failures": 0, "wrong": 0, "dump_failures": 0}
with open_store(name, config) as store:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        batch = rng.sample(entries, 12)
        action = rng.random()
        if action < 0.4:
            try:
                storetest.dump_entries(store, batch, ["bytes", "numpy"], parts=(1, 2))
            except StoreError as error:
                stats["dump_failures"] += len(error.ids)
        elif action < 0.5 and with_remove:
            store.remove(list({e[0] for e in batch}))
        else:
            failed, wrong = storetest.load_entries(store, batch, ["bytearray", "address"], parts=(2, 1))
            stats["loads"] += len({e[0] for e in batch})
            stats["load_failures"] += len(failed)
            stats["loaded"] += len({e[0] for e in batch} - set(failed))
            stats["wrong"] += len(wrong)
print(json.dumps(stats))
"""


@pytest.mark.slow
@pytest.mark.parametrize("with_remove", [False, True], ids=["dump+load", "dump+load+remove"])
@pytest.mark.parametrize(("kind", "num_shards"), [("posix", 1), ("posix", 2), ("memory+posix", 1)])
def test_processes_dumping_and_loading_the_same_ids_never_read_wrong_bytes(tmp_path, kind, num_shards, with_remove):
    name, config = store_config(kind, tmp_path / "root", num_shards)
    children = [start_child(HAMMER, name, config, num_shards, with_remove, 2.5, seed) for seed in (1, 2)]
    results = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        results.append(json.loads(out))

    for stats in results:
        assert stats["wrong"] == 0, results
        assert stats["loaded"] > 0, results
        if not with_remove:
            assert stats["dump_failures"] == 0, results
