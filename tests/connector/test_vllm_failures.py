"""A damaged store costs recomputation, never a different output."""

from __future__ import annotations

import pytest
from connectortest import (
    CONCURRENT,
    HITS,
    LOAD_FAILURES,
    LOADED,
    SAVE_SKIPPED,
    SAVED,
    SHORT_THEN_LONG,
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


def test_saves_beyond_the_backlog_are_skipped_and_recomputed_later(first_run, second_run):
    """A store that falls behind costs later misses, never memory without bound or a wrong output.

    With ``save_backlog_bytes: 0`` no save starts while another is in flight: of the four requests
    computed in one step, only the first one's chunks are saved."""
    cold = EngineResult(first_run["backlog-cold"])
    first_chunks = len(CONCURRENT[0]) // 32
    # Saves are counted once the store has them; the last may land after the phase's figures.
    assert cold.metric("concurrent", SAVED) <= first_chunks
    assert cold.metric("concurrent", SAVE_SKIPPED) == sum(len(p) // 32 for p in CONCURRENT[1:])
    assert cold.files_at_exit == first_chunks
    assert any("save_backlog_bytes" in line and "not saved" in line for line in cold.raw["log"])
    # A fresh engine finds what was saved, recomputes the rest with the same outputs, and saves it.
    warm = EngineResult(second_run["backlog-warm"])
    assert_same_outputs(warm, cold, "concurrent")
    saved = {tuple(CONCURRENT[0][: (i + 1) * 32]) for i in range(first_chunks)}
    leading = [
        next((i for i in range(loadable(p, 32) // 32) if tuple(p[: (i + 1) * 32]) not in saved), loadable(p, 32) // 32)
        for p in CONCURRENT
    ]
    assert leading[-1] == 0  # the last prompt shares nothing with the first: all of it is recomputed
    assert warm.metric("concurrent", LOADED) == sum(leading)
    assert warm.metric("concurrent", SAVE_SKIPPED) == 0
    assert warm.files_at_exit == distinct_chunks(CONCURRENT, 32)


def test_a_request_with_a_skipped_save_saves_nothing_after_the_gap(first_run):
    """Chunks after a skipped one are unreachable by prefix lookups, so they are not written either.

    The long prompt's first save is skipped (the short one's is in flight); its later saves find
    the store idle, but writing them would only cost disk and I/O."""
    run = EngineResult(first_run["backlog-chunked"])
    short, long = SHORT_THEN_LONG
    assert run.metric("chunked", SAVE_SKIPPED) == len(long) // 32
    assert run.files_at_exit == len(short) // 32


def _save_admission_worker(backlog: int, limit: int):
    """A worker-side connector with only its save-admission state: ``backlog`` bytes in flight, ``limit`` the bound."""
    from ucm.connector.vllm.connector import UcmConnector
    from ucm.connector.vllm.metrics import UcmConnectorStats

    worker = object.__new__(UcmConnector)
    worker._wait_for_commit = False
    worker._save_gaps, worker._stats = {}, UcmConnectorStats()
    worker._skipped_since_warning, worker._last_skip_warning = 0, 0.0
    worker._save_backlog, worker._save_backlog_limit = backlog, limit
    worker._step_seconds = 0.0
    return worker


def test_a_save_that_reaches_back_to_the_gap_is_taken_again():
    """A preempted request is computed again from its first unsaved chunk: that save fills the gap,
    so it and the saves after it are taken once the store has room."""
    from ucm.connector.vllm.connector import ChunkJob

    worker = _save_admission_worker(backlog=100, limit=150)

    def room(first: int, count: int) -> bool:
        job = ChunkJob("r", first, [b"k"] * count, [0] * count, [0] * count)
        return worker._room_to_save(job, 10 * count)

    assert not room(0, 8)  # 80 bytes more would pass the bound: chunks 0-7 skipped
    worker._save_backlog = 0  # the store caught up
    assert not room(8, 8)  # past the gap: never reachable by a lookup
    assert room(0, 4)  # preempted and computed again from chunk 0: chunks 0-3 are saved ...
    assert not room(16, 4)  # ... but 4-15 are not, so what lies past them is still skipped
    assert room(4, 8) and room(12, 4) and room(16, 4)  # the saves that follow on are taken
    assert worker._save_gaps == {"r": 20}
    assert worker._stats.data["save_skipped"] == 8 + 8 + 4


def test_saves_resume_once_the_store_has_caught_up(tmp_path):
    """The backlog bound holds saves back only while the store is behind: once the saves in flight
    are in the store, the next one is taken (with ``save_backlog_bytes: 0``, only then)."""
    from collections import deque

    import torch

    from ucm.connector.vllm.connector import ChunkJob, UcmConnectorMetadata
    from ucm.connector.vllm.paged import PagedKV, StagingPool
    from ucm.store import open_store

    caches = {f"layers.{i}": torch.randn(4, 2, 32, 2 * 64).to(torch.float16) for i in range(2)}
    worker = _save_admission_worker(backlog=0, limit=0)  # plus the save path, over a real store and cache
    worker._connector_metadata = None
    worker._paged = PagedKV(caches, "cpu", 32, "strided")
    worker._staging = StagingPool(worker._paged)
    worker.store = open_store("posix", {"root": str(tmp_path)})
    worker._layerwise = worker._sparse = None
    worker._shard = 0
    worker._saves, worker._copying = deque(), deque()

    def save(req_id: str, first_block: int) -> list[bytes]:
        keys = [f"{req_id}-{i}".encode() for i in range(2)]
        job = ChunkJob(req_id, 0, keys, [first_block, first_block + 1], [0, 0])
        worker.bind_connector_metadata(UcmConnectorMetadata(saves=[job]))
        worker.wait_for_save()
        worker.clear_connector_metadata()
        return keys

    try:
        first = save("a", 0)
        worker._reap_saves(block=True)  # the store has every save that was in flight
        assert worker._save_backlog == 0
        second = save("b", 2)
        worker._reap_saves(block=True)
        assert worker.store.lookup_prefix(first) == 2 and worker.store.lookup_prefix(second) == 2
        assert worker._stats.data.get("save_skipped", 0) == 0
        assert worker._stats.data["saved_chunks"] == 4
    finally:
        worker.store.close()
