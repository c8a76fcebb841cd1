"""Sparse decode attention against dense decode on one CUDA GPU (one attention layer, one decode step).

Dense: torch ``scaled_dot_product_attention`` on contiguous ``[batch, kv_heads, len, dim]`` K/V
(flash, efficient and cuDNN backends, GQA through ``enable_gqa`` or expanded heads; the fastest is
the baseline) and the Triton paged decode over the whole block table. Sparse: the Triton paged
decode over a sparse table holding 1/8, 1/16 or 1/32 of the blocks, plus the retrieval that makes
that table (the algorithm's block scores, top-k, table build), which runs once every ``--stride``
steps, plus the summaries of newly full blocks (one block per sequence every ``block_tokens``
steps). ``--algorithm``: ``key_bounds`` (per-channel key minimum and maximum, kept in the cache's
dtype, where they are exact) or ``block_mean`` (float32 mean keys).
With ``--pool N`` the retrieval keeps N times the budget's middle blocks and the block after each
(once per stride), and every step re-ranks that pool to the budget (scores and top-k over the pool
only), as ``BlockRetrieval`` does with ``pool``. With ``--successors`` a retrieval chooses about half
of the budget's middle blocks by score and adds the block after each (``successors``: the read
stays within the budget).

Every time is the median over replays of a CUDA graph of 32 back-to-back calls, each call on the
next of several layers' caches (enough that the bytes one graph touches are far beyond the L2), so
nothing is timed from cache. Prints the card, versions and a markdown table; ``--out`` also writes
the table and the log to files.

    PYTHONPATH=packages/ucm-sparse/src python3 benchmarks/sparse_attention_bench.py
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ucm.sparse import SparseConfig
from ucm.sparse.kernels import reference
from ucm.sparse.kernels import triton_kernels as tk

Q_HEADS, KV_HEADS, DIM = 32, 8, 128
DTYPE = torch.bfloat16
CALLS_PER_GRAPH = 32
REPLAYS = 10
LAYER_BYTES = 8e9  # bytes of paged caches per case, spread over up to 32 layers


def log(*parts, file=None):
    line = " ".join(str(p) for p in parts)
    print(line, flush=True)
    if file is not None:
        file.write(line + "\n")
        file.flush()


def driver_version() -> str:
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return result.stdout.strip().splitlines()[0] if result.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def graph_time_us(call, layers: int) -> float:
    """Median time of one ``call(layer)`` in microseconds, from replays of a captured graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            call(i % layers)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS_PER_GRAPH):
            call(i % layers)
    graph.replay()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(REPLAYS):
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1000 / CALLS_PER_GRAPH)
    del graph
    return statistics.median(times)


