"""vLLM engines in a child process: ``python engine_run.py SPEC.json RESULT.json``.

``SPEC.json`` is ``{"engines": [engine, ...]}``; the engines run one after another, each shut
down before the next starts, so every engine begins with an empty device cache and only the
store links one to the next. An engine:

``name``, ``model``, ``block_size``, ``max_num_batched_tokens``, ``enable_chunked_prefill``, ``max_model_len``,
``dtype``
    the engine (``dtype`` by default the model's).
``connector``
    absent (no connector) or ``{"kv_role", "extra_config", "module_path", "failure_policy"}``.
``phases``
    ``[{"name", "prompts": [[token ids]], "max_tokens", "logprobs", "together"}]``, in order, greedy
    sampling. ``together``: one ``generate`` call for all the prompts (they share engine steps);
    false: one call per prompt, so a prompt's engine steps hold that prompt alone.
    ``wait_for_saves`` (optional): then wait until the connector's saves are committed, before the
    phase's block files are counted.
``store_root``
    its block files are counted after each phase.
``sabotage``
    ``"truncate"`` or ``"delete"``: the first time a lookup finds chunks in the store, every block
    file under ``store_root`` is cut in half or removed before the load starts, as another process
    damaging or evicting blocks at that moment would. ``"redis-restart"``: the Redis server
    described by ``redis`` is shut down and a new, empty one started on its port at that moment.
``expect_error``
    the engine must fail to start; its result is the error instead of outputs.

``RESULT.json``: one JSON line per engine, written as it ends: per phase the outputs (tokens,
logprobs as exact floats, prompt tokens not computed), the counters that phase added
(``llm.get_metrics()``) and the block file count; the block file count once the engine has shut
down. An engine that raises is recorded as a ``crash`` and the next one still runs; one that
stops making progress is recorded as a ``hang`` and ends the process (see ``Watchdog``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path

#: Set before vLLM is imported: one process on a small CPU box, no hub, no compilation.
ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TORCHDYNAMO_DISABLE": "1",
}
KV_CACHE_BYTES = 64 << 20
#: Seconds an engine may take for all its phases (a few on the 2-core test machines).
ENGINE_TIMEOUT = 120


def block_files(root: str | Path | None) -> list[Path]:
    """The committed block files of a posix store root (files still being written excluded)."""
    if not root:
        return []
    return sorted(p for p in Path(root).glob("blocks/*/*") if p.is_file() and not p.name.startswith(".tmp"))


@contextlib.contextmanager
def sabotage(action: str | None, root: str | None, redis: dict | None = None):
    """Damage the store right after the first lookup that finds chunks, before their load is submitted."""
    if not action:
        yield
        return
    from ucm.connector.vllm.connector import UcmConnector

    lookup = UcmConnector.get_num_new_matched_tokens
    done = False

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        nonlocal done
        result = lookup(self, request, num_computed_tokens)
        if not done and result[0]:
            done = True
            if action == "redis-restart":
                sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "store"))
                from redisserver import restart_server

                restart_server(redis)
            for path in block_files(root):
                if action == "delete":
                    path.unlink()
                else:
                    os.truncate(path, path.stat().st_size // 2)
        return result

    UcmConnector.get_num_new_matched_tokens = get_num_new_matched_tokens
    try:
        yield
    finally:
        UcmConnector.get_num_new_matched_tokens = lookup


def make_engine(spec: dict):
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kwargs = {}
    connector = spec.get("connector")
    if connector is not None:
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="UcmConnector",
            kv_connector_module_path=connector.get("module_path"),
            kv_role=connector.get("kv_role", "kv_both"),
            kv_load_failure_policy=connector.get("failure_policy", "recompute"),
            kv_connector_extra_config=connector.get("extra_config", {}),
        )
    return LLM(
        spec["model"],
        block_size=spec["block_size"],
        max_num_batched_tokens=spec.get("max_num_batched_tokens"),
        enable_chunked_prefill=spec.get("enable_chunked_prefill"),
        max_model_len=spec.get("max_model_len", 4096),
        dtype=spec.get("dtype", "auto"),
        enable_prefix_caching=True,
        distributed_executor_backend="uni",
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        enforce_eager=True,
        disable_log_stats=False,
        **kwargs,
    )


def counters(llm) -> dict[str, float]:
    """Counters summed over engines; labels other than model and engine become part of the name."""
    from vllm.v1.metrics.reader import Counter

    values: dict[str, float] = {}
    for metric in llm.get_metrics():
        if not isinstance(metric, Counter):
            continue
        extra = [f"{k}={v}" for k, v in sorted(metric.labels.items()) if k not in ("model_name", "engine")]
        name = metric.name + ("{" + ",".join(extra) + "}" if extra else "")
        values[name] = values.get(name, 0) + metric.value
    # LLM.get_metrics() rounds counters to whole numbers: read UCM's seconds as /metrics shows them.
    from prometheus_client import REGISTRY

    for family in REGISTRY.collect():
        if family.name.startswith("vllm:ucm_") and family.name.endswith("_seconds"):
            values[family.name] = sum(s.value for s in family.samples if s.name == family.name + "_total")
    return values


def output_record(output) -> dict:
    completion = output.outputs[0]
    return {
        "prompt": list(output.prompt_token_ids),
        "tokens": list(completion.token_ids),
        # [token, logprob, rank] per candidate; JSON keeps a Python float bit for bit.
        "logprobs": [
            sorted([token, entry.logprob, entry.rank] for token, entry in position.items())
            for position in completion.logprobs
        ],
        "num_cached_tokens": output.num_cached_tokens,
    }


@contextlib.contextmanager
def connector_log():
    """What UCM's connector logs meanwhile, INFO and up, as a list of (level number, message)."""
    records: list[tuple[int, str]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append((record.levelno, record.getMessage()))

    logger = logging.getLogger("ucm.connector")
    handler = Collect(logging.INFO)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def run_engine(spec: dict, results) -> dict:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if spec.get("expect_error"):
        try:
            llm = make_engine(spec)
        except Exception as exc:  # the error is the result
            return {"error": f"{type(exc).__name__}: {exc}"}
        llm.llm_engine.engine_core.shutdown()
        return {"error": None}

    with connector_log() as log:
        llm = make_engine(spec)
        result = {
            "phases": [],
            "registered_by_plugin": "UcmConnector" in KVConnectorFactory._registry,
            # Those of the start-up; "log" has everything the connector said while the engine lived.
            "warnings": [message for level, message in log if level >= logging.WARNING],
        }
        try:
            run_phases(llm, spec, result, results)
        finally:
            result["log"] = [message for _, message in log]
    result["files_at_exit"] = len(block_files(spec.get("store_root")))
    return result


def run_phases(llm, spec: dict, result: dict, results) -> None:
    from vllm import SamplingParams

    watchdog = Watchdog(llm, spec, results)
    watchdog.start()
    try:
        before = counters(llm)
        for phase in spec["phases"]:
            params = SamplingParams(temperature=0.0, max_tokens=phase["max_tokens"], logprobs=phase["logprobs"])
            prompts = [{"prompt_token_ids": p} for p in phase["prompts"]]
            if phase["together"]:
                outputs = llm.generate(prompts, params, use_tqdm=False)
            else:
                outputs = [out for prompt in prompts for out in llm.generate([prompt], params, use_tqdm=False)]
            if phase.get("wait_for_saves"):
                from vllm.distributed.kv_transfer import get_kv_transfer_group

                get_kv_transfer_group().wait_for_saves()
            after = counters(llm)
            result["phases"].append(
                {
                    "name": phase["name"],
                    "outputs": [output_record(o) for o in outputs],
                    "metrics": {name: after[name] - before.get(name, 0) for name in after},
                    "files": len(block_files(spec.get("store_root"))),
                }
            )
            before = after
    finally:
        watchdog.stopped.set()
        # Waits for the saves still in flight: the store is complete once the engine is gone.
        llm.llm_engine.engine_core.shutdown()


class Watchdog(threading.Thread):
    """Ends the process when an engine stops making progress: past its deadline, or when loads
    keep failing (with ``kv_load_failure_policy="recompute"`` a chunk may fail once per lookup,
    so failures beyond twice the prompts' chunks mean the same chunks are retried in a loop).

    The engine cannot be interrupted in the middle of ``generate``, so the record says why and the
    process exits; the parent starts the engines that remain in a new process.
    """

    def __init__(self, llm, spec: dict, results):
        super().__init__(daemon=True)
        self.llm, self.spec, self.results = llm, spec, results
        self.stopped = threading.Event()
        chunk = (spec.get("connector") or {}).get("extra_config", {}).get("chunk_tokens") or spec["block_size"]
        self.max_failures = 2 * sum(len(p) // chunk for phase in spec["phases"] for p in phase["prompts"])

    def run(self) -> None:
        deadline = time.monotonic() + self.spec.get("timeout_s", ENGINE_TIMEOUT)
        while not self.stopped.wait(0.25):
            failures = counters(self.llm).get("vllm:ucm_load_failures", 0)
            if failures > self.max_failures:
                reason = (
                    f"{failures:.0f} chunk load failures for prompts of {self.max_failures // 2} chunks: "
                    "the engine loads the same failing chunks again and again"
                )
            elif time.monotonic() > deadline:
                reason = f"no result after {self.spec.get('timeout_s', ENGINE_TIMEOUT)} s"
            else:
                continue
            self.results.write(json.dumps({"name": self.spec["name"], "hang": reason}) + "\n")
            self.results.flush()
            os._exit(3)


def main(spec_path: str, result_path: str) -> None:
    """Runs the engines in order, one JSON line per engine in ``result_path`` as each ends."""
    with open(spec_path) as f:
        engines = json.load(f)["engines"]
    with open(result_path, "w") as results:
        for spec in engines:
            try:
                with sabotage(spec.get("sabotage"), spec.get("store_root"), spec.get("redis")):
                    result = run_engine(spec, results)
            except Exception:
                result = {"crash": traceback.format_exc()}
            results.write(json.dumps({"name": spec["name"], **result}) + "\n")
            results.flush()


if __name__ == "__main__":
    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    main(*sys.argv[1:3])
