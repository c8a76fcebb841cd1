"""The ``mooncake`` store against a real Mooncake Store: its master (with the HTTP metadata service)
started from the binary in Mooncake's own wheel, and clients over TCP on loopback.

Mooncake's CPU wheel (``mooncake-transfer-engine-non-cuda``) is installed by the tests session;
without it these tests are skipped on a developer's machine and fail under CI.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from redisserver import free_port
from storetest import block_ids, payload, run_child

from ucm.store import StoreError, open_store


def mooncake_dir() -> Path:
    try:
        import mooncake
    except ImportError as exc:
        message = f"Mooncake's Python package is not installed ({exc}); the tests session installs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return Path(mooncake.__file__).parent


@pytest.fixture(scope="module")
def master(tmp_path_factory):
    """A Mooncake master with its HTTP metadata service; yields the store config to reach it."""
    binary = mooncake_dir() / "mooncake_master"
    rpc, http = free_port(), free_port()
    log = tmp_path_factory.mktemp("mooncake") / "master.log"
    args = [str(binary), f"-rpc_port={rpc}", "-enable_http_metadata_server=true", f"-http_metadata_server_port={http}"]
    args += ["-http_metadata_server_host=127.0.0.1", f"-metrics_port={free_port()}"]
    with open(log, "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    config = {"master": f"127.0.0.1:{rpc}", "metadata_server": f"http://127.0.0.1:{http}/metadata"}
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"mooncake_master did not come up: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", rpc), timeout=1).close()
            socket.create_connection(("127.0.0.1", http), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    yield config
    process.kill()
    process.wait(10)


def open_mooncake(master, tmp_path, **options):
    config = {**master, "prefix": f"{tmp_path.name}/", "global_segment_size": 64 << 20, **options}
    config.setdefault("local_buffer_size", 16 << 20)
    return open_store("mooncake", config)


def test_blocks_round_trip_with_gathered_buffers(master, tmp_path):
    with open_mooncake(master, tmp_path) as store:
        ids = block_ids(40, "mc-round")
        data = [payload(i, 0, 50_000) for i in ids]
        # Each block dumped from three pieces (as the connector's staging slices), loaded into two.
        # The pieces are temporaries: the store must keep them alive until the task is over, though
        # the caller dropped them and other buffers of the same size take their memory meanwhile.
        task = store.dump(ids, [[bytearray(d[:1000]), bytearray(d[1000:30_000]), bytearray(d[30_000:])] for d in data])
        scratch = [bytearray(b"\x5a" * size) for size in (1000, 29_000, 20_000) for _ in range(60)]
        store.wait(task)
        del scratch
        assert store.lookup(ids + block_ids(1, "mc-absent")) == [True] * 40 + [False]
        assert store.lookup_prefix(ids + block_ids(1, "mc-absent") + ids) == 40
        out = [[np.zeros(20_000, np.uint8), np.zeros(30_000, np.uint8)] for _ in ids]
        store.wait(store.load(ids, out))
        assert all(a.tobytes() + b.tobytes() == d for (a, b), d in zip(out, data, strict=True))


def test_missing_blocks_and_size_mismatches_fail_by_id(master, tmp_path):
    with open_mooncake(master, tmp_path) as store:
        ids = block_ids(3, "mc-fail")
        store.wait(store.dump(ids[:2], [payload(i, 0, 4096) for i in ids[:2]]))
        out = [bytearray(4096), bytearray(1000), bytearray(4096)]
        with pytest.raises(StoreError) as caught:
            store.wait(store.load(ids, out))
        assert caught.value.ids == ids[1:]
        assert "1000 bytes" in caught.value.reasons[ids[1]] and "not in the store" in caught.value.reasons[ids[2]]
        assert bytes(out[0]) == payload(ids[0], 0, 4096)


def test_a_block_counts_once_every_shard_is_written(master, tmp_path):
    with open_mooncake(master, tmp_path, num_shards=2) as store:
        ids = block_ids(5, "mc-shards")
        store.wait(store.dump(ids, [payload(i, 0, 2048) for i in ids], [0] * 5))
        assert store.lookup(ids) == [False] * 5
        with pytest.raises(StoreError, match="not all 2 shards"):
            store.wait(store.load(ids[:1], [bytearray(2048)], [0]))
        store.wait(store.dump(ids, [payload(i, 1, 2048) for i in ids], [1] * 5))
        assert store.lookup(ids) == [True] * 5
        out = [bytearray(2048) for _ in ids]
        store.wait(store.load(ids, out, [1] * 5))
        assert [bytes(b) for b in out] == [payload(i, 1, 2048) for i in ids]


READER = """
import json
import storetest
from ucm.store import open_store

name, config, tag, count = storetest.child_args()
ids = storetest.block_ids(count, tag)
with open_store(name, config) as store:
    present = store.lookup(ids)
    out = [bytearray(8192) for _ in ids]
    store.wait(store.load(ids, out))
right = sum(bytes(b) == storetest.payload(i, 0, 8192) for b, i in zip(out, ids))
print(json.dumps({"present": sum(present), "right": right}))
"""


def test_another_process_reads_what_this_one_wrote(master, tmp_path):
    with open_mooncake(master, tmp_path) as store:
        ids = block_ids(30, "mc-handover")
        store.wait(store.dump(ids, [payload(i, 0, 8192) for i in ids]))
        config = {**master, "prefix": f"{tmp_path.name}/", "global_segment_size": 0, "local_buffer_size": 16 << 20}
        result = json.loads(run_child(READER, "mooncake", config, "mc-handover", 30))
    assert result == {"present": 30, "right": 30}


def test_an_unreachable_master_is_named(tmp_path):
    mooncake_dir()
    port = free_port()
    with pytest.raises(ValueError, match=f"127.0.0.1:{port}"):
        open_store(
            "mooncake",
            {
                "master": f"127.0.0.1:{port}",
                "metadata_server": f"http://127.0.0.1:{free_port()}/metadata",
                "global_segment_size": 0,
            },
        )
