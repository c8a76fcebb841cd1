"""Outputs with the connector equal those without it, and what a fresh engine skips came from the store."""

from __future__ import annotations

import pytest
from connectortest import (
    CONCURRENT,
    DOC,
    DOC_OTHER_QUESTION,
    ENGINE,
    HITS,
    LOAD_FAILURES,
    LOADED,
    LONG,
    LOOKUP_HITS,
    SHORT,
    SINGLE,
    EngineResult,
    assert_loaded_every_full_chunk,
    assert_same_outputs,
    distinct_chunks,
    loadable,
)


def base_cold_warm(first_run, second_run, block: int) -> tuple[EngineResult, EngineResult, EngineResult]:
    """The engine without the connector, the one that filled the store, and a fresh one reading it."""
    return (
        EngineResult(first_run[f"base{block}"]),
        EngineResult(first_run[f"cold{block}"]),
        EngineResult(second_run[f"warm{block}"]),
    )


@pytest.mark.parametrize("block", [32, 128])
def test_fresh_engine_loads_every_full_chunk_but_the_last_token(first_run, second_run, block):
    base, cold, warm = base_cold_warm(first_run, second_run, block)
    assert_same_outputs(cold, base, "single")
    assert_same_outputs(warm, base, "single")

    assert cold.metric("single", HITS) == 0
    assert_loaded_every_full_chunk(warm, "single", SINGLE, block)
    assert warm.metric("single", LOAD_FAILURES) == 0
    # The lookup found every full chunk, the ones it leaves to compute included.
    assert warm.metric("single", LOOKUP_HITS) == sum(len(p) // block for p in SINGLE)


def test_synchronous_loads(first_run, second_run):
    """``load_async: false``: the load finishes before the request's first forward pass."""
    run = EngineResult(second_run["sync"])
    assert_same_outputs(run, EngineResult(first_run["base32"]), "single")
    assert_loaded_every_full_chunk(run, "single", SINGLE, 32)


def test_loads_through_a_staging_buffer(first_run, second_run):
    """A store that cannot load straight into the cache (a memory tier over posix) gets a staging buffer."""
    run = EngineResult(second_run["staged"])
    assert_same_outputs(run, EngineResult(first_run["base32"]), "single")
    assert_loaded_every_full_chunk(run, "single", SINGLE, 32)


@pytest.mark.parametrize("block", [32, 128])
def test_cold_engine_stores_every_full_chunk_once(first_run, block):
    cold = EngineResult(first_run[f"cold{block}"])
    prompts = [o["prompt"] for p in cold.raw["phases"] for o in p["outputs"]]
    assert cold.files_at_exit == distinct_chunks(prompts, block) > 0


def test_document_shared_with_another_question_hits_on_the_document_only(first_run, second_run):
    base, warm = EngineResult(first_run["base32"]), EngineResult(second_run["warm32"])
    assert_same_outputs(warm, base, "doc")
    # The cold engine saw DOC with another question: the chunks that hold question tokens differ.
    shared = len(DOC) // 32 * 32
    assert shared < loadable(DOC_OTHER_QUESTION, 32)
    assert warm.cached("doc") == [shared]
    assert warm.metric("doc", HITS) == shared
    assert warm.metric("doc", LOADED) == shared // 32


def test_concurrent_requests_sharing_a_prefix(first_run, second_run):
    base, cold, warm = base_cold_warm(first_run, second_run, 32)
    assert_same_outputs(cold, base, "concurrent")
    assert_same_outputs(warm, base, "concurrent")
    expected = [loadable(p, 32) for p in CONCURRENT]
    assert warm.cached("concurrent") == expected
    # Admitted together, every request loads from the store (none waits for another's blocks).
    assert warm.metric("concurrent", HITS) == sum(expected)
    assert warm.metric("concurrent", LOAD_FAILURES) == 0


def test_block_size_128_concurrent_requests(first_run, second_run):
    base, warm = EngineResult(first_run["base128"]), EngineResult(second_run["warm128"])
    assert_same_outputs(warm, base, "concurrent")
    expected = [loadable(p, 128) for p in CONCURRENT]
    assert warm.cached("concurrent") == expected
    assert warm.metric("concurrent", HITS) == sum(expected) > 0


def test_prompts_shorter_than_a_chunk_neither_hit_nor_store(first_run, second_run):
    base, cold, warm = base_cold_warm(first_run, second_run, 32)
    assert all(len(p) < 32 for p in SHORT)
    assert_same_outputs(cold, base, "short")
    assert_same_outputs(warm, base, "short")
    assert cold.files_after("short") == 0
    assert warm.metric("short", HITS) == 0
    assert warm.cached("short") == [0] * len(SHORT)


def test_long_prompt_prefilled_in_steps_is_stored_and_loaded_whole(first_run, second_run):
    base, cold, warm = base_cold_warm(first_run, second_run, 32)
    (prompt,) = LONG
    assert len(prompt) > 4 * ENGINE["max_num_batched_tokens"]  # prefilled over several steps
    assert_same_outputs(cold, base, "long")
    assert_same_outputs(warm, base, "long")
    assert warm.metric("long", LOOKUP_HITS) == len(prompt) // 32
    assert warm.cached("long") == [loadable(prompt, 32)]
    assert warm.metric("long", HITS) == loadable(prompt, 32)
    assert warm.metric("long", LOADED) == loadable(prompt, 32) // 32


def test_engines_with_different_block_sizes_share_chunks(first_run, second_run):
    """A block-128 engine writes 32-token chunks; a block-32 engine with the same chunk size reads them."""
    writer, reader = EngineResult(first_run["cold128-chunk32"]), EngineResult(second_run["warm32-chunk32"])
    assert_same_outputs(writer, EngineResult(first_run["base128"]), "single")
    assert_same_outputs(reader, EngineResult(first_run["base32"]), "single")
    assert writer.files_at_exit == distinct_chunks(SINGLE, 32)
    assert_loaded_every_full_chunk(reader, "single", SINGLE, 32)


def test_wait_for_saves_returns_once_every_chunk_is_committed(first_run):
    """``UcmConnector.wait_for_saves()`` right after a request: every chunk's file is in the store while the
    engine still runs, though the request's last chunks were handed to the store as it ended and the store
    flushes each file to the disk."""
    run = EngineResult(first_run["wait-for-saves"])
    assert run.files_after("long") == distinct_chunks(LONG, 32) > 0


def test_chunks_smaller_than_a_block_load_into_the_last_partial_block(first_run, second_run):
    """With 32-token chunks a block-128 engine also loads the full chunks of each prompt's last, partial
    block, which vLLM's own prefix cache (whole blocks only) recomputes, and the outputs do not change."""
    run = EngineResult(second_run["warm128-chunk32"])
    assert_same_outputs(run, EngineResult(first_run["base128"]), "single")
    # Every whole 32-token chunk was served, so every prompt whose last block is partial got more
    # than vLLM's own prefix cache (whole blocks only) could give it.
    assert_loaded_every_full_chunk(run, "single", SINGLE, 32)
    assert any(loadable(p, 32) > loadable(p, 128) for p in SINGLE), "the prompts must end in partial blocks"
