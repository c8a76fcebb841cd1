"""The ``redis`` store against a real Redis server: what the shared contract tests cannot show.

The contract itself (round trips, shards, lookups, bad arguments) runs against ``redis`` and
``memory+redis`` in test_contract.py; here: damage, a server that goes away and comes back,
authentication, expiry, and configuration errors.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from redisserver import RedisCluster, RedisServer, free_port, make_certificates
from storetest import block_ids, payload

from ucm.store import StoreError, open_store


@pytest.fixture
def own_server(tmp_path):
    """A server of this test alone, which it may stop and start."""
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


def fill(store, ids, size=4096):
    store.wait(store.dump(ids, [payload(i, 0, size) for i in ids]))


def load_all(store, ids, size=4096):
    out = [bytearray(size) for _ in ids]
    store.wait(store.load(ids, out))
    return [bytes(b) for b in out]


def test_a_damaged_value_fails_its_load_and_is_dropped(redis_server, tmp_path):
    prefix = f"{tmp_path}:"
    with open_store("redis", {"url": redis_server.url, "prefix": prefix}) as store:
        ids = block_ids(3, "damage")
        fill(store, ids)
        key = prefix.encode() + ids[1]
        value = bytearray(redis_server.command("HGET", key, "0"))
        value[100] ^= 0x40
        redis_server.command("HSET", key, "0", bytes(value))
        out = [bytearray(4096) for _ in ids]
        with pytest.raises(StoreError) as caught:
            store.wait(store.load(ids, out))
        assert caught.value.ids == [ids[1]]
        assert "checksum" in caught.value.reasons[ids[1]]
        assert bytes(out[0]) == payload(ids[0], 0, 4096) and bytes(out[2]) == payload(ids[2], 0, 4096)
        # Dropped, so a lookup misses and the next dump writes it again.
        assert store.lookup(ids) == [True, False, True]
        fill(store, [ids[1]])
        assert load_all(store, [ids[1]]) == [payload(ids[1], 0, 4096)]


def test_a_value_of_another_block_is_never_served(redis_server, tmp_path):
    """A value copied under another key (a tool or a bug moving keys) fails: the trailer names its block."""
    prefix = f"{tmp_path}:"
    with open_store("redis", {"url": redis_server.url, "prefix": prefix}) as store:
        ids = block_ids(2, "moved")
        fill(store, ids[:1])
        value = redis_server.command("HGET", prefix.encode() + ids[0], "0")
        redis_server.command("HSET", prefix.encode() + ids[1], "0", value)
        with pytest.raises(StoreError, match="another block"):
            load_all(store, ids[1:])


def test_a_size_mismatch_names_both_sizes(redis_server, tmp_path):
    with open_store("redis", {"url": redis_server.url, "prefix": f"{tmp_path}:"}) as store:
        ids = block_ids(1, "size")
        fill(store, ids, 4096)
        with pytest.raises(StoreError, match="holds 4096 bytes but the buffers hold 1000"):
            store.wait(store.load(ids, [bytearray(1000)]))


def test_a_server_restart_costs_misses_and_failed_loads_never_errors_elsewhere(own_server, tmp_path, caplog):
    config = {"url": own_server.url, "prefix": "restart:", "timeout_s": 2.0, "warn_interval_s": 0}
    with open_store("redis", config) as store:
        ids = block_ids(4, "restart")
        fill(store, ids)
        assert store.lookup_prefix(ids) == 4
        own_server.stop()
        with caplog.at_level(logging.WARNING, logger="ucm.store.redis"):
            assert store.lookup(ids) == [False] * 4
            assert store.lookup_prefix(ids) == 0
        assert "lookups report misses" in caplog.text and str(own_server.port) in caplog.text
        with pytest.raises(StoreError) as caught:
            load_all(store, ids)
        assert caught.value.ids == ids
        assert str(own_server.port) in str(caught.value)
        with pytest.raises(StoreError):
            fill(store, ids)
        # The server comes back empty (no persistence): misses, then the store works again.
        own_server.start()
        assert store.lookup(ids) == [False] * 4
        fill(store, ids)
        assert load_all(store, ids) == [payload(i, 0, 4096) for i in ids]


def test_a_connection_dropped_mid_pipeline_fails_only_that_transfer(own_server):
    """The server kills every client while a large load is in flight; the next transfer reconnects."""
    with open_store("redis", {"url": own_server.url, "prefix": "kill:", "threads": 2}) as store:
        ids = block_ids(64, "kill")
        size = 1 << 20
        fill(store, ids, size)
        out = [np.zeros(size, np.uint8) for _ in ids]
        task = store.load(ids, out)
        own_server.command("CLIENT", "KILL", "TYPE", "normal")
        try:
            store.wait(task)
            failed = set()
        except StoreError as exc:
            failed = set(exc.ids)
        for block_id, buffer in zip(ids, out, strict=True):
            if block_id not in failed:
                assert buffer.tobytes() == payload(block_id, 0, size)
        assert load_all(store, ids[:4], size) == [payload(i, 0, size) for i in ids[:4]]


def test_authentication(tmp_path, monkeypatch):
    server = RedisServer(tmp_path / "redis", password="s3cret pass")
    try:
        base = f"redis://127.0.0.1:{server.port}/0"
        with pytest.raises(ValueError, match="refused the connection: NOAUTH|refused the connection: .*auth"):
            open_store("redis", {"url": base})
        with pytest.raises(ValueError, match="WRONGPASS|invalid password"):
            open_store("redis", {"url": base, "password": "wrong"})
        with open_store("redis", {"url": server.url}) as store:  # the password in the url
            fill(store, block_ids(1, "auth"))
        monkeypatch.setenv("UCM_TEST_REDIS_PASSWORD", "s3cret pass")
        with open_store("redis", {"url": base, "password_env": "UCM_TEST_REDIS_PASSWORD"}) as store:
            assert store.lookup(block_ids(1, "auth")) == [True]
        with pytest.raises(ValueError, match="UCM_TEST_NOT_SET"):
            open_store("redis", {"url": base, "password_env": "UCM_TEST_NOT_SET"})
    finally:
        server.stop()


def test_blocks_expire_with_ttl(redis_server, tmp_path):
    prefix = f"{tmp_path}:"
    with open_store("redis", {"url": redis_server.url, "prefix": prefix, "ttl_s": 600}) as store:
        ids = block_ids(2, "ttl")
        fill(store, ids)
        ttls = [redis_server.command("TTL", prefix.encode() + i) for i in ids]
        assert all(0 < t <= 600 for t in ttls), ttls
    with open_store("redis", {"url": redis_server.url, "prefix": prefix + "none:"}) as store:
        fill(store, ids)
        assert redis_server.command("TTL", (prefix + "none:").encode() + ids[0]) == -1


def test_databases_and_prefixes_keep_stores_apart(redis_server, tmp_path):
    url = redis_server.url.rsplit("/", 1)[0]
    ids = block_ids(1, "apart")
    with open_store("redis", {"url": f"{url}/1", "prefix": "a:"}) as one:
        fill(one, ids)
        with open_store("redis", {"url": f"{url}/2", "prefix": "a:"}) as other_db:
            assert other_db.lookup(ids) == [False]
        with open_store("redis", {"url": f"{url}/1", "prefix": "b:"}) as other_prefix:
            assert other_prefix.lookup(ids) == [False]
        with open_store("redis", {"host": "127.0.0.1", "port": redis_server.port, "db": 1, "prefix": "a:"}) as same:
            assert same.lookup(ids) == [True]


def test_configuration_errors_name_what_is_wrong():
    port = free_port()  # nothing listens there
    with pytest.raises(ValueError, match=rf"store 'redis': redis 127.0.0.1:{port}: cannot connect"):
        open_store("redis", {"port": port, "timeout_s": 1.0})
    with pytest.raises(ValueError, match="tls_cert_file and tls_key_file go together"):
        open_store("redis", {"port": port, "tls": True, "tls_cert_file": "/nonexistent.pem"})
    with pytest.raises(ValueError, match="must start with redis://, rediss:// or unix://"):
        open_store("redis", {"url": "http://127.0.0.1:6379"})
    with pytest.raises(ValueError, match="database number"):
        open_store("redis", {"url": f"redis://127.0.0.1:{port}/zero"})
    with pytest.raises(ValueError, match="unknown config key 'hots'"):
        open_store("redis", {"hots": "127.0.0.1"})


def test_tls(tmp_path):
    """A server that speaks TLS only: the store verifies its certificate (against a CA file and the
    host), refuses one it cannot verify, and can present a client certificate."""
    certificates = make_certificates(tmp_path / "certs")
    server = RedisServer(tmp_path / "redis", tls=certificates)
    try:
        url = f"rediss://127.0.0.1:{server.port}/0"
        with open_store("redis", {"url": url, "tls_ca_file": certificates["ca"], "prefix": "tls:"}) as store:
            ids = block_ids(20, "tls")
            fill(store, ids, 300_000)
            assert store.lookup(ids) == [True] * 20
            assert load_all(store, ids, 300_000) == [payload(i, 0, 300_000) for i in ids]
        with pytest.raises(ValueError, match="certificate verification failed"):
            open_store("redis", {"url": url})  # the system's CAs do not know the test CA
        with pytest.raises(ValueError, match="certificate verification failed"):
            open_store("redis", {"url": url, "tls_ca_file": certificates["ca"], "tls_server_name": "other.example"})
        with open_store("redis", {"url": url, "tls_verify": False, "prefix": "tls:"}) as store:
            assert store.lookup(block_ids(20, "tls")) == [True] * 20
        client = {"tls_cert_file": certificates["client_cert"], "tls_key_file": certificates["client_key"]}
        with open_store("redis", {"url": url, "tls_ca_file": certificates["ca"], "prefix": "tls:", **client}) as store:
            assert store.lookup(block_ids(20, "tls")) == [True] * 20
        with pytest.raises(ValueError, match="plain|closed|refused|handshake|reset"):
            open_store("redis", {"port": server.port, "timeout_s": 2.0})  # plain text to a TLS port
    finally:
        server.stop()


def test_a_redis_cluster_spreads_blocks_over_its_primaries_and_follows_resharding(tmp_path):
    cluster = RedisCluster(tmp_path / "cluster")
    try:
        with open_store("redis", {"url": cluster.url, "cluster": True, "prefix": "c:"}) as store:
            assert len(store.nodes()) == 3
            ids = block_ids(300, "cluster")
            fill(store, ids, 2048)
            assert store.lookup(ids) == [True] * 300
            assert load_all(store, ids, 2048) == [payload(i, 0, 2048) for i in ids]
            assert all(server.command("DBSIZE") > 50 for server in cluster.servers)
            # An operator moves slots (with their keys) to another primary: the first load of a moved
            # block misses (the server answers MOVED), the store reads the new slot map, and the
            # block loads again.
            source, target = cluster.servers[0], cluster.servers[1]
            before = source.command("DBSIZE")
            cluster.move_slots(source, target, 3000)
            assert source.command("DBSIZE") < before
            out = [bytearray(2048) for _ in ids]
            try:
                store.wait(store.load(ids, out))
                failed = set()
            except StoreError as exc:
                failed = set(exc.ids)
                assert all("MOVED" in exc.reasons[i] for i in failed)
            assert failed, "the moved blocks should miss once"
            assert all(bytes(b) == payload(i, 0, 2048) for b, i in zip(out, ids, strict=True) if i not in failed)
            assert store.lookup(ids) == [True] * 300
            assert load_all(store, ids, 2048) == [payload(i, 0, 2048) for i in ids]
    finally:
        cluster.stop()
