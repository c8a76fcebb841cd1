"""A damaged store costs recomputation, never a different output."""

from __future__ import annotations

import pytest
from connectortest import (
    CONCURRENT,
    HITS,
    LOAD_FAILURES,
    LOADED,
    SINGLE,
    EngineResult,
    assert_same_outputs,
    distinct_chunks,
    loadable,
)

FULL_HIT = sum(loadable(p, 32) for p in SINGLE)


@pytest.mark.parametrize("engine", ["corrupt-half", "corrupt-half-sync", "corrupt-half-staged"])
def test_corrupted_blocks_are_recomputed(first_run, second_run, engine):
    """A flipped byte in every other block file: those chunks fail their checksum, the rest load."""
    run = EngineResult(second_run[engine])
    assert_same_outputs(run, EngineResult(first_run["base32"]), "single")
    assert run.metric("single", HITS) == FULL_HIT  # lookups see the files; loads find the damage
    assert run.metric("single", LOAD_FAILURES) > 0
    assert run.metric("single", LOADED) > 0
    assert run.metric("single", LOADED) + run.metric("single", LOAD_FAILURES) == FULL_HIT // 32


def test_corrupted_blocks_of_requests_loading_together(first_run, second_run):
    """Requests sharing a prefix, admitted in one batch, each find damaged chunks among good ones."""
    run = EngineResult(second_run["corrupt-concurrent"])
    assert_same_outputs(run, EngineResult(first_run["base32"]), "concurrent")
    assert run.metric("concurrent", HITS) == sum(loadable(p, 32) for p in CONCURRENT)
    assert run.metric("concurrent", LOAD_FAILURES) > 0
    assert run.metric("concurrent", LOADED) > 0


@pytest.mark.parametrize(
    "scenario",
    [
        "corrupt-all",  # every block file damaged
        "unreadable",  # a lookup finds the blocks but no read returns (an I/O error the store does not act on)
        "truncated-race",  # blocks truncated between lookup and load
    ],
)
def test_blocks_that_never_load_are_recomputed_once(first_run, second_run, scenario):
    run = EngineResult(second_run[scenario])
    assert_same_outputs(run, EngineResult(first_run["base32"]), "single")
    assert run.metric("single", HITS) == FULL_HIT
    assert run.metric("single", LOADED) == 0
    assert run.metric("single", LOAD_FAILURES) == FULL_HIT // 32


def test_blocks_deleted_between_lookup_and_load(first_run, second_run):
    """The first request that hits finds its blocks gone; the requests after it miss."""
    run = EngineResult(second_run["deleted-race"])
    assert_same_outputs(run, EngineResult(first_run["base32"]), "single")
    hits = run.metric("single", HITS)
    assert hits == loadable(SINGLE[0], 32)
    assert run.metric("single", LOADED) == 0
    assert run.metric("single", LOAD_FAILURES) == hits // 32
    # The engine stores again what it had to compute.
    assert run.files_at_exit == distinct_chunks(SINGLE, 32)


def test_blocks_deleted_before_the_engine_starts_are_misses(first_run, second_run):
    run = EngineResult(second_run["wiped-half"])
    assert_same_outputs(run, EngineResult(first_run["base32"]), "single")
    # Each prompt hits up to its first missing chunk.
    assert run.metric("single", HITS) < FULL_HIT
    assert run.metric("single", LOAD_FAILURES) == 0
    assert run.metric("single", LOADED) == run.metric("single", HITS) // 32
    # The engine stores again what it had to compute.
    assert run.files_at_exit == distinct_chunks(SINGLE, 32)
