"""The main job's cold check (benchmarks/connector_bench.py) with real engines on the tiny model: the
step-by-step turns of two engine processes, and the fallback where they do not fit in memory together."""

from __future__ import annotations

import os
import shutil
import tempfile

import connector_bench as bench
import pytest


@pytest.fixture
def cold_bench(tiny_model, tmp_path, monkeypatch):
    from ucm.store.posix import SHARED_MEMORY_DIR_ENV

    shm = tempfile.mkdtemp(prefix="ucm-cold-check-test-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    monkeypatch.setenv(SHARED_MEMORY_DIR_ENV, shm)
    monkeypatch.setattr(bench, "COLD_CHECK_PAIRS", 1)
    settings = bench.parse_args(["--docs", "1", "--doc-tokens", "300", "--cold-docs", "2", "--dtype", "float32"])
    settings.chunk_budget = 128  # each document (300 tokens and a question) takes three or more steps
    workload = bench.build_workload(settings, tiny_model)
    pool = bench.EnginePool(str(tmp_path), planned=2)
    pool.prepare()
    try:
        yield bench.Bench(settings, tiny_model, workload, pool)
    finally:
        pool.close()
        shutil.rmtree(shm, ignore_errors=True)


def _check_outputs(passes: dict[str, bench.Pass], docs: int) -> tuple[list[dict], list[dict]]:
    none, ucm = passes["cold-check-none"], passes["cold-check-ucm"]
    assert none.error is None and ucm.error is None, (none.error, ucm.error)
    assert len(none.rows) == len(ucm.rows) == docs
    # Saving must not change what the engine computes: the same first token and logprob, document by document.
    assert bench.same_in_check(passes) == f"{docs}/{docs}"
    assert ucm.stored_bytes and ucm.stored_bytes > 0  # UCM's engine saved what it prefilled
    # The cost of saving is read from these prefills, not from the cold pass's (absent here).
    prefills = bench.cold_prefills(passes, [])
    assert [p[0] for p in prefills] == [f"cold check, document {n + 1}" for n in range(docs)]
    assert all(p[1] > 0 and p[2] > 0 for p in prefills)
    return none.rows, ucm.rows


def test_the_cold_check_engines_take_turns_step_by_step_and_agree(cold_bench):
    assert cold_bench.side_by_side([cold_bench.kv_cache_bytes(cold_bench.workload.cold_check)] * 2)
    none, ucm = _check_outputs(cold_bench.cold_check(), 2)
    for a, b in zip(none, ucm, strict=True):
        # Both engines ran the same prompt in the same number of chunked-prefill steps, more than one.
        assert a["steps"] == b["steps"] >= 3
        assert a["wait_s"] < 0.001  # an engine without a connector has no saves to wait for
        assert b["wait_s"] >= 0.0 and b["after_s"] >= 0.0
        assert b["ttft"] >= b["wait_s"]


def test_the_cold_check_runs_one_engine_after_the_other_where_two_do_not_fit(cold_bench, monkeypatch):
    monkeypatch.setattr(cold_bench, "side_by_side", lambda kv_bytes: False)
    none, ucm = _check_outputs(cold_bench.cold_check(), 2)
    # No steps to report: each engine prefilled every document in one generate call per prompt.
    assert not any("steps" in row for row in none + ucm)
