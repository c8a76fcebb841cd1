"""How the connector is found and how a wrong setting is reported."""

from __future__ import annotations

import re

import pytest
from connectortest import (
    HITS,
    LOADED,
    SHARED_MEMORY_HITS,
    SINGLE,
    EngineResult,
    assert_same_outputs,
    block_files,
    loadable,
)

from ucm.connector.vllm.config import ConnectorConfig


def test_unknown_extra_config_key_is_named(first_run):
    error = first_run["unknown-key"]["error"]
    assert error is not None, "an engine with an unknown kv_connector_extra_config key started"
    assert "'chunk_token'" in error
    assert "chunk_tokens" in error  # the key it was probably meant to be


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("chunk_tokens", 0),
        ("chunk_tokens", True),
        ("chunk_tokens", "32"),
        ("prewarm_bytes", -1),
        ("prewarm_bytes", 1.5),
        ("save_backlog_bytes", -1),
        ("save_backlog_bytes", "1GiB"),
    ],
)
def test_bad_integer_setting_is_named(key, value):
    with pytest.raises(ValueError) as caught:
        ConnectorConfig.from_extra_config({key: value})
    assert repr(key) in str(caught.value) and repr(value) in str(caught.value)


def test_chunk_tokens_must_divide_the_block_size(first_run):
    error = first_run["chunk-not-dividing"]["error"]
    assert error is not None, "an engine with chunk_tokens 24 and block size 32 started"
    assert "chunk_tokens" in error and "24" in error and "32" in error


def test_connector_found_by_module_path(first_run, module_path_run):
    result = module_path_run["module-path"]
    run = EngineResult(result)
    assert result["registered_by_plugin"] is False
    assert_same_outputs(run, EngineResult(first_run["base32"]), "single")
    assert run.metric("single", HITS) == sum(loadable(p, 32) for p in SINGLE) > 0


def test_vllm_default_load_failure_policy_is_warned_about(first_run):
    """With vLLM's default ("fail") a store restart between lookup and load fails the request:
    an engine that loads says so once and names the setting; one that only saves, or that
    recomputes failed loads, says nothing about it."""

    def policy_warnings(name: str) -> list[str]:
        return [w for w in EngineResult(first_run[name]).raw["warnings"] if "kv_load_failure_policy" in w]

    warned = policy_warnings("redis-cold")
    assert len(warned) == 1, warned
    assert '"recompute"' in warned[0] and "error" in warned[0]
    assert policy_warnings("producer") == []  # kv_producer never loads
    assert policy_warnings("cold32") == []  # "recompute"


def test_a_fresh_engine_prewarms_its_store_and_says_so(first_run, second_run):
    """At start-up a loading engine reads the store's most recent chunks back into memory in the
    background (the first loads after a restart then skip the disk), and logs what it read once that
    is over; prewarm_bytes 0 turns it off."""

    def prewarm_lines(run: dict, name: str) -> list[str]:
        return [line for line in EngineResult(run[name]).raw["log"] if "prewarm read" in line]

    lines = prewarm_lines(second_run, "warm32")  # over the store cold32 filled
    assert len(lines) == 1, lines
    mib, files = re.search(r"read ([0-9.]+) MiB \((\d+) files\)", lines[0]).groups()
    # Every block file cold32 left (the budget, this engine's KV cache, holds them all).
    assert float(mib) > 0 and int(files) == first_run["cold32"]["files_at_exit"]
    assert prewarm_lines(first_run, "cold32") == []  # its store was empty: nothing to read
    assert prewarm_lines(second_run, "warm128") == []  # prewarm_bytes 0


def test_a_posix_store_shares_its_chunks_through_host_memory_by_default(first_run, second_run, stores):
    """With the posix store, the connector turns on the store's shared host-memory tier: every chunk
    the cold engine saved has a copy there (in the session's ``UCM_SHARED_MEMORY_DIR``), and the next
    engine process of this host loads from memory, as ``vllm:ucm_shared_memory_hits`` says;
    ``shared_memory_bytes`` 0 turns it off."""
    from ucm.store import open_store
    from ucm.store.posix import shared_memory_files

    root = stores["s32"]
    assert EngineResult(first_run["cold32"]).files_at_exit > 0
    assert len(shared_memory_files(root)) == 1
    with open_store("posix", {"root": str(root), "shared_memory_bytes": 1 << 20}) as store:
        assert store.shared_memory_stats()["filled"] == len(block_files(root))
    warm = EngineResult(second_run["warm32"])
    assert warm.metric("doc", SHARED_MEMORY_HITS) == warm.metric("doc", LOADED) > 0
