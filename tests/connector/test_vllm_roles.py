"""``kv_producer`` only writes to the store, ``kv_consumer`` only reads it."""

from __future__ import annotations

from connectortest import (
    HITS,
    LOADED,
    LOOKUP_HITS,
    SAVE_SECONDS,
    SAVED,
    SINGLE,
    STEP_SECONDS,
    EngineResult,
    assert_loaded_every_full_chunk,
    assert_same_outputs,
    distinct_chunks,
)


def test_producer_writes_but_never_loads(first_run, second_run):
    base = EngineResult(first_run["base32"])
    first, again = EngineResult(first_run["producer"]), EngineResult(second_run["producer-again"])
    assert_same_outputs(first, base, "single")
    assert_same_outputs(again, base, "single")
    stored = distinct_chunks(SINGLE, 32)
    assert EngineResult(first_run["producer"]).files_at_exit == stored
    # A second producer finds every chunk in the store and still computes the whole prompt.
    assert again.metric("single", LOOKUP_HITS) == stored
    assert again.metric("single", HITS) == 0
    assert again.metric("single", LOADED) == 0
    assert again.cached("single") == [0] * len(SINGLE)
    assert EngineResult(second_run["producer-again"]).files_at_exit == stored


def test_a_producers_steps_wait_for_its_commits_and_its_metrics_say_so(first_run):
    """A producer answers only once its chunks are committed: its steps wait for every save, so
    ``vllm:ucm_step_seconds`` (the steps' time in the connector) holds all of
    ``vllm:ucm_save_seconds``; a ``kv_both`` engine only copies the chunks out in its steps."""
    producer = EngineResult(first_run["producer"])
    assert 0 < producer.metric("single", SAVE_SECONDS) <= producer.metric("single", STEP_SECONDS)
    both = EngineResult(first_run["cold32"])
    assert both.metric("single", SAVED) > 0 and both.metric("single", STEP_SECONDS) > 0


def test_consumer_on_an_empty_store_writes_nothing(first_run):
    run = EngineResult(first_run["consumer-empty"])
    assert_same_outputs(run, EngineResult(first_run["base32"]), "single")
    assert run.metric("single", HITS) == 0
    assert run.metric("single", SAVED) == 0
    assert EngineResult(first_run["consumer-empty"]).files_at_exit == 0


def test_consumer_loads_what_a_producer_wrote(first_run, second_run):
    run = EngineResult(second_run["consumer"])
    assert_same_outputs(run, EngineResult(first_run["base32"]), "single")
    assert_loaded_every_full_chunk(run, "single", SINGLE, 32)
    assert run.metric("single", SAVED) == 0
    assert EngineResult(second_run["consumer"]).files_at_exit == distinct_chunks(SINGLE, 32)
