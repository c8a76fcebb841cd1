"""The Triton kernels, run by Triton's interpreter on the CPU, choose what the library chooses.

The GPU path of a retrieval is two kernels: ``block_mean_scores`` and ``select_and_build``. With a
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
    means = tk.mean_keys(keys, torch.arange(total))
    sink, recent, budget = 1, 1, 6

    def library(stride, pool):
        sparse = ucm.sparse.create(
            {"algorithm": "block_mean", "budget_tokens": budget * BT, "stride": stride, "pool": pool}
        )
        sparse.register_kv_caches({"layer": (keys, keys)}, BT)
        return sparse.attention_begin("layer", query, tables, lens, scale)

    def same(got, want, what):
        got_table, got_lens = got
        want_table, want_lens = want
        assert got_lens.tolist() == want_lens.tolist(), (what, got_lens.tolist(), want_lens.tolist())
        for row, length in enumerate(want_lens.tolist()):
            used = (length + BT - 1) // BT
            assert got_table[row, :used].tolist() == want_table[row, :used].tolist(), (what, row)

    # One retrieval: the whole table, the budget.
    scores = tk.block_mean_scores(query, means, tables, lens, BT, sink, recent, scale)
    chosen = tk.select_and_build(scores, tables, lens, BT, sink, recent, budget)
    same(chosen, library(1, 0), "stride 1")
    assert chosen[1].tolist()[:2] != lens.tolist()[:2]  # the long sequences did read a subset

    # A pool of 3: keep sink + recent + 3 x 4 middle blocks and the block after each, then choose
    # the budget within them.
    pool_table, pool_lens = tk.select_and_build(
        scores, tables, lens, BT, sink, recent, 2 + 3 * (budget - 2), successors=True
    )
    assert int(pool_lens[0]) > (2 + 3 * (budget - 2)) * BT  # successors joined the long sequence's pool
    pool_scores = tk.block_mean_scores(query, means, pool_table, pool_lens, BT, sink, recent, scale)
    reranked = tk.select_and_build(pool_scores, pool_table, pool_lens, BT, sink, recent, budget)
    same(reranked, library(4, 3), "stride 4, pool 3")

    # The kernel's successors are the reference's successors of the kernel's own choice, on random
    # scores with many ties (which tied block a selection takes is the kernel's to decide).
    from ucm.sparse.kernels import reference as ref
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
    print("ok")
    """
)


def test_the_kernels_choose_the_blocks_the_library_chooses_with_and_without_a_pool():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr
