"""One vLLM engine in a fresh process: ``python engine_run.py SPEC.json RESULT.json``.

The tests start this script once per engine, so every engine begins with an empty device cache
and only the store connects one run to the next, as with separate servers. ``SPEC.json``:

``model``, ``block_size``, ``max_num_batched_tokens``, ``enable_chunked_prefill``, ``max_model_len``
    the engine.
``connector``
    ``null`` (no connector) or ``{"kv_role", "extra_config", "module_path", "failure_policy"}``.
``phases``
    ``[{"name", "prompts": [[token ids]], "max_tokens", "logprobs"}]``, one ``generate`` call
    each, in order. Greedy sampling.
``store_root``
    counted after each phase (block files under ``blocks/``).
``sabotage``
    ``null`` or ``"truncate"`` / ``"delete"``: the first time a lookup finds chunks in the store,
    every block file under ``store_root`` is cut in half or removed before the load starts, as
    another process evicting or damaging blocks would.
``expect_error``
    the engine must fail to start; the result records the error instead of outputs.

``RESULT.json``: per phase the outputs (tokens, logprobs as exact floats, cached prompt tokens),
the counters and gauges that phase added (``llm.get_metrics()``), and the block file count.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# Before vLLM is imported: one process on a small CPU box, no hub, no compile.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

KV_CACHE_BYTES = 64 << 20


def block_files(root: str | None) -> list[Path]:
    """The committed block files of a posix store root (temporary files being written excluded)."""
    if not root:
        return []
    return sorted(p for p in Path(root).glob("blocks/*/*") if p.is_file() and not p.name.startswith(".tmp"))


def install_sabotage(action: str, root: str) -> None:
    """Damage the store right after the first lookup that finds chunks, before their load is submitted."""
    from ucm.connector.vllm.connector import UcmConnector

    lookup = UcmConnector.get_num_new_matched_tokens
    done = False

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        nonlocal done
        result = lookup(self, request, num_computed_tokens)
        if not done and result[0]:
            done = True
            for path in block_files(root):
                if action == "delete":
                    path.unlink()
                else:
                    os.truncate(path, path.stat().st_size // 2)
        return result

    UcmConnector.get_num_new_matched_tokens = get_num_new_matched_tokens


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
        enable_prefix_caching=True,
        distributed_executor_backend="uni",
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        enforce_eager=True,
        disable_log_stats=False,
        seed=0,
        **kwargs,
    )


def metric_values(llm) -> dict[str, float]:
    """Counters and gauges summed over engines; labels other than model and engine become part of the name."""
    from vllm.v1.metrics.reader import Counter, Gauge

    values: dict[str, float] = {}
    for metric in llm.get_metrics():
        if not isinstance(metric, Counter | Gauge):
            continue
        extra = {k: v for k, v in sorted(metric.labels.items()) if k not in ("model_name", "engine")}
        name = metric.name + ("{" + ",".join(f"{k}={v}" for k, v in extra.items()) + "}" if extra else "")
        values[name] = values.get(name, 0) + metric.value
    return values


def output_record(output) -> dict:
    completion = output.outputs[0]
    return {
        "tokens": list(completion.token_ids),
        # Exact floats: JSON round-trips a Python float bit for bit.
        "logprobs": [
            sorted([token, entry.logprob, entry.rank] for token, entry in position.items())
            for position in completion.logprobs
        ],
        "num_cached_tokens": output.num_cached_tokens,
        "finish_reason": completion.finish_reason,
    }


def run(spec: dict) -> dict:
    from vllm import SamplingParams

    if spec.get("sabotage"):
        install_sabotage(spec["sabotage"], spec["store_root"])
    if spec.get("expect_error"):
        try:
            make_engine(spec)
        except Exception as exc:  # the error is the result
            return {"error": f"{type(exc).__name__}: {exc}"}
        return {"error": None}

    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    llm = make_engine(spec)
    result = {"phases": [], "registered_by_plugin": "UcmConnector" in KVConnectorFactory._registry}
    before = metric_values(llm)
    for phase in spec["phases"]:
        params = SamplingParams(temperature=0.0, max_tokens=phase.get("max_tokens", 8), logprobs=phase.get("logprobs", 2))
        outputs = llm.generate([{"prompt_token_ids": p} for p in phase["prompts"]], params, use_tqdm=False)
        after = metric_values(llm)
        result["phases"].append(
            {
                "name": phase["name"],
                "outputs": [output_record(o) for o in outputs],
                "metrics": {name: after[name] - before.get(name, 0) for name in after},
                "files": len(block_files(spec.get("store_root"))),
            }
        )
        before = after
    # Shutting down waits for the saves still in flight, so the store is complete when this process ends.
    llm.llm_engine.engine_core.shutdown()
    return result


if __name__ == "__main__":
    spec_path, result_path = sys.argv[1:3]
    with open(spec_path) as f:
        spec = json.load(f)
    result = run(spec)
    with open(result_path, "w") as f:
        json.dump(result, f)