class Case:
    """Paged caches of several layers for ``batch`` sequences of ``context`` tokens, and their tables."""

    def __init__(
        self, context: int, batch: int, block_tokens: int, sink_tokens: int, recent_tokens: int, algorithm: str
    ):
        self.context, self.batch, self.block_tokens = context, batch, block_tokens
        self.blocks_per_seq = math.ceil(context / block_tokens)
        total = batch * self.blocks_per_seq
        layer_bytes = 2 * batch * context * KV_HEADS * DIM * 2
        self.layers = max(1, min(32, int(LAYER_BYTES // layer_bytes)))
        gen = torch.Generator(device="cuda").manual_seed(context + batch + block_tokens)
        self.caches = []  # per layer [2, blocks, tokens, kv_heads, dim], the FlashAttention layout
        for _ in range(self.layers):
            cache = torch.empty((2, total, block_tokens, KV_HEADS, DIM), device="cuda", dtype=DTYPE)
            cache.normal_(generator=gen)
            self.caches.append(cache)
        self.tables = torch.randperm(total, generator=gen, device="cuda").to(torch.int32).view(batch, -1)
        self.lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        self.query = torch.randn((batch, Q_HEADS, DIM), generator=gen, device="cuda", dtype=DTYPE)
        self.scale = 1.0 / math.sqrt(DIM)
        self.sink = math.ceil(sink_tokens / block_tokens)
        self.recent = max(1, math.ceil(recent_tokens / block_tokens))
        all_blocks = torch.arange(total, device="cuda")
        self.algorithm = algorithm
        self.summaries = [self.summarize(i, all_blocks, self.new_summary_table()) for i in range(self.layers)]

    def new_summary_table(self) -> torch.Tensor:
        total = self.caches[0].shape[1]
        if self.algorithm == "key_bounds":  # exact in the cache's dtype
            return torch.empty((total, 2, KV_HEADS, DIM), device="cuda", dtype=DTYPE)
        return torch.empty((total, KV_HEADS, DIM), device="cuda", dtype=torch.float32)

    def summarize(self, layer: int, blocks: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        make = tk.key_bounds if self.algorithm == "key_bounds" else tk.mean_keys
        return make(self.kv(layer)[0], blocks, table, indexed=True)

    def score(self, layer: int, tables: torch.Tensor, lens: torch.Tensor, **tuning) -> torch.Tensor:
        return tk._block_scores(
            self.query,
            self.summaries[layer],
            tables,
            lens,
            self.block_tokens,
            self.sink,
            self.recent,
            self.scale,
            None,
            bounds=self.algorithm == "key_bounds",
            **tuning,
        )

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.caches[layer]
        return cache[0].permute(0, 2, 1, 3), cache[1].permute(0, 2, 1, 3)

    def contiguous(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's K and V gathered into ``[batch, kv_heads, context, dim]`` for SDPA."""
        key, value = self.kv(layer)
        out = []
        for view in (key, value):
            dense = torch.empty((self.batch, KV_HEADS, self.context, DIM), device="cuda", dtype=DTYPE)
            for row in range(self.batch):
                blocks = view[self.tables[row].long()]  # [n, heads, tokens, dim]
                dense[row] = blocks.permute(1, 0, 2, 3).reshape(KV_HEADS, -1, DIM)[:, : self.context]
            out.append(dense)
        return out[0], out[1]

    def budget(self, share: float) -> int:
        return max(self.sink + self.recent, math.ceil(self.blocks_per_seq * share))

    def scores(self, layer: int) -> torch.Tensor:
        return self.score(layer, self.tables, self.lens)

    def retrieve(self, layer: int, budget: int, successors: bool = False):
        scores = self.scores(layer)
        return tk.select_and_build(
            scores, self.tables, self.lens, self.block_tokens, self.sink, self.recent, budget, successors=successors
        )

    def scan_size(self, budget: int, args) -> int:
        """The blocks a scan chooses by score (before successors), by ``SparseConfig``'s own rule."""
        config = SparseConfig(
            budget_tokens=budget * self.block_tokens,
            sink_tokens=args.sink_tokens,
            recent_tokens=args.recent_tokens,
            stride=2,
            pool=args.pool,
            successors=args.successors,
        )
        return config.scan_blocks(self.blocks_per_seq, self.block_tokens)

    def rerank(self, layer: int, pool_table: torch.Tensor, pool_lens: torch.Tensor, budget: int):
        scores = self.score(layer, pool_table, pool_lens)
        return tk.select_and_build(scores, pool_table, pool_lens, self.block_tokens, self.sink, self.recent, budget)


SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
}


def time_sdpa(case: Case, out) -> dict[str, float]:
    """Each SDPA backend on contiguous K/V (two layers' worth, each far beyond the L2)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    layers = min(2, case.layers)
    kvs = [case.contiguous(i) for i in range(layers)]
    query = case.query[:, :, None, :]
    results = {}
    group = Q_HEADS // KV_HEADS
    expanded_bytes = 2 * case.batch * Q_HEADS * case.context * DIM * 2
    for name, backend in SDPA_BACKENDS.items():
        for form in ("enable_gqa", "expanded"):
            if form == "expanded":
                if expanded_bytes > 24e9:
                    log(f"  sdpa {name} expanded: skipped ({expanded_bytes / 1e9:.0f} GB)", file=out)
                    continue
                used = [(k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)) for k, v in kvs]
                kwargs = {}
            else:
                used = kvs
                kwargs = {"enable_gqa": True}

            def call(i, used=used, kwargs=kwargs, backend=backend):
                with sdpa_kernel(getattr(SDPBackend, backend)):
                    return F.scaled_dot_product_attention(query, used[i][0], used[i][1], scale=case.scale, **kwargs)

            try:
                t = graph_time_us(call, layers)
            except Exception as error:  # a backend that does not take this shape
                log(
                    f"  sdpa {name} {form}: unavailable ({type(error).__name__}: {str(error).splitlines()[0][:100]})",
                    file=out,
                )
                continue
            results[f"{name}/{form}"] = t
            log(f"  sdpa {name} {form}: {t:.1f} us", file=out)
            del used
    # The dense Triton decode must agree with SDPA on the same data.
    key, value = kvs[0]
    try:
        ref = F.scaled_dot_product_attention(query, key, value, scale=case.scale, enable_gqa=True)[:, :, 0]
        mine = tk.paged_decode(case.query, *case.kv(0), case.tables, case.lens, case.scale)
        error = ((mine.float() - ref.float()).norm() / ref.float().norm()).item()
        log(f"  dense Triton vs SDPA: relative error {error:.2e}", file=out)
    except Exception as error:
        log(f"  dense Triton vs SDPA: not compared ({type(error).__name__})", file=out)
    del kvs
    torch.cuda.empty_cache()
    return results


def decode_call(case: Case, tables, lens, **tuning):
    def call(i):
        return tk.paged_decode(case.query, *case.kv(i), tables, lens, case.scale, **tuning)

    return call


def sweep(case: Case, tables, lens, label: str, out) -> None:
    """A few tuning variants of the decode kernel (for the notes; the table uses the defaults)."""
    rows = case.batch * KV_HEADS
    block_n = max(64, case.block_tokens)
    splits = tk._decode_splits(rows, tables.shape[1] * case.block_tokens, block_n, torch.device("cuda"))
    variants = {
        "default": {},
        "stages3": {"num_stages": 3},
        "stages4": {"num_stages": 4},
        "warps8": {"num_warps": 8},
        "block_n128": {"block_n": max(128, case.block_tokens)},
        "block_n32": {"block_n": 32} if case.block_tokens <= 32 else None,
        "splits_x2": {"num_splits": splits * 2},
        "splits_half": {"num_splits": max(1, splits // 2)},
        "block_n128_stages3": {"block_n": max(128, case.block_tokens), "num_stages": 3},
    }
    parts = []
    for name, tuning in variants.items():
        if tuning is None:
            continue
        try:
            t = graph_time_us(decode_call(case, tables, lens, **tuning), case.layers)
            parts.append(f"{name} {t:.1f}")
        except Exception as error:
            parts.append(f"{name} failed ({type(error).__name__})")
    log(f"  sweep {label} (default splits {splits}): " + ", ".join(parts), file=out)


def sweep_scores(case: Case, out) -> None:
    """Tile widths and warps of the scoring kernel (for the notes; the table uses the defaults)."""
    parts = []
    for block_w in (32, 64, 128, 256):
        for warps in (2, 4, 8):
            try:
                t = graph_time_us(
                    lambda i, w=block_w, n=warps: case.score(i, case.tables, case.lens, block_w=w, num_warps=n),
                    case.layers,
                )
                parts.append(f"w{block_w}/{warps} {t:.1f}")
            except Exception as error:
                parts.append(f"w{block_w}/{warps} failed ({type(error).__name__})")
    log("  sweep scores (blocks per program / warps): " + ", ".join(parts), file=out)


def measure(case: Case, sdpa: dict[str, float], budgets: list[int], args, tune: bool, logfile) -> list[dict]:
    """The table's rows of one case: dense Triton, then each sparse budget."""
    best_name = min(sdpa, key=sdpa.get)
    best_sdpa = sdpa[best_name]
    dense = graph_time_us(decode_call(case, case.tables, case.lens), case.layers)
    log(f"  Triton dense paged decode: {dense:.1f} us", file=logfile)
    fastest_dense = min(best_sdpa, dense)
    new_blocks = torch.arange(case.batch, device="cuda") * case.blocks_per_seq  # one full block per sequence
    summary_tables = [case.new_summary_table() for _ in range(case.layers)]
    summary = graph_time_us(lambda i: case.summarize(i, new_blocks, summary_tables[i]), case.layers)
    log(f"  summaries of {case.batch} new blocks: {summary:.1f} us, once per {case.block_tokens} steps", file=logfile)
    if tune:
        sweep(case, case.tables, case.lens, "dense", logfile)
    rows = []
    for share in budgets:
        budget = case.budget(1 / share)
        scan = case.scan_size(budget, args) if args.successors else budget
        sparse = [case.retrieve(i, scan, successors=args.successors) for i in range(case.layers)]
        read = int(((sparse[0][1].long() + case.block_tokens - 1) // case.block_tokens).max())
        if read > budget:
            raise AssertionError(f"the sparse table reads {read} blocks, over the budget of {budget}")
        if share == 16:  # the sparse decode must agree with the reference on the same table
            ref = reference.paged_decode(case.query, *case.kv(0), *sparse[0], case.scale)
            mine = tk.paged_decode(case.query, *case.kv(0), *sparse[0], case.scale)
            error = ((mine.float() - ref.float()).norm() / ref.float().norm()).item()
            log(f"  sparse 1/{share} vs reference: relative error {error:.2e}", file=logfile)
            if tune:
                sweep(case, *sparse[0], f"sparse 1/{share}", logfile)
            scores = [case.scores(i) for i in range(case.layers)]
            scoring = graph_time_us(lambda i: case.scores(i), case.layers)
            selecting = graph_time_us(
                lambda i, b=budget, s=scores: tk.select_and_build(
                    s[i], case.tables, case.lens, case.block_tokens, case.sink, case.recent, b
                ),
                case.layers,
            )
            log(f"  retrieval 1/{share}: scores {scoring:.1f} us, select and build {selecting:.1f} us", file=logfile)
            if tune:
                sweep_scores(case, logfile)
            del scores
        decode = graph_time_us(
            lambda i, s=sparse: tk.paged_decode(case.query, *case.kv(i), *s[i], case.scale), case.layers
        )
        rerank = 0.0
        if args.pool:
            keep = case.scan_size(budget, args)
            pools = [case.retrieve(i, keep, successors=True) for i in range(case.layers)]
            rerank = graph_time_us(lambda i, b=budget, p=pools: case.rerank(i, *p[i], b), case.layers)
            retrieval = graph_time_us(lambda i, k=keep: case.retrieve(i, k, successors=True), case.layers)
            log(f"  pool 1/{share}: {keep} blocks kept, re-rank {rerank:.1f} us per step", file=logfile)
            del pools
        else:
            retrieval = graph_time_us(lambda i, b=scan: case.retrieve(i, b, successors=args.successors), case.layers)
        total = decode + rerank + retrieval / args.stride + summary / case.block_tokens
        rows.append(
            {
                "context": case.context,
                "batch": case.batch,
                "block": case.block_tokens,
                "budget": f"1/{share} ({budget} blocks)",
                "sdpa": f"{best_sdpa:.1f} ({best_name})",
                "dense": f"{dense:.1f}",
                "decode": f"{decode:.1f}",
                "retrieval": f"{retrieval:.1f}",
                "amortised": f"{retrieval / args.stride:.1f}",
                "rerank": f"{rerank:.1f}" if args.pool else "-",
                "total": f"{total:.1f}",
                "vs_sdpa": f"{best_sdpa / total:.1f}x",
                "vs_fastest": f"{fastest_dense / total:.1f}x",
            }
        )
        log(
            f"  sparse 1/{share}: decode {decode:.1f} us, retrieval {retrieval:.1f} us, "
            f"total {total:.1f} us, {fastest_dense / total:.1f}x the fastest dense",
            file=logfile,
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="32768,131072", help="context lengths in tokens")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--block-sizes", default="16,64", help="tokens per block; SDPA is measured once per case")
    parser.add_argument("--budgets", default="8,16,32", help="sparse budgets as 1/N of the blocks")
    parser.add_argument("--algorithm", choices=("key_bounds", "block_mean"), default="key_bounds")
    parser.add_argument("--stride", type=int, default=8, help="decode steps between two retrievals of a sequence")
    parser.add_argument(
        "--pool", type=int, default=0, help="retrieval pool as a multiple of the budget, re-ranked every step (0: none)"
    )
    parser.add_argument(
        "--successors", action="store_true", help="half the budget's middle blocks by score, each with its successor"
    )
    parser.add_argument("--sink-tokens", type=int, default=16)
    parser.add_argument("--recent-tokens", type=int, default=64)
    parser.add_argument("--sweep", action="store_true", help="also time decode tuning variants")
    parser.add_argument("--out", type=Path, help="folder for table.md and bench.log")
    args = parser.parse_args()
    if args.successors and args.pool:
        parser.error("--pool already keeps each chosen block's successor: drop --successors")
    if not torch.cuda.is_available() or not tk.available():
        print("needs a CUDA GPU and triton", file=sys.stderr)
        return 2
    import triton

    logfile = None
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        logfile = open(args.out / "bench.log", "w")
    props = torch.cuda.get_device_properties(0)
    header = [
        f"card: {props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB), "
        f"driver {driver_version()}",
        f"torch {torch.__version__}, triton {triton.__version__}, python {sys.version.split()[0]}",
        f"date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"layer: {Q_HEADS} query heads, {KV_HEADS} KV heads of {DIM}, bf16; {args.algorithm} scores; "
        f"sink {args.sink_tokens} tokens, "
        f"recent {args.recent_tokens} tokens; retrieval stride {args.stride}"
        + (f", pool {args.pool}x re-ranked every step" if args.pool else "")
        + (", successors (half the budget's middle blocks by score, each with the next)" if args.successors else ""),
        f"command: {' '.join(sys.argv)}",
    ]
    for line in header:
        log(line, file=logfile)

    contexts = [int(x) for x in args.contexts.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    block_sizes = [int(x) for x in args.block_sizes.split(",")]
    budgets = [int(x) for x in args.budgets.split(",")]
    rows = []
    for context in contexts:
        for batch in batches:
            sdpa = None
            for block_tokens in block_sizes:
                torch.cuda.empty_cache()
                case = Case(context, batch, block_tokens, args.sink_tokens, args.recent_tokens, args.algorithm)
                log(f"case context {context} batch {batch} block {block_tokens}: {case.layers} layers", file=logfile)
                if sdpa is None:
                    sdpa = time_sdpa(case, logfile)
                rows += measure(case, sdpa, budgets, args, args.sweep and block_tokens == block_sizes[0], logfile)
                del case
    columns = [
        ("context", "context"),
        ("batch", "batch"),
        ("block", "block"),
        ("budget", "budget"),
        ("sdpa", "fastest SDPA (us)"),
        ("dense", "Triton dense (us)"),
        ("decode", "sparse decode (us)"),
        ("retrieval", "scores+top-k+table (us)"),
        ("amortised", f"retrieval / {args.stride} (us)"),
        ("rerank", "pool re-rank / step (us)"),
        ("total", "sparse total / step (us)"),
        ("vs_sdpa", "speedup vs SDPA"),
        ("vs_fastest", "speedup vs fastest dense"),
    ]
    table = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        table.append("| " + " | ".join(str(row[key]) for key, _ in columns) + " |")
    log("", file=logfile)
    for line in header:
        log(line, file=logfile)
    log("sparse total = sparse decode + pool re-rank + retrieval / stride + summaries / block_tokens", file=logfile)
    for line in table:
        log(line, file=logfile)
    if args.out:
        (args.out / "table.md").write_text("\n".join(header + [""] + table) + "\n")
        logfile.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
