"""Quality of UCM's sparse decode attention against dense attention, on the LM of ``train_lm.py``.

Every evaluation context is prefilled densely into a paged KV cache (block size ``--block-size``,
blocks placed at shuffled physical slots); then decode steps run one token at a time, and every
layer's attention goes through one algorithm of ``ucm.sparse.kernels.reference``:

- block summaries of the full blocks (``mean_keys`` / ``key_bounds`` / ``key_codes``), kept per
  physical block and refreshed when a decode step fills a block;
- estimated logits (``block_mean_logits`` / ``key_bound_logits`` / ``hash_logits``), scores
  ``attention_share`` over the middle blocks, ``select_blocks`` with sink, recent and budget; one
  selection per layer and sequence, shared by the layer's heads;
- attention over the chosen blocks only: a masked attention over the gathered chosen blocks, which
  ``--check`` compares with ``sparse_tables`` + ``paged_decode`` at every step.

With stride ``s`` the selection is recomputed every ``s`` decode steps; in between a layer reads the
previous choice plus the current recent window.

Metrics: (a) perplexity of the last ``--tail`` bytes of held-out windows of ``--context`` bytes,
every scored byte predicted by a sparse decode step (teacher forcing); (b) passkey retrieval: a
needle ``PASSKEY_<n> = "<8 digits>"`` at a set of depths in a held-out code context ending in
``check_passkey(PASSKEY_<n> = "``; the last ``--lead-in`` prompt bytes are decoded (teacher forced) and the
8 digits generated greedily, all through the sparse attention; exact match. A second passkey set
adds ``--distractors`` other passkeys at random depths.

    PYTHONPATH=packages/ucm-sparse/src python3 benchmarks/sparse_quality/quality.py \\
        --weights benchmarks/sparse_quality/sparse_lm.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import ByteLM, LMConfig, file_meta, load_model  # noqa: E402
from train_lm import DIGITS, heldout_windows, load_corpus, needle, query, random_digits, snap_to_line  # noqa: E402

from ucm.sparse.algorithms.block_mean import BlockMean  # noqa: E402
from ucm.sparse.algorithms.hash_codes import HashCodes  # noqa: E402
from ucm.sparse.algorithms.key_bounds import KeyBounds  # noqa: E402
from ucm.sparse.config import SparseConfig  # noqa: E402
from ucm.sparse.kernels import reference as ref  # noqa: E402

# The classes themselves, not the entry points: the GPU machine has ucm-sparse on PYTHONPATH only.
ALGORITHM_CLASSES = {"block_mean": BlockMean, "key_bounds": KeyBounds, "hash_codes": HashCodes}
ALGORITHMS = tuple(ALGORITHM_CLASSES)

# ---- paged cache -------------------------------------------------------------------------------


class PagedCache:
    """Per layer key and value caches ``[num_blocks, kv_heads, block, D]`` for ``batch`` sequences of
    equal length; each sequence's logical blocks sit at shuffled physical blocks (``tables``)."""

    def __init__(self, cfg: LMConfig, batch: int, max_tokens: int, block: int, dtype, device, seed: int):
        self.block = block
        self.max_blocks = -(-max_tokens // block)
        num = batch * self.max_blocks
        order = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
        self.tables = order.view(batch, self.max_blocks).to(torch.int32).to(device)
        shape = (num, cfg.kv_heads, block, cfg.head_dim)
        # NaN everywhere nothing was written: a read of an unwritten slot poisons the result.
        self.keys = [torch.full(shape, float("nan"), dtype=dtype, device=device) for _ in range(cfg.layers)]
        self.values = [torch.full(shape, float("nan"), dtype=dtype, device=device) for _ in range(cfg.layers)]

    def write_prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor, first: int = 0) -> None:
        """``k, v [B, kv_heads, T, D]`` for positions 0..T-1 of sequences ``first .. first + B - 1``."""
        batch, heads, length, dim = k.shape
        full = length // self.block
        tables = self.tables[first : first + batch].long()
        for cache, x in ((self.keys[layer], k), (self.values[layer], v)):
            if full:
                pages = x[:, :, : full * self.block].reshape(batch, heads, full, self.block, dim).transpose(1, 2)
                cache[tables[:, :full]] = pages.to(cache.dtype)
            if length > full * self.block:
                cache[tables[:, full], :, : length - full * self.block] = x[:, :, full * self.block :].to(cache.dtype)

    def write_token(self, layer: int, position: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """``k, v [B, kv_heads, D]`` at ``position`` of every sequence."""
        physical = self.tables[:, position // self.block].long()
        self.keys[layer][physical, :, position % self.block] = k.to(self.keys[layer].dtype)
        self.values[layer][physical, :, position % self.block] = v.to(self.values[layer].dtype)


# ---- summaries, selection, attention -----------------------------------------------------------


class Summaries:
    """One algorithm's per-physical-block summaries for every layer: the algorithm class's own
    summaries and logits (``ucm.sparse.algorithms``); this script does the choosing and attending."""

    def __init__(self, algorithm: str, cache: PagedCache, cfg: LMConfig, device):
        if algorithm not in ALGORITHM_CLASSES:
            raise ValueError(f"unknown algorithm {algorithm!r}")
        # The budget is this script's (select_blocks below); the class only summarises and scores.
        self.algorithm = ALGORITHM_CLASSES[algorithm](SparseConfig(algorithm=algorithm, budget_ratio=1.0))
        self.cache = cache
        num = cache.keys[0].shape[0]
        spec = self.algorithm.summary_spec(cfg.kv_heads, cache.block, cfg.head_dim)
        self.data = [
            {name: torch.zeros((num, *shape), dtype=dtype, device=device) for name, (shape, dtype) in spec.items()}
            for _ in range(cfg.layers)
        ]

    def update(self, layer: int, blocks: torch.Tensor) -> None:
        """Summarise full physical ``blocks`` of ``layer``."""
        for name, value in self.algorithm.summarize(self.cache.keys[layer], blocks).items():
            self.data[layer][name][blocks] = value.to(self.data[layer][name].dtype)

    def logits(self, layer: int, q: torch.Tensor, tables: torch.Tensor, scale: float) -> torch.Tensor:
        return self.algorithm.logits(q, self.data[layer], tables, scale)


def masked_attention(
    q: torch.Tensor, cache: PagedCache, layer: int, seq_len: int, chosen: torch.Tensor, width: int, scale: float
) -> torch.Tensor:
    """Decode attention over the logical blocks marked in ``chosen [B, max_blocks]`` (bool): the first
    ``width`` of them in order are gathered, tokens past ``seq_len`` masked. Equals ``paged_decode``
    over ``sparse_tables`` of the same blocks. ``[B, q_heads, D]`` in ``q``'s dtype."""
    batch, q_heads, dim = q.shape
    block, max_blocks = cache.block, cache.max_blocks
    position = torch.arange(max_blocks, device=q.device)
    logical = torch.where(chosen, position, max_blocks).sort(dim=1).values[:, :width]  # [B, W]
    in_use = logical < max_blocks
    logical = logical.clamp(max=max_blocks - 1)
    physical = cache.tables.gather(1, logical.to(torch.int32)).long()
    tokens = logical[..., None] * block + torch.arange(block, device=q.device)  # [B, W, T]
    valid = (in_use[..., None] & (tokens < seq_len)).view(batch, 1, 1, width * block)
    keys = cache.keys[layer][physical]  # [B, W, H, T, D]
    kv_heads = keys.shape[2]
    keys = keys.transpose(1, 2).reshape(batch, kv_heads, width * block, dim).float()
    values = cache.values[layer][physical].transpose(1, 2).reshape(batch, kv_heads, width * block, dim).float()
    values = torch.where(valid.view(batch, 1, width * block, 1), values, 0.0)
    grouped = q.float().view(batch, kv_heads, q_heads // kv_heads, dim)
    logits = torch.einsum("bhgd,bhtd->bhgt", grouped, keys) * scale
    weights = torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
    return torch.einsum("bhgt,bhtd->bhgd", weights, values).reshape(batch, q_heads, dim).to(q.dtype)


@dataclass
class Policy:
    name: str  # "dense", "sink+recent" or an algorithm
    budget: int = 0  # blocks, sink and recent included (0: dense)
    stride: int = 1
    sink: int = 1
    recent: int = 2
    pool: int = 0  # stride > 1: keep this many times the budget's middle blocks (and successors), re-rank every step
    successors: bool = False  # about half the budget's middle blocks by score, each with the block after it

    @property
    def label(self) -> str:
        if self.name in ("dense", "sink+recent"):
            return self.name
        return (
            f"{self.name} b{self.budget} s{self.stride}"
            + (f"p{self.pool}" if self.pool else "")
            + ("n" if self.successors else "")
        )


@dataclass
class Decoder:
    """Runs decode steps of one batch under one policy (the ``attend`` callback of ``ByteLM.decode``)."""

    model: ByteLM
    cache: PagedCache
    policy: Policy
    prefill_len: int
    check: bool = False
    max_error: float = 0.0
    steps: int = 0
    position: int = 0
    masks: list = field(default_factory=list)
    pools: list = field(default_factory=list)
    summaries: Summaries | None = None

    def __post_init__(self):
        cfg, device = self.model.cfg, self.cache.tables.device
        batch = self.cache.tables.shape[0]
        shape = (batch, self.cache.max_blocks)
        self.masks = [torch.zeros(shape, dtype=torch.bool, device=device) for _ in range(cfg.layers)]
        self.pools = [None] * cfg.layers
        if self.policy.name != "dense":
            algorithm = "block_mean" if self.policy.name == "sink+recent" else self.policy.name
            self.summaries = Summaries(algorithm, self.cache, cfg, device)
            full = self.prefill_len // self.cache.block
            if full:
                blocks = self.cache.tables[:, :full].reshape(-1).long()
                for layer in range(cfg.layers):
                    self.summaries.update(layer, blocks)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens [B]`` at the next position; the next-token logits ``[B, vocab]``."""
        self.position = self.prefill_len + self.steps
        positions = torch.full_like(tokens, self.position)
        logits = self.model.decode(tokens, positions, self.attend)
        self.steps += 1
        return logits

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache, policy, position = self.cache, self.policy, self.position
        block, max_blocks = cache.block, cache.max_blocks
        cache.write_token(layer, position, k, v)
        seq_len = position + 1
        num_blocks = -(-seq_len // block)
        if self.summaries is not None and seq_len % block == 0:
            self.summaries.update(layer, cache.tables[:, seq_len // block - 1].long())
        batch = q.shape[0]
        blocks = torch.arange(max_blocks, device=q.device)[None, :].expand(batch, -1)
        if policy.name == "dense":
            chosen, width = blocks < num_blocks, max_blocks
        else:
            recent = (blocks >= num_blocks - policy.recent) & (blocks < num_blocks)
            if policy.pool and policy.stride > 1:
                chosen = self.pooled(layer, q, blocks, num_blocks, seq_len)
            elif self.steps % policy.stride == 0:
                seq_lens = torch.full((batch,), seq_len, dtype=torch.int32, device=q.device)
                candidates = (blocks >= policy.sink) & (blocks < num_blocks - policy.recent)
                logits = self.summaries.logits(layer, q, cache.tables, self.model.scale)
                scores = ref.attention_share(logits, candidates)
                scan = self.rule().scan_blocks(num_blocks, block) if policy.successors else policy.budget
                picks, counts = ref.select_blocks(scores, seq_lens, block, policy.sink, policy.recent, scan)
                if policy.successors:  # as BlockRetrieval: never past the budget
                    full = torch.full_like(counts, num_blocks)
                    picks, _ = ref.with_successors(picks, counts, full, torch.full_like(counts, policy.budget))
                chosen = torch.zeros_like(candidates).scatter_(1, picks, True)
            else:
                chosen = self.masks[layer] | recent
            self.masks[layer] = chosen
            width = min(max_blocks, policy.budget + policy.recent)
        out = masked_attention(q, cache, layer, seq_len, chosen, width, self.model.scale)
        if self.check:
            self.max_error = max(self.max_error, self.compare(layer, q, seq_len, chosen, width, out))
        return out

    def rule(self) -> SparseConfig:
        """The library's settings for this policy, in blocks of this cache (its pool and successor rules)."""
        policy, block = self.policy, self.cache.block
        return SparseConfig(
            budget_tokens=policy.budget * block,
            sink_tokens=policy.sink * block,
            recent_tokens=policy.recent * block,
            stride=policy.stride,
            pool=policy.pool,
            successors=policy.successors,
        )

    def pooled(self, layer, q, blocks, num_blocks, seq_len) -> torch.Tensor:
        """Stride with a pool: every ``stride`` steps the best ``pool`` x budget middle blocks and the
        block after each are kept (with the blocks that fill later); every step the budget is chosen
        again among them, as ``BlockRetrieval`` does with ``pool``."""
        policy, cache = self.policy, self.cache
        seq_lens = torch.full((q.shape[0],), seq_len, dtype=torch.int32, device=q.device)
        middle = (blocks >= policy.sink) & (blocks < num_blocks - policy.recent)
        logits = self.summaries.logits(layer, q, cache.tables, self.model.scale)
        if self.steps % policy.stride == 0:
            pool_budget = self.rule().scan_blocks(num_blocks, cache.block)
            picks, counts = ref.select_blocks(
                ref.attention_share(logits, middle), seq_lens, cache.block, policy.sink, policy.recent, pool_budget
            )
            picks, _ = ref.with_successors(picks, counts, torch.full_like(counts, num_blocks))
            self.pools[layer] = (torch.zeros_like(middle).scatter_(1, picks, True), num_blocks)
        pool, pool_blocks = self.pools[layer]
        candidates = middle & (pool | (blocks >= pool_blocks - policy.recent))
        scores = ref.attention_share(logits, candidates)
        picks, _ = ref.select_blocks(scores, seq_lens, cache.block, policy.sink, policy.recent, policy.budget)
        return torch.zeros_like(middle).scatter_(1, picks, True)

    def compare(self, layer, q, seq_len, chosen, width, out) -> float:
        """Largest |masked_attention - paged_decode(sparse_tables(...))| for this step and layer."""
        cache, max_blocks = self.cache, self.cache.max_blocks
        counts = chosen.sum(dim=1)
        if int(counts.max()) > width:
            raise AssertionError(f"{int(counts.max())} blocks chosen, gathered only {width}")
        position = torch.arange(max_blocks, device=q.device)
        order = torch.where(chosen, position, max_blocks).sort(dim=1).values[:, :width]
        last = order.gather(1, (counts - 1).clamp(min=0)[:, None])
        picks = torch.where(order < max_blocks, order, last)
        seq_lens = torch.full((q.shape[0],), seq_len, dtype=torch.int32, device=q.device)
        table, lens = ref.sparse_tables(cache.tables, seq_lens, picks, counts, cache.block)
        expected = ref.paged_decode(q, cache.keys[layer], cache.values[layer], table, lens, self.model.scale)
        error = (out.float() - expected.float()).abs().max()
        if not torch.isfinite(out).all():
            raise AssertionError("non-finite attention output")
        return float(error)


# ---- evaluation sets ---------------------------------------------------------------------------


@dataclass
class EvalSet:
    name: str
    tokens: torch.Tensor  # [B, length]: prefill part + teacher-forced part
    prefill_len: int
    answers: list[str] | None = None  # passkey sets: the digits
    depths: list[float] | None = None
    cache: PagedCache | None = None


def passkey_prompts(
    stream: np.ndarray, rng: np.random.Generator, length: int, depths: list[float], trials: int, distractors: int
) -> tuple[np.ndarray, list[str], list[float]]:
    """Prompts of ``length`` bytes ending in ``check_passkey(PASSKEY_<n> = "``, the needle at ``depth`` of the
    code before the question; ``distractors`` other passkeys at random depths."""
    prompts, answers, where = [], [], []
    for depth in depths:
        for _ in range(trials):
            names = rng.choice(1000, size=1 + distractors, replace=False)
            keys = [(int(n), random_digits(rng)) for n in names]
            needles = [needle(n, d) for n, d in keys]
            question = query(keys[0][0])
            code_len = length - len(question) - sum(map(len, needles))
            start = int(rng.integers(0, len(stream) - code_len))
            body = stream[start : start + code_len].copy()
            body[-1] = ord("\n")
            at = [snap_to_line(body, int(depth * code_len), code_len - 1)]
            at += [snap_to_line(body, int(rng.uniform(0, 1) * code_len), code_len - 1) for _ in range(distractors)]
            pieces, last = [], 0
            for i in sorted(range(len(at)), key=lambda i: at[i]):
                pieces += [body[last : at[i]], np.frombuffer(needles[i], dtype=np.uint8)]
                last = at[i]
            pieces += [body[last:], np.frombuffer(question, dtype=np.uint8)]
            prompt = np.concatenate(pieces)
            assert len(prompt) == length
            prompts.append(prompt)
            answers.append(keys[0][1])
            where.append(depth)
    return np.stack(prompts), answers, where


def prefill(model: ByteLM, evalset: EvalSet, block: int, chunk: int, seed: int) -> None:
    cfg, device = model.cfg, evalset.tokens.device
    batch = evalset.tokens.shape[0]
    dtype = next(model.parameters()).dtype
    max_tokens = evalset.tokens.shape[1] + DIGITS  # passkey answers are generated past the prompt
    evalset.cache = PagedCache(cfg, batch, max_tokens, block, dtype, device, seed)
    with torch.no_grad():
        for start in range(0, batch, chunk):
            part = evalset.tokens[start : start + chunk, : evalset.prefill_len]
            _, kv = model(part, return_kv=True)
            for layer, (k, v) in enumerate(kv):
                evalset.cache.write_prefill(layer, k, v, first=start)


@torch.no_grad()
def run_set(model: ByteLM, evalset: EvalSet, policy: Policy, check: bool) -> dict:
    decoder = Decoder(model, evalset.cache, policy, evalset.prefill_len, check=check)
    tokens = evalset.tokens
    feed = tokens.shape[1] - evalset.prefill_len
    if evalset.answers is None:  # perplexity: every fed token predicts the next
        nll = torch.zeros(tokens.shape[0], device=tokens.device)
        for i in range(feed - 1):
            logits = decoder.step(tokens[:, evalset.prefill_len + i])
            target = tokens[:, evalset.prefill_len + i + 1]
            nll += F.cross_entropy(logits.float(), target, reduction="none")
        mean = float(nll.sum()) / (tokens.shape[0] * (feed - 1))
        return {"nll": mean, "ppl": math.exp(mean), "max_error": decoder.max_error}
    for i in range(feed):
        logits = decoder.step(tokens[:, evalset.prefill_len + i])
    generated = []
    for i in range(DIGITS):
        nxt = logits.float().argmax(dim=-1)
        generated.append(nxt)
        if i + 1 < DIGITS:
            logits = decoder.step(nxt)
    out = torch.stack(generated, dim=1).cpu().numpy().astype(np.uint8)
    hits = [bytes(row).decode("latin1") == answer for row, answer in zip(out, evalset.answers, strict=True)]
    by_depth = {}
    for depth, hit in zip(evalset.depths, hits, strict=True):
        by_depth.setdefault(f"{depth:.2f}", []).append(hit)
    return {
        "acc": 100.0 * sum(hits) / len(hits),
        "by_depth": {d: 100.0 * sum(h) / len(h) for d, h in by_depth.items()},
        "max_error": decoder.max_error,
    }


# ---- main --------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="weights file from train_lm.py (omit with --random-model)")
    p.add_argument("--random-model", action="store_true", help="a tiny random model (for checking the code)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--context", type=int, default=8192, help="tokens per evaluation context")
    p.add_argument("--tail", type=int, default=256, help="scored tokens at the end of each perplexity window")
    p.add_argument("--windows", type=int, default=16, help="held-out perplexity windows")
    p.add_argument("--budgets", default="4,8,16,32,64", help="budgets as 1/x of --context")
    p.add_argument("--strides", default="1,8")
    p.add_argument("--pools", default="0", help="strides > 1: pool sizes as multiples of the budget (0: no pool)")
    p.add_argument(
        "--successors", action="store_true", help="also: about half the budget by score, each block with the next"
    )
    p.add_argument("--algorithms", default=",".join(ALGORITHMS))
    p.add_argument("--sink", type=int, default=1, help="sink blocks")
    p.add_argument("--recent", type=int, default=2, help="recent blocks (the partial last block included)")
    p.add_argument("--depths", type=int, default=10, help="needle depths (evenly spaced)")
    p.add_argument("--trials", type=int, default=8, help="passkey trials per depth (0: perplexity only)")
    p.add_argument("--distractors", type=int, default=2, help="other passkeys in the second passkey set (0: none)")
    p.add_argument("--lead-in", type=int, default=32, help="prompt tokens decoded before the answer")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--chunk", type=int, default=16, help="sequences per prefill forward")
    p.add_argument("--check", action="store_true", help="compare every attention with sparse_tables + paged_decode")
    p.add_argument("--time-limit", type=float, default=0, help="seconds; skip the remaining configurations after it")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--stdlib", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def policies(args) -> list[Policy]:
    out = [Policy("dense"), Policy("sink+recent", args.sink + args.recent, 1, args.sink, args.recent)]
    # Largest budgets first: a time limit drops the smallest ones.
    for fraction in map(int, args.budgets.split(",")):
        budget = max(args.sink + args.recent + 1, args.context // fraction // args.block_size)
        for stride in map(int, args.strides.split(",")):
            variants = [(pool, False) for pool in map(int, args.pools.split(",")) if stride > 1 or pool == 0]
            if args.successors:
                variants.append((0, True))
            for pool, successors in variants:
                for algorithm in args.algorithms.split(","):
                    policy = Policy(algorithm, budget, stride, args.sink, args.recent, pool, successors)
                    if policy not in out:  # small contexts: two fractions can round to one budget
                        out.append(policy)
    return out


def fmt_delta(value: float | None, base: float | None, kind: str) -> str:
    if value is None or base is None:
        return "-"
    if kind == "pct":
        return f"{100.0 * (value / base - 1):+.2f}%"
    return f"{value - base:+.1f}"


def main(argv=None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.random_model:
        cfg = LMConfig(dim=64, layers=2, q_heads=4, kv_heads=2, head_dim=16, hidden=128)
        model = ByteLM(cfg)
        model.init_weights(torch.Generator().manual_seed(0))
        model = model.to(device=device, dtype=dtype).eval()
        meta = {}
    else:
        model = load_model(args.weights, device, dtype)
        meta = file_meta(args.weights)
    cfg = model.cfg
    card = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"model {cfg} on {card} ({dtype}), trained: {meta}")

    corpus = load_corpus(args.stdlib)
    stream = corpus["heldout"]
    windows = heldout_windows(stream, args.windows, args.context)
    evalsets = [
        EvalSet("ppl", torch.from_numpy(windows.astype(np.int64)).to(device), args.context - args.tail - 1),
    ]
    rng = np.random.default_rng(args.seed)
    depths = [(i + 0.5) / args.depths for i in range(args.depths)]
    prompt_len = args.context - DIGITS
    for distractors in sorted({0, args.distractors}) if args.trials and args.depths else ():
        prompts, answers, where = passkey_prompts(stream, rng, prompt_len, depths, args.trials, distractors)
        evalsets.append(
            EvalSet(
                "passkey" if distractors == 0 else f"passkey+{distractors}",
                torch.from_numpy(prompts.astype(np.int64)).to(device),
                prompt_len - args.lead_in,
                answers,
                where,
            )
        )
    with torch.no_grad():  # dense check: one forward over the whole perplexity windows
        nll = 0.0
        for row in evalsets[0].tokens:
            logits = model(row[None, :-1])[:, -args.tail :].float()
            nll += float(F.cross_entropy(logits[0], row[-args.tail :], reduction="sum"))
        forward_ppl = math.exp(nll / (len(evalsets[0].tokens) * args.tail))
    for i, evalset in enumerate(evalsets):
        prefill(model, evalset, args.block_size, args.chunk, seed=args.seed + i)
    if cuda:
        torch.cuda.synchronize()
    print(
        f"{len(windows)} perplexity windows, {len(depths) * args.trials} passkey prompts per set, "
        f"prefilled in {time.perf_counter() - t0:.1f} s; dense one-forward perplexity {forward_ppl:.4f}"
    )

    results = []
    for policy in policies(args):
        if args.time_limit and time.perf_counter() - t0 > args.time_limit:
            print(f"time limit: skipped {policy.label}")
            continue
        t1 = time.perf_counter()
        row = {
            "policy": policy.name,
            "budget": policy.budget,
            "stride": policy.stride,
            "pool": policy.pool,
            "successors": policy.successors,
        }
        for evalset in evalsets:
            row[evalset.name] = run_set(model, evalset, policy, args.check)
        row["seconds"] = time.perf_counter() - t1
        results.append(row)
        errors = max(row[s.name]["max_error"] for s in evalsets)
        accs = " ".join(f"{s.name} {row[s.name]['acc']:.1f}" for s in evalsets[1:])
        check = f" check max|err| {errors:.2e}" if args.check else ""
        print(f"{policy.label}: ppl {row['ppl']['ppl']:.4f} {accs} ({row['seconds']:.1f} s){check}", flush=True)

    dense = results[0]
    passkey_sets = [s.name for s in evalsets[1:]]
    head = "| algorithm | budget (blocks / tokens / context) | stride | perplexity | vs dense |"
    rule = "| --- | --- | --- | --- | --- |"
    for name in passkey_sets:
        head += f" {name} acc % | vs dense (pts) |"
        rule += " --- | --- |"
    lines = [head, rule]
    fixed = [r for r in results if r["policy"] in ("dense", "sink+recent")]
    algorithms = args.algorithms.split(",")
    ranked = sorted(
        (r for r in results if r["policy"] not in ("dense", "sink+recent")),
        key=lambda r: (r["stride"], r["pool"], r["successors"], algorithms.index(r["policy"]), -r["budget"]),
    )
    for row in fixed + ranked:
        if row["policy"] == "dense":
            budget = "all"
        else:
            tokens = row["budget"] * args.block_size
            budget = f"{row['budget']} / {tokens} / 1/{args.context // tokens}"
        stride = "-" if row["policy"] in ("dense", "sink+recent") else str(row["stride"])
        if row.get("pool"):
            stride += f", pool {row['pool']}x"  # re-ranked every step within the pool
        if row.get("successors"):
            stride += ", successors"
        line = f"| {row['policy']} | {budget} | {stride} | {row['ppl']['ppl']:.4f} | "
        line += f"{fmt_delta(row['ppl']['ppl'], dense['ppl']['ppl'], 'pct')} |"
        for name in passkey_sets:
            line += f" {row[name]['acc']:.1f} | {fmt_delta(row[name]['acc'], dense[name]['acc'], 'pts')} |"
        lines.append(line)
    print()
    print(
        f"block {args.block_size}, sink {args.sink}, recent {args.recent}, context {args.context}, "
        f"perplexity over the last {args.tail} tokens of {len(windows)} windows, "
        f"{len(depths) * args.trials} passkey trials per set, lead-in {args.lead_in}"
    )
    print("\n".join(lines))

    print("\nrecommended budget (smallest measured budget at which it and every larger measured budget stay")
    print("within 1 point of dense passkey accuracy in every set and within 2% of dense perplexity):")
    recommendations = {}
    variants = sorted(
        {(r["stride"], r["pool"], r["successors"]) for r in results if r["policy"] not in ("dense", "sink+recent")}
    )
    for stride, pool, successors in variants:
        for algorithm in args.algorithms.split(","):
            rows = sorted(
                (
                    r
                    for r in results
                    if r["policy"] == algorithm
                    and (r["stride"], r["pool"], r["successors"]) == (stride, pool, successors)
                ),
                key=lambda r: -r["budget"],
            )
            best = None
            for r in rows:
                ok = r["ppl"]["ppl"] <= dense["ppl"]["ppl"] * 1.02 and all(
                    r[name]["acc"] >= dense[name]["acc"] - 1.0 for name in passkey_sets
                )
                if not ok:
                    break
                best = r
            if best is None:
                text = "none of the measured budgets" if rows else "not measured"
            else:
                tokens = best["budget"] * args.block_size
                text = f"{best['budget']} blocks ({tokens} tokens, 1/{args.context // tokens} of the context)"
            label = f"s{stride}" + (f"p{pool}" if pool else "") + ("n" if successors else "")
            recommendations[f"{algorithm} {label}"] = text
            extra = (f", pool {pool}x" if pool else "") + (", successors" if successors else "")
            print(f"- {algorithm}, stride {stride}{extra}: {text}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "card": card,
                    "model": meta,
                    "forward_ppl": forward_ppl,
                    "results": results,
                    "recommendations": recommendations,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
