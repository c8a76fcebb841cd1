"""Would a load that overlaps the forward pass cost less than one before it? Measured on this machine.

One warm vLLM engine (no connector) holds a long prompt in its prefix cache; each round times that
prompt's TTFT (the FLOOR) three ways, interleaved: alone; after a copy of as many bytes as a load
from the store moves (two threads, as the store's load does); and with the same copy started
together with the request, running beside the forward pass. If the second and third cost the same,
the forward pass leaves no CPU for a load to hide in and a layer-wise load would not pay here.

It also reports how many cores the FLOOR request keeps busy (process CPU time over wall time;
run it with ``OMP_WAIT_POLICY=PASSIVE`` to leave out the OpenMP threads' spinning).

    python benchmarks/connector_overlap.py [--model PATH] [--rounds 14] [--copy-mib 93]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import threading
import time

MODES = ("alone", "copy before", "copy beside")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the main job's small model)")
    parser.add_argument("--rounds", type=int, default=14)
    parser.add_argument("--copy-mib", type=int, default=93, help="bytes a load moves (93 MiB: 7936 tokens here)")
    parser.add_argument("--prompt-tokens", type=int, default=8032)
    args = parser.parse_args()
    from connector_bench import ENGINE_ENV  # benchmarks/ is on sys.path when a script runs

    os.environ.update(ENGINE_ENV)  # the main job's engine settings

    import numpy as np
    from models import build, cache_dir
    from vllm import LLM, SamplingParams

    model = args.model or build(cache_dir("small"), "small")
    llm = LLM(
        model,
        max_model_len=args.prompt_tokens + 64,
        max_num_batched_tokens=args.prompt_tokens + 64,
        enable_prefix_caching=True,
        kv_cache_memory_bytes=2 << 30,
        enforce_eager=True,
    )
    vocab = llm.llm_engine.model_config.get_vocab_size()
    rng = random.Random(0)
    prompt = {"prompt_token_ids": [rng.randrange(100, vocab) for _ in range(args.prompt_tokens)]}
    params = SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate([prompt], params, use_tqdm=False)  # computed once; every request after it is the FLOOR

    half = (args.copy_mib << 20) // 2
    sources = [np.ones(half, np.uint8) for _ in range(2)]
    targets = [np.full(half, 2, np.uint8) for _ in range(2)]  # written now: no page faults in the copies
    copy_ms: list[float] = []

    def copy(i: int) -> None:
        started = time.perf_counter()
        np.copyto(targets[i], sources[i])  # numpy releases the GIL for the copy
        copy_ms.append(1e3 * (time.perf_counter() - started))

    ttft: dict[str, list[float]] = {mode: [] for mode in MODES}
    cores: list[float] = []
    for _ in range(args.rounds):
        for mode in MODES:
            time.sleep(0.3)  # the engine's OpenMP threads go idle between requests, as between users' requests
            threads = [threading.Thread(target=copy, args=(i,)) for i in range(2)]
            started, cpu = time.perf_counter(), cpu_seconds()
            if mode != "alone":
                for t in threads:
                    t.start()
                if mode == "copy before":
                    for t in threads:
                        t.join()
            llm.generate([prompt], params, use_tqdm=False)
            if mode == "copy beside":
                for t in threads:
                    t.join()
            wall = time.perf_counter() - started
            ttft[mode].append(1e3 * wall)
            if mode == "alone":
                cores.append((cpu_seconds() - cpu) / wall)

    base = statistics.median(ttft["alone"])
    print(f"| FLOOR TTFT, {args.rounds} rounds | median (ms) | mean (ms) | median over alone (ms) |")
    print("| --- | --- | --- | --- |")
    for mode in MODES:
        values = ttft[mode]
        print(
            f"| {mode} | {statistics.median(values):.1f} | {statistics.fmean(values):.1f} | "
            f"{statistics.median(values) - base:+.1f} |"
        )
    print()
    print(f"copy of {args.copy_mib} MiB on two threads: median {statistics.median(copy_ms):.1f} ms per thread")
    print(f"cores busy during the FLOOR request: {min(cores):.2f}-{max(cores):.2f}")
    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")


if __name__ == "__main__":
    main()
