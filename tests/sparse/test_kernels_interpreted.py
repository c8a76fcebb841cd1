"""The Triton kernels, run by Triton's interpreter on the CPU, choose what the library chooses.

The GPU path of a retrieval is two kernels: the algorithm's scores (``block_mean_scores`` or
``key_bound_scores``, from summaries made by ``mean_keys`` or ``key_bounds``) and
``select_and_build``. With a
pool (stride > 1) they run twice: once over the whole table with the pool's size (and each kept
block's successor), then over the pool's table with the budget. This checks both against
``BlockRetrieval`` (the torch reference path that vLLM's CPU backend uses), block for block. The
interpreter is switched on in a child process so that it never leaks into other tests' engines.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

CHECK = textwrap.dedent(
    """
    import math
    import torch
    import ucm.sparse
    from ucm.sparse.kernels import reference as ref
    from ucm.sparse.kernels import triton_kernels as tk

    BT, KV_HEADS, Q_HEADS, DIM = 16, 2, 4, 16
    gen = torch.Generator().manual_seed(0)
    lens = torch.tensor([40 * BT + 3, 25 * BT + 9, 7 * BT], dtype=torch.int32)
    counts = [(int(n) + BT - 1) // BT for n in lens]
    total = sum(counts) + 4
    keys = torch.randn(total, KV_HEADS, BT, DIM, generator=gen)
    order = torch.randperm(total, generator=gen)[: sum(counts)].int()
    tables = torch.zeros(len(counts), max(counts) + 2, dtype=torch.int32)
    start = 0
    for row, count in enumerate(counts):
        tables[row, :count] = order[start : start + count]
        start += count
    query = torch.randn(len(counts), Q_HEADS, DIM, generator=gen)
    scale = 1 / math.sqrt(DIM)
    sink, recent, budget = 1, 1, 6
    every = torch.arange(total)
    # key_bounds' summaries in the cache's dtype are exact: each is one of the keys' own values.
    half = keys.bfloat16()
    in_bf16 = torch.empty(total, 2, KV_HEADS, DIM, dtype=torch.bfloat16)
    assert torch.equal(tk.key_bounds(half, every, in_bf16), ref.key_bounds(half, every).bfloat16())
    SUMMARY = {"block_mean": tk.mean_keys(keys, every), "key_bounds": tk.key_bounds(keys, every)}
    SCORES = {"block_mean": tk.block_mean_scores, "key_bounds": tk.key_bound_scores}

    def library(stride, pool, successors=False):
        settings = {"budget_tokens": budget * BT, "stride": stride, "pool": pool, "successors": successors}
        sparse = ucm.sparse.create({"algorithm": ALGORITHM, **settings})
        sparse.register_kv_caches({"layer": (keys, keys)}, BT)
        return sparse.attention_begin("layer", query, tables, lens, scale)

    def same(got, want, what):
        got_table, got_lens = got
        want_table, want_lens = want
        assert got_lens.tolist() == want_lens.tolist(), (what, got_lens.tolist(), want_lens.tolist())
        for row, length in enumerate(want_lens.tolist()):
            used = (length + BT - 1) // BT
            assert got_table[row, :used].tolist() == want_table[row, :used].tolist(), (what, row)

    for ALGORITHM in ("block_mean", "key_bounds"):
        summary, score = SUMMARY[ALGORITHM], SCORES[ALGORITHM]
        # One retrieval: the whole table, the budget.
        scores = score(query, summary, tables, lens, BT, sink, recent, scale)
        chosen = tk.select_and_build(scores, tables, lens, BT, sink, recent, budget)
        same(chosen, library(1, 0), f"{ALGORITHM}, stride 1")
        assert chosen[1].tolist()[:2] != lens.tolist()[:2]  # the long sequences did read a subset

        # A pool of 3: keep sink + recent + 3 x 4 middle blocks and the block after each, then
        # choose the budget within them.
        pool_table, pool_lens = tk.select_and_build(
            scores, tables, lens, BT, sink, recent, 2 + 3 * (budget - 2), successors=True
        )
        assert int(pool_lens[0]) > (2 + 3 * (budget - 2)) * BT  # successors joined the long sequence's pool
        pool_scores = score(query, summary, pool_table, pool_lens, BT, sink, recent, scale)
        reranked = tk.select_and_build(pool_scores, pool_table, pool_lens, BT, sink, recent, budget)
        same(reranked, library(4, 3), f"{ALGORITHM}, stride 4, pool 3")

        # Successors within the budget: the scan keeps the windows and (6 - 2 - 1) // 2 middle
        # blocks, then each chosen block's successor joins it.
        scan = ucm.sparse.SparseConfig(budget_tokens=budget * BT, successors=True).scan_blocks(40, BT)
        assert scan == 3
        paired = tk.select_and_build(scores, tables, lens, BT, sink, recent, scan, successors=True)
        same(paired, library(1, 0, True), f"{ALGORITHM}, stride 1, successors")
        same(paired, library(4, 0, True), f"{ALGORITHM}, stride 4, successors")

    # The kernel's successors are the reference's successors of the kernel's own choice, on random
    # scores with many ties (which tied block a selection takes is the kernel's to decide).
    budgets = torch.tensor([9, 5, 4], dtype=torch.int64)
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        random_scores = torch.randint(0, 6, tables.shape, generator=g).float()
        plain_table, plain_lens = tk.select_and_build(random_scores, tables, lens, BT, sink, recent, budgets)
        logical = torch.zeros_like(plain_table, dtype=torch.int64)
        picked = (plain_lens.long() - lens.long() + torch.tensor(counts) * BT + BT - 1) // BT
        for row, count in enumerate(counts):
            where = {int(b): i for i, b in enumerate(tables[row, :count])}
            logical[row] = torch.tensor([where[int(b)] for b in plain_table[row]])
        picks, picked = ref.with_successors(logical, picked, torch.tensor(counts))
        want = ref.sparse_tables(tables, lens, picks, picked, BT)
        got = tk.select_and_build(random_scores, tables, lens, BT, sink, recent, budgets, successors=True)
        same(got, want, f"successors, seed {seed}")

    # A budget of just the windows chooses no middle block; a tie-heavy row at 1- and 8-bit digits.
    for bits in (1, 8):
        for want_budget in (2, 5):
            picks, picked = ref.select_blocks(random_scores, lens, BT, sink, recent, want_budget)
            want = ref.sparse_tables(tables, lens, picks, picked, BT)
            got = tk.select_and_build(random_scores, tables, lens, BT, sink, recent, want_budget, digit_bits=bits)
            assert got[1].tolist() == want[1].tolist(), (bits, want_budget)
            if want_budget == 2:
                same(got, want, f"windows only, {bits}-bit digits")

    # Rows wider than one chunk of the select kernel (read chunk by chunk), distinct scores.
    wide = 9000
    g = torch.Generator().manual_seed(7)
    wide_lens = torch.tensor([wide * BT, 5000 * BT + 1], dtype=torch.int32)
    wide_tables = torch.stack([torch.randperm(2 * wide, generator=g)[:wide] for _ in range(2)]).int()
    wide_scores = torch.randperm(2 * wide, generator=g).float().view(2, wide)
    picks, picked = ref.select_blocks(wide_scores, wide_lens, BT, sink, recent, 700)
    want = ref.sparse_tables(wide_tables, wide_lens, picks, picked, BT)
    same(tk.select_and_build(wide_scores, wide_tables, wide_lens, BT, sink, recent, 700), want, "wide rows")
    print("ok")
    """
)


def test_the_kernels_choose_the_blocks_the_library_chooses_with_and_without_a_pool_or_successors():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr
