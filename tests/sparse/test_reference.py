"""The torch reference kernels: selection windows and budgets, exact sparse decode, retrieval of a planted needle."""

from __future__ import annotations

import math

import pytest
import torch

from ucm.sparse.kernels import reference as ref

BLOCK = 16
KV_HEADS, Q_HEADS, DIM = 2, 8, 32
SCALE = 1 / math.sqrt(DIM)


def paged(num_blocks: int = 96, seed: int = 0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(num_blocks, KV_HEADS, BLOCK, DIM, generator=generator).to(dtype)
    values = torch.randn(num_blocks, KV_HEADS, BLOCK, DIM, generator=generator).to(dtype)
    return keys, values


def tables_for(lengths: list[int], num_blocks: int = 96, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random distinct physical blocks per sequence (the engine's pages are not in order)."""
    generator = torch.Generator().manual_seed(seed)
    width = max((n + BLOCK - 1) // BLOCK for n in lengths)
    order = torch.randperm(num_blocks, generator=generator)
    rows, start = [], 0
    for _ in lengths:
        rows.append(order[start : start + width])
        start += width
    return torch.stack(rows).int(), torch.tensor(lengths, dtype=torch.int32)


def masked_attention(query, keys, values, tables, lengths, keep) -> torch.Tensor:
    """Dense attention over each sequence's tokens, restricted to the logical blocks in ``keep[b]``."""
    out = []
    for b, length in enumerate(lengths.tolist()):
        used = (length + BLOCK - 1) // BLOCK
        k = keys[tables[b, :used].long()].permute(1, 0, 2, 3).reshape(KV_HEADS, -1, DIM)[:, :length]
        v = values[tables[b, :used].long()].permute(1, 0, 2, 3).reshape(KV_HEADS, -1, DIM)[:, :length]
        mask = torch.zeros(length, dtype=torch.bool)
        for block in keep[b]:
            mask[block * BLOCK : (block + 1) * BLOCK] = True
        q = query[b].view(KV_HEADS, Q_HEADS // KV_HEADS, DIM)
        logits = torch.einsum("hgd,htd->hgt", q, k) * SCALE
        weights = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
        out.append(torch.einsum("hgt,htd->hgd", weights, v).reshape(Q_HEADS, DIM))
    return torch.stack(out)


def test_selection_keeps_sink_and_recent_and_takes_the_best_middle_blocks():
    lengths = torch.tensor([10 * BLOCK + 3, 4 * BLOCK], dtype=torch.int32)
    scores = torch.zeros(2, 11)
    scores[0, 5], scores[0, 2], scores[0, 8] = 3.0, 2.0, 1.0  # middle blocks, best first
    scores[0, 0] = scores[0, 10] = -100.0  # sink and recent are kept whatever they score
    chosen, counts = ref.select_blocks(scores, lengths, BLOCK, sink_blocks=1, recent_blocks=2, budget_blocks=5)
    assert counts.tolist() == [5, 4]
    assert chosen[0].tolist() == [0, 2, 5, 9, 10]
    # A sequence within the budget keeps every block (padding repeats its last block).
    assert chosen[1, :4].tolist() == [0, 1, 2, 3]


def test_selection_takes_one_budget_per_sequence():
    lengths = torch.tensor([12 * BLOCK, 12 * BLOCK], dtype=torch.int32)
    scores = torch.arange(12, dtype=torch.float32).repeat(2, 1)
    chosen, counts = ref.select_blocks(scores, lengths, BLOCK, 1, 1, torch.tensor([3, 6]))
    assert counts.tolist() == [3, 6]
    assert chosen[0, :3].tolist() == [0, 10, 11]
    assert chosen[1].tolist() == [0, 7, 8, 9, 10, 11]


def test_full_budget_is_dense_attention():
    keys, values = paged()
    lengths = [13 * BLOCK + 5, 40, 7 * BLOCK]
    tables, lens = tables_for(lengths)
    query = torch.randn(3, Q_HEADS, DIM)
    dense = ref.paged_decode(query, keys, values, tables, lens, SCALE)
    scores = torch.randn(3, tables.shape[1])
    chosen, counts = ref.select_blocks(scores, lens, BLOCK, 1, 1, tables.shape[1])
    sparse_tables, sparse_lens = ref.sparse_tables(tables, lens, chosen, counts, BLOCK)
    assert torch.equal(sparse_lens, lens)
    torch.testing.assert_close(ref.paged_decode(query, keys, values, sparse_tables, sparse_lens, SCALE), dense)
    everything = [list(range((n + BLOCK - 1) // BLOCK)) for n in lengths]
    torch.testing.assert_close(dense, masked_attention(query, keys, values, tables, lens, everything))


def test_sparse_decode_is_exact_attention_over_the_chosen_blocks_and_reads_nothing_else():
    keys, values = paged()
    lengths = [20 * BLOCK + 7, 9 * BLOCK + 1]
    tables, lens = tables_for(lengths)
    query = torch.randn(2, Q_HEADS, DIM)
    scores = torch.randn(2, tables.shape[1])
    chosen, counts = ref.select_blocks(scores, lens, BLOCK, 2, 2, 6)
    sparse_tables, sparse_lens = ref.sparse_tables(tables, lens, chosen, counts, BLOCK)
    keep = [chosen[b, : counts[b]].tolist() for b in range(2)]
    expected = masked_attention(query, keys, values, tables, lens, keep)
    # Every block not chosen holds NaN: reading any of them would spread NaN into the output.
    poisoned_keys, poisoned_values = keys.clone(), values.clone()
    for b in range(2):
        used = (lengths[b] + BLOCK - 1) // BLOCK
        for logical in set(range(used)) - set(keep[b]):
            poisoned_keys[tables[b, logical]] = float("nan")
            poisoned_values[tables[b, logical]] = float("nan")
    out = ref.paged_decode(query, poisoned_keys, poisoned_values, sparse_tables, sparse_lens, SCALE)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected)
    # The last (partial) block stays last, so the new length counts only its real tokens.
    assert sparse_lens.tolist() == [5 * BLOCK + 7, 5 * BLOCK + 1]


def test_share_scores_ignore_non_candidates_and_sum_to_the_head_count():
    logits = torch.randn(2, KV_HEADS, Q_HEADS // KV_HEADS, 10)
    candidates = torch.ones(2, 10, dtype=torch.bool)
    candidates[:, :2] = False
    scores = ref.attention_share(logits, candidates)
    assert torch.isinf(scores[:, :2]).all() and (scores[:, :2] < 0).all()
    torch.testing.assert_close(scores[:, 2:].sum(dim=1), torch.full((2,), float(Q_HEADS)))


def needle_setup(seed: int):
    """A sequence whose middle block ``needle`` holds one key pointing where the query points."""
    keys, values = paged(seed=seed)
    lengths = [30 * BLOCK + 4]
    tables, lens = tables_for(lengths, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(1, Q_HEADS, DIM, generator=generator)
    needle = 7 + seed % 15
    direction = query[0].view(KV_HEADS, Q_HEADS // KV_HEADS, DIM).mean(dim=1)  # per KV head
    keys[tables[0, needle], :, 3] = direction / direction.norm(dim=-1, keepdim=True) * 12.0
    return keys, values, tables, lens, query, needle


@pytest.mark.parametrize("algorithm", ["block_mean", "key_bounds", "hash_codes"])
def test_each_algorithm_finds_a_planted_needle(algorithm):
    found = 0
    for seed in range(8):
        keys, values, tables, lens, query, needle = needle_setup(seed)
        blocks = torch.arange(keys.shape[0])
        if algorithm == "block_mean":
            logits = ref.block_mean_logits(query, ref.mean_keys(keys, blocks), tables, SCALE)
        elif algorithm == "key_bounds":
            logits = ref.key_bound_logits(query, ref.key_bounds(keys, blocks), tables, SCALE)
        else:
            planes = ref.hash_planes(KV_HEADS, DIM, 128, seed=0)
            codes, norms = ref.key_codes(keys, blocks, planes)
            logits = ref.hash_logits(query, codes, norms, planes, tables, SCALE)
        width = tables.shape[1]
        position = torch.arange(width)[None, :]
        candidates = (position >= 1) & (position < 31 - 2)
        scores = ref.attention_share(logits, candidates)
        chosen, counts = ref.select_blocks(scores, lens, BLOCK, 1, 2, 6)
        found += needle in chosen[0, : counts[0]].tolist()
    # Random keys around it score by chance; the needle's block must win nearly always.
    assert found >= 7, f"{algorithm} found the needle block in {found} of 8 sequences"


def test_hash_codes_count_differing_signs():
    planes = ref.hash_planes(1, 4, 8, seed=3)
    vectors = torch.randn(5, 1, 4)
    codes = ref.hash_codes(vectors, planes)
    signs = torch.einsum("nhd,hdb->nhb", vectors, planes) > 0
    expected = (signs[:, None] != signs[None, :]).sum(dim=-1)  # [n, n, heads]
    assert torch.equal(ref.hamming(codes[:, None], codes[None, :]).long(), expected.long())
    with pytest.raises(ValueError, match="multiple of 8"):
        ref.hash_planes(1, 4, 12)


def test_successors_join_each_chosen_block_within_its_sequence():
    chosen = torch.tensor([[0, 3, 4, 9, 9], [0, 1, 5, 5, 5]])
    counts = torch.tensor([4, 3])
    num_blocks = torch.tensor([10, 6])
    order, new_counts = ref.with_successors(chosen, counts, num_blocks)
    assert new_counts.tolist() == [6, 4]
    assert order[0].tolist() == [0, 1, 3, 4, 5, 9]  # 9 is the last block: nothing after it
    assert order[1].tolist() == [0, 1, 2, 5, 5, 5]  # padded with the last block


def test_successors_within_a_limit_or_not_at_all():
    chosen = torch.tensor([[0, 3, 9, 9], [0, 4, 5, 5]])
    counts = torch.tensor([3, 3])
    num_blocks = torch.tensor([10, 6])
    # Row 0 would read 5 blocks (0, 1, 3, 4, 9), more than its limit of 4: its plain choice.
    order, new_counts = ref.with_successors(chosen, counts, num_blocks, torch.tensor([4, 5]))
    assert new_counts.tolist() == [3, 4]
    assert order[0, :3].tolist() == [0, 3, 9] and order[1].tolist() == [0, 1, 4, 5]
