"""ucm-sparse's Triton kernels against the torch reference, on random paged caches.

Each case draws fresh random data; tables point past each sequence's blocks at a NaN-filled block
and the unwritten tail of each last block is NaN, so a kernel that reads anything it should not
returns NaN. Errors are relative (‖out - ref‖ / ‖ref‖); bf16/fp16 outputs are compared after the
reference's own rounding to that dtype.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from ucm.sparse.kernels import reference  # noqa: E402
from ucm.sparse.kernels import triton_kernels as tk  # noqa: E402

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


class Paged:
    """A random paged cache, its block tables (sequences on shuffled physical blocks) and lengths."""

    def __init__(self, lens, q_heads, kv_heads, dim, block_tokens, dtype, layout="flash", seed=0):
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        self.block_tokens = block_tokens
        self.lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
        self.num_blocks = [(n + block_tokens - 1) // block_tokens for n in lens]
        width = max(self.num_blocks) + 2
        total = sum(self.num_blocks) + 1  # the last physical block is the poison block
        shape = (total, kv_heads, block_tokens, dim)
        if layout == "flash":  # [2, blocks, tokens, heads, dim], viewed as [blocks, heads, tokens, dim]
            cache = torch.randn((2, total, block_tokens, kv_heads, dim), generator=gen, device=DEVICE, dtype=dtype)
            self.key, self.value = cache[0].permute(0, 2, 1, 3), cache[1].permute(0, 2, 1, 3)
        elif layout == "padded":  # head_dim rows padded to 2 dim: non-contiguous, unusual strides
            cache = torch.randn((2, *shape[:-1], 2 * dim), generator=gen, device=DEVICE, dtype=dtype)
            self.key, self.value = cache[0][..., :dim], cache[1][..., :dim]
        else:
            self.key = torch.randn(shape, generator=gen, device=DEVICE, dtype=dtype)
            self.value = torch.randn(shape, generator=gen, device=DEVICE, dtype=dtype)
        self.poison_block = total - 1
        order = torch.randperm(total - 1, generator=gen, device=DEVICE).to(torch.int32)
        self.tables = torch.full((len(lens), width), self.poison_block, dtype=torch.int32, device=DEVICE)
        start = 0
        for row, count in enumerate(self.num_blocks):
            self.tables[row, :count] = order[start : start + count]
            start += count
        self.key[self.poison_block] = float("nan")
        self.value[self.poison_block] = float("nan")
        for row, (length, count) in enumerate(zip(lens, self.num_blocks, strict=True)):
            if count and length % block_tokens:  # the unwritten tail of the block being written
                last = int(self.tables[row, count - 1])
                self.key[last, :, length % block_tokens :] = float("nan")
                self.value[last, :, length % block_tokens :] = float("nan")
        self.query = torch.randn((len(lens), q_heads, dim), generator=gen, device=DEVICE, dtype=dtype)
        self.scale = 1.0 / math.sqrt(dim)

    def full_blocks(self) -> torch.Tensor:
        """Every physical block that is full (its summary is defined)."""
        rows = []
        for row, length in enumerate(self.lens.tolist()):
            rows.append(self.tables[row, : length // self.block_tokens])
        return torch.cat(rows).long()

    def means(self) -> torch.Tensor:
        """Summaries of the full blocks (others left random: they are never candidates)."""
        table = torch.randn(self.key.shape[0], self.key.shape[1], self.key.shape[3], device=DEVICE)
        blocks = self.full_blocks()
        table[blocks] = reference.mean_keys(self.key, blocks)
        return table

    def bounds(self, dtype=torch.float32) -> torch.Tensor:
        """key_bounds summaries of the full blocks (others random), in ``dtype``."""
        table = torch.randn(self.key.shape[0], 2, self.key.shape[1], self.key.shape[3], device=DEVICE)
        blocks = self.full_blocks()
        table[blocks] = reference.key_bounds(self.key, blocks)
        return table.to(dtype)

    def candidates(self, sink: int, recent: int) -> torch.Tensor:
        width = self.tables.shape[1]
        count = (self.lens.long() + self.block_tokens - 1) // self.block_tokens
        position = torch.arange(width, device=DEVICE)[None, :]
        return (position >= sink) & (position < count[:, None] - recent)

    def safe_tables(self) -> torch.Tensor:
        """The tables with every entry a real block (the reference's scoring reads all entries)."""
        return torch.where(self.tables == self.poison_block, torch.zeros_like(self.tables), self.tables)


DECODE_CASES = [
    # block_tokens, head_dim, dtype, (q_heads, kv_heads), layout
    (16, 128, torch.bfloat16, (32, 8), "flash"),
    (16, 64, torch.float16, (8, 8), "heads"),
    (32, 128, torch.float16, (16, 2), "padded"),
    (32, 64, torch.bfloat16, (12, 4), "flash"),
    (64, 128, torch.bfloat16, (8, 1), "heads"),
    (64, 64, torch.float16, (32, 8), "flash"),
    (128, 128, torch.float16, (32, 4), "flash"),
    (128, 64, torch.bfloat16, (4, 2), "padded"),
]


def ragged_lens(block_tokens: int) -> list[int]:
    return [1, block_tokens - 1, block_tokens, 3 * block_tokens + 5, 1000, 2500]


@pytest.mark.parametrize("block_tokens, dim, dtype, heads, layout", DECODE_CASES)
def test_paged_decode_matches_reference(block_tokens, dim, dtype, heads, layout):
    paged = Paged(ragged_lens(block_tokens), *heads, dim, block_tokens, dtype, layout, seed=block_tokens + dim)
    ref = reference.paged_decode(paged.query, paged.key, paged.value, paged.tables, paged.lens, paged.scale)
    out = torch.full_like(paged.query, float("nan"))
    tk.paged_decode(paged.query, paged.key, paged.value, paged.tables, paged.lens, paged.scale, out=out)
    assert torch.isfinite(out).all()
    assert relative_error(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("splits", [1, 2, 7, 64])
def test_paged_decode_any_split_count(splits):
    paged = Paged([37, 700, 2048, 4000], 16, 4, 128, 16, torch.bfloat16, seed=splits)
    ref = reference.paged_decode(paged.query, paged.key, paged.value, paged.tables, paged.lens, paged.scale)
    out = tk.paged_decode(paged.query, paged.key, paged.value, paged.tables, paged.lens, paged.scale, num_splits=splits)
    assert torch.isfinite(out).all()
    assert relative_error(out, ref) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("block_tokens, dtype", [(16, torch.bfloat16), (64, torch.float16)])
def test_mean_keys_matches_reference(block_tokens, dtype):
    paged = Paged([3000, 1500], 8, 4, 128, block_tokens, dtype, seed=3)
    blocks = paged.full_blocks()
    ref = reference.mean_keys(paged.key, blocks)
    out = tk.mean_keys(paged.key, blocks)
    assert relative_error(out, ref) < 1e-5
    table = torch.full((paged.key.shape[0], 4, 128), float("nan"), device=DEVICE)
    tk.mean_keys(paged.key, blocks, table, indexed=True)
    assert relative_error(table[blocks], ref) < 1e-5


@pytest.mark.parametrize("block_tokens, dtype", [(16, torch.bfloat16), (64, torch.float16)])
def test_key_bounds_match_reference_exactly(block_tokens, dtype):
    paged = Paged([3000, 1500], 8, 4, 128, block_tokens, dtype, seed=4)
    blocks = paged.full_blocks()
    ref = reference.key_bounds(paged.key, blocks)
    assert torch.equal(tk.key_bounds(paged.key, blocks), ref)
    # In the cache's dtype too: a bound is one of the keys' own values.
    table = torch.full((paged.key.shape[0], 2, 4, 128), float("nan"), device=DEVICE, dtype=dtype)
    tk.key_bounds(paged.key, blocks, table, indexed=True)
    assert torch.equal(table[blocks].float(), ref)


@pytest.mark.parametrize(
    "block_tokens, heads, dim, sink, recent",
    [(16, (32, 8), 128, 1, 1), (16, (8, 8), 64, 0, 2), (32, (16, 2), 128, 2, 3), (128, (4, 1), 64, 1, 1)],
)
@pytest.mark.parametrize("summary_dtype", [torch.float32, torch.bfloat16])
def test_key_bound_scores_match_reference(block_tokens, heads, dim, sink, recent, summary_dtype):
    lens = [1, 2 * block_tokens, 5 * block_tokens - 3, 40 * block_tokens + 1, 300 * block_tokens]
    paged = Paged(lens, *heads, dim, block_tokens, torch.bfloat16, seed=dim + sink + 1)
    bounds = paged.bounds(summary_dtype)
    candidates = paged.candidates(sink, recent)
    logits = reference.key_bound_logits(paged.query, bounds.float(), paged.safe_tables(), paged.scale)
    ref = reference.attention_share(logits, candidates)
    out = tk.key_bound_scores(paged.query, bounds, paged.tables, paged.lens, block_tokens, sink, recent, paged.scale)
    assert torch.equal(torch.isfinite(out), candidates)
    assert relative_error(out[candidates], ref[candidates]) < 1e-4


@pytest.mark.parametrize(
    "block_tokens, heads, dim, sink, recent",
    [(16, (32, 8), 128, 1, 1), (16, (8, 8), 64, 0, 2), (32, (16, 2), 128, 2, 3), (128, (4, 1), 64, 1, 1)],
)
def test_block_mean_scores_match_reference(block_tokens, heads, dim, sink, recent):
    lens = [1, 2 * block_tokens, 5 * block_tokens - 3, 40 * block_tokens + 1, 300 * block_tokens]
    paged = Paged(lens, *heads, dim, block_tokens, torch.bfloat16, seed=dim + sink)
    means = paged.means()
    candidates = paged.candidates(sink, recent)
    logits = reference.block_mean_logits(paged.query, means, paged.safe_tables(), paged.scale)
    ref = reference.attention_share(logits, candidates)
    out = tk.block_mean_scores(paged.query, means, paged.tables, paged.lens, block_tokens, sink, recent, paged.scale)
    assert torch.equal(torch.isfinite(out), candidates)
    assert relative_error(out[candidates], ref[candidates]) < 1e-4


def check_selection(scores, tables, lens, block_tokens, sink, recent, budget):
    chosen, counts = reference.select_blocks(scores, lens, block_tokens, sink, recent, budget)
    ref_table, ref_lens = reference.sparse_tables(tables, lens, chosen, counts, block_tokens)
    table, sparse_lens = tk.select_and_build(scores, tables, lens, block_tokens, sink, recent, budget)
    assert table.dtype == tables.dtype and sparse_lens.dtype == lens.dtype
    assert torch.equal(sparse_lens, ref_lens)
    assert torch.equal(table, ref_table)


def distinct_scores(rows: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """Scores with no ties (so the reference's choice is unique), negative ones among them."""
    ranks = torch.stack([torch.randperm(width, generator=gen, device=DEVICE) for _ in range(rows)])
    return (ranks.float() - width / 3) * 0.37


@pytest.mark.parametrize("block_tokens, sink, recent", [(16, 1, 1), (16, 0, 3), (64, 2, 2), (128, 1, 4)])
@pytest.mark.parametrize("share", [1 / 4, 1 / 16, 2.0])
@pytest.mark.parametrize("width", [3000, 20000])
def test_select_and_build_matches_reference(block_tokens, sink, recent, share, width):
    gen = torch.Generator(device=DEVICE).manual_seed(block_tokens + sink + recent + width)
    lens = torch.randint(1, width * block_tokens, (7,), generator=gen, device=DEVICE, dtype=torch.int32)
    lens[0], lens[1], lens[2] = 1, (sink + recent) * block_tokens, width * block_tokens  # short, windows only, full
    tables = torch.randint(0, 1 << 20, (7, width), generator=gen, device=DEVICE, dtype=torch.int32)
    scores = distinct_scores(7, width, gen)
    budget = max(sink + recent, int(width * share))
    check_selection(scores, tables, lens, block_tokens, sink, recent, budget)


@pytest.mark.parametrize("width", [3000, 20000])
@pytest.mark.parametrize("digit_bits", [1, 4, 8])
def test_select_and_build_with_successors_and_any_digit(width, digit_bits):
    gen = torch.Generator(device=DEVICE).manual_seed(width + digit_bits)
    lens = torch.randint(1, width * 16, (5,), generator=gen, device=DEVICE, dtype=torch.int32)
    lens[0], lens[1] = 3 * 16, width * 16
    tables = torch.randint(0, 1 << 20, (5, width), generator=gen, device=DEVICE, dtype=torch.int32)
    scores = distinct_scores(5, width, gen)
    budget = width // 16
    # Without successors, any digit width chooses what the reference chooses.
    plain = tk.select_and_build(scores, tables, lens, 16, 1, 2, budget, digit_bits=digit_bits)
    chosen, counts = reference.select_blocks(scores, lens, 16, 1, 2, budget)
    assert torch.equal(plain[0], reference.sparse_tables(tables, lens, chosen, counts, 16)[0])
    # With them, each chosen block's next block joins it.
    num_blocks = (lens.long() + 15) // 16
    chosen, counts = reference.with_successors(chosen, counts, num_blocks)
    ref_table, ref_lens = reference.sparse_tables(tables, lens, chosen, counts, 16)
    table, sparse_lens = tk.select_and_build(
        scores, tables, lens, 16, 1, 2, budget, successors=True, digit_bits=digit_bits
    )
    assert torch.equal(sparse_lens, ref_lens)
    for row, used in enumerate(((ref_lens.long() + 15) // 16).tolist()):
        assert torch.equal(table[row, :used], ref_table[row, :used])
    assert int(ref_lens[1]) > budget * 16  # successors joined the full row's choice


def test_select_and_build_per_sequence_budgets():
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    width, block_tokens, sink, recent = 3000, 16, 1, 2
    lens = torch.randint(1, width * block_tokens, (5,), generator=gen, device=DEVICE, dtype=torch.int32)
    lens[0], lens[4] = 40, width * block_tokens
    tables = torch.randint(0, 1 << 20, (5, width), generator=gen, device=DEVICE, dtype=torch.int32)
    scores = distinct_scores(5, width, gen)
    budgets = torch.tensor([3, 10, 200, 2999, 5000], device=DEVICE)
    chosen, counts = reference.select_blocks(scores, lens, block_tokens, sink, recent, budgets)
    ref_table, ref_lens = reference.sparse_tables(tables, lens, chosen, counts, block_tokens)
    for max_budget in (None, 5000):
        table, sparse_lens = tk.select_and_build(
            scores, tables, lens, block_tokens, sink, recent, budgets, max_budget=max_budget
        )
        assert torch.equal(sparse_lens, ref_lens)
        assert torch.equal(table, ref_table)


def test_select_and_build_ties_take_lowest_positions():
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    width, block_tokens, sink, recent, budget = 5000, 16, 1, 2, 700
    lens = torch.tensor([width * block_tokens, 3000 * block_tokens - 5], dtype=torch.int32, device=DEVICE)
    tables = torch.randint(0, 1 << 20, (2, width), generator=gen, device=DEVICE, dtype=torch.int32)
    scores = torch.randint(0, 5, (2, width), generator=gen, device=DEVICE).float()  # many ties at the cut
    scores[scores == 0] = -0.0  # equal to 0.0
    table, sparse_lens = tk.select_and_build(scores, tables, lens, block_tokens, sink, recent, budget)
    # The reference on scores nudged so that, of equal scores, the lower position ranks first.
    nudged = scores - torch.arange(width, device=DEVICE) * 1e-5
    chosen, counts = reference.select_blocks(nudged, lens, block_tokens, sink, recent, budget)
    ref_table, ref_lens = reference.sparse_tables(tables, lens, chosen, counts, block_tokens)
    assert torch.equal(sparse_lens, ref_lens)
    assert torch.equal(table, ref_table)


def test_select_and_build_ranked_scores_and_nan():
    paged = Paged([16 * 500, 16 * 37 + 3, 16 * 3], 8, 2, 64, 16, torch.float16, seed=5)
    means = paged.means()
    scores = tk.block_mean_scores(paged.query, means, paged.tables, paged.lens, 16, 1, 2, paged.scale)
    check_selection(scores, paged.tables, paged.lens, 16, 1, 2, 40)
    # One NaN among the middle scores ranks last among them (as the reference ranks it).
    scores[0, 10] = float("nan")
    check_selection(scores, paged.tables, paged.lens, 16, 1, 2, 40)


@pytest.mark.parametrize("block_tokens, budget_share", [(16, 1 / 16), (16, 1 / 8), (64, 1 / 4)])
def test_sparse_decode_reads_only_chosen_blocks(block_tokens, budget_share):
    lens = [8000, 5000 + 7, 12000 - 1, 300, 2 * block_tokens]
    paged = Paged(lens, 32, 8, 128, block_tokens, torch.bfloat16, seed=11)
    sink, recent = 1, 2
    means = paged.means()
    scores = tk.block_mean_scores(paged.query, means, paged.tables, paged.lens, block_tokens, sink, recent, paged.scale)
    budget = max(sink + recent, math.ceil(max(paged.num_blocks) * budget_share))
    table, sparse_lens = tk.select_and_build(scores, paged.tables, paged.lens, block_tokens, sink, recent, budget)
    ref = reference.paged_decode(paged.query, paged.key, paged.value, table, sparse_lens, paged.scale)
    # Poison every block the sparse tables do not read.
    keep = torch.zeros(paged.key.shape[0], dtype=torch.bool, device=DEVICE)
    for row in range(len(lens)):
        used = (int(sparse_lens[row]) + block_tokens - 1) // block_tokens
        keep[table[row, :used].long()] = True
    assert int(keep.sum()) < sum(paged.num_blocks)  # the sparse tables really skip blocks
    paged.key[~keep] = float("nan")
    paged.value[~keep] = float("nan")
    out = tk.paged_decode(paged.query, paged.key, paged.value, table, sparse_lens, paged.scale)
    assert torch.isfinite(out).all()
    assert relative_error(out, ref) < TOLERANCE[torch.bfloat16]
    again = reference.paged_decode(paged.query, paged.key, paged.value, table, sparse_lens, paged.scale)
    assert torch.equal(again, ref)


def test_retrieval_and_decode_run_in_one_cuda_graph():
    """The whole sparse step captures into a CUDA graph: no host syncs anywhere."""
    block_tokens, sink, recent, budget = 16, 1, 2, 32
    paged = Paged([16 * 400, 16 * 250 + 9], 32, 8, 128, block_tokens, torch.bfloat16, seed=21)
    means = paged.means()
    query = paged.query.clone()

    def step():
        scores = tk.block_mean_scores(query, means, paged.tables, paged.lens, block_tokens, sink, recent, paged.scale)
        table, lens = tk.select_and_build(scores, paged.tables, paged.lens, block_tokens, sink, recent, budget)
        return tk.paged_decode(query, paged.key, paged.value, table, lens, paged.scale), table, lens

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, table, lens = step()
    for seed in range(3):
        query.copy_(torch.randn(query.shape, generator=torch.Generator(device=DEVICE).manual_seed(seed), device=DEVICE))
        graph.replay()
        torch.cuda.synchronize()
        logits = reference.block_mean_logits(query, means, paged.safe_tables(), paged.scale)
        scores = reference.attention_share(logits, paged.candidates(sink, recent))
        chosen, counts = reference.select_blocks(scores, paged.lens, block_tokens, sink, recent, budget)
        ref_table, ref_lens = reference.sparse_tables(paged.tables, paged.lens, chosen, counts, block_tokens)
        assert torch.equal(table, ref_table) and torch.equal(lens, ref_lens)
        ref = reference.paged_decode(query, paged.key, paged.value, ref_table, ref_lens, paged.scale)
        assert relative_error(out, ref) < TOLERANCE[torch.bfloat16]


def test_bad_inputs_name_what_is_wrong():
    paged = Paged([100, 200], 8, 2, 64, 16, torch.bfloat16)
    args = (paged.query, paged.key, paged.value, paged.tables, paged.lens, paged.scale)
    with pytest.raises(ValueError, match="block_tables must be int32 or int64"):
        tk.paged_decode(*args[:3], paged.tables.float(), *args[4:])
    with pytest.raises(ValueError, match="q_heads"):
        tk.paged_decode(paged.query[:, :7], *args[1:])
    with pytest.raises(ValueError, match="share a dtype"):
        tk.paged_decode(paged.query.half(), *args[1:])
    with pytest.raises(ValueError, match="seq_lens"):
        tk.paged_decode(*args[:4], paged.lens[:1], paged.scale)
    with pytest.raises(ValueError, match="on cpu"):
        tk.paged_decode(*args[:3], paged.tables.cpu(), *args[4:])
    with pytest.raises(ValueError, match="budget_blocks"):
        tk.select_and_build(torch.rand(2, 13, device=DEVICE), paged.tables, paged.lens, 16, 2, 2, 3)
    with pytest.raises(ValueError, match="means"):
        tk.block_mean_scores(paged.query, torch.rand(10, 2, 32, device=DEVICE), paged.tables, paged.lens, 16, 1, 1, 0.1)
    with pytest.raises(ValueError, match=r"bounds must be \[num_blocks, 2, kv_heads, head_dim\]"):
        tk.key_bound_scores(paged.query, torch.rand(10, 2, 64, device=DEVICE), paged.tables, paged.lens, 16, 1, 1, 0.1)
    with pytest.raises(ValueError, match="needs the summary table as out"):
        tk.key_bounds(paged.key, torch.arange(3, device=DEVICE), indexed=True)
