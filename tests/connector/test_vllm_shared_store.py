"""Engines that share one Redis server: each finds what another wrote, and a server restart costs misses only."""

from __future__ import annotations

from connectortest import (
    HITS,
    LOAD_FAILURES,
    LOADED,
    SINGLE,
    EngineResult,
    assert_loaded_every_full_chunk,
    assert_same_outputs,
    loadable,
)


def test_an_engine_process_loads_what_another_wrote_to_redis(first_run, second_run):
    base = EngineResult(first_run["base32"])
    cold, warm = EngineResult(first_run["redis-cold"]), EngineResult(second_run["redis-warm"])
    assert_same_outputs(cold, base, "single")
    assert cold.metric("single", HITS) == 0
    assert_same_outputs(warm, base, "single")
    assert_loaded_every_full_chunk(warm, "single", SINGLE, 32)
    assert warm.metric("single", LOAD_FAILURES) == 0


def test_a_redis_restart_between_lookup_and_load_is_recomputed(first_run, second_run):
    """The server restarts empty while the first hit's load is in flight: that load fails, the engine
    recomputes, later lookups miss, and every output is still the baseline's."""
    run = EngineResult(second_run["redis-restart"])
    assert_same_outputs(run, EngineResult(first_run["base32"]), "single")
    hits = run.metric("single", HITS)
    assert hits == loadable(SINGLE[0], 32)  # only the first request found its chunks
    assert run.metric("single", LOADED) == 0
    assert run.metric("single", LOAD_FAILURES) == hits // 32
