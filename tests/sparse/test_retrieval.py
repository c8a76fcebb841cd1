"""``BlockRetrieval`` and the plug-in contract: budgets, windows, stride, summaries kept per block, and settings."""

from __future__ import annotations

import math

import pytest
import torch

import ucm.sparse
from ucm.sparse import SparseConfig
from ucm.sparse.kernels import reference as ref

BLOCK = 16
KV_HEADS, Q_HEADS, DIM = 2, 4, 16
NUM_BLOCKS = 64
LAYER = "model.layers.0.self_attn.attn"


def algorithm(name: str = "block_mean", **settings):
    sparse = ucm.sparse.create({"algorithm": name, **settings})
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(NUM_BLOCKS, KV_HEADS, BLOCK, DIM, generator=generator)
    values = torch.randn(NUM_BLOCKS, KV_HEADS, BLOCK, DIM, generator=generator)
    sparse.register_kv_caches({LAYER: (keys, values)}, BLOCK)
    return sparse, keys, values


def decode_row(length: int, first_block: int = 0):
    blocks = (length + BLOCK - 1) // BLOCK
    table = torch.arange(first_block, first_block + blocks, dtype=torch.int32)[None, :]
    return table, torch.tensor([length], dtype=torch.int32)


def step(sparse, table, lens, seed: int = 0):
    query = torch.randn(table.shape[0], Q_HEADS, DIM, generator=torch.Generator().manual_seed(seed))
    return sparse.attention_begin(LAYER, query, table, lens, 1 / math.sqrt(DIM))


@pytest.mark.parametrize("name", ["block_mean", "key_bounds", "hash_codes"])
def test_the_installed_algorithms_are_found_by_name(name):
    assert name in ucm.sparse.load_algorithm(name).__module__
    assert {"block_mean", "key_bounds", "hash_codes"} <= set(
        __import__("ucm.store.plugins", fromlist=["x"]).available_plugins("ucm.sparse")
    )


def test_a_sequence_within_the_budget_reads_everything():
    sparse, _, _ = algorithm(budget_ratio=1.0)
    assert step(sparse, *decode_row(40 * BLOCK + 3)) is None
    sparse, _, _ = algorithm(budget_tokens=20 * BLOCK)
    assert step(sparse, *decode_row(20 * BLOCK)) is None


@pytest.mark.parametrize("name", ["block_mean", "key_bounds", "hash_codes"])
def test_a_long_sequence_reads_its_windows_and_the_budget(name):
    sparse, keys, values = algorithm(name, budget_tokens=8 * BLOCK, sink_tokens=2 * BLOCK, recent_tokens=BLOCK + 1)
    table, lens = decode_row(40 * BLOCK + 5, first_block=10)
    tables, new_lens = step(sparse, table, lens)
    chosen = tables[0, :8].tolist()
    assert chosen[:2] == [10, 11]  # sink
    assert chosen[-2:] == [49, 50]  # recent: the last full block and the one being written (41 blocks from 10)
    assert chosen == sorted(chosen) and len(set(chosen)) == 8
    assert new_lens.tolist() == [7 * BLOCK + 5]
    # What the engine then reads equals attention over exactly those blocks.
    query = torch.randn(1, Q_HEADS, DIM)
    sparse_out = ref.paged_decode(query, keys, values, tables, new_lens, 0.25)
    gathered = ref.paged_decode(query, keys, values, tables[:, :8], new_lens, 0.25)
    torch.testing.assert_close(sparse_out, gathered)


def test_a_ratio_budget_scales_with_the_sequence():
    sparse, _, _ = algorithm(budget_ratio=0.25)
    tables, lens = step(sparse, *decode_row(40 * BLOCK))
    assert lens.tolist() == [10 * BLOCK]
    tables, lens = step(sparse, *decode_row(20 * BLOCK, first_block=40))
    assert lens.tolist() == [5 * BLOCK]


def test_choices_are_reused_for_the_stride_and_made_again_after_it():
    sparse, _, _ = algorithm(budget_tokens=6 * BLOCK, stride=3)
    table, lens = decode_row(30 * BLOCK + 1)
    for i in range(7):
        step(sparse, table, lens + i, seed=i)
    # Steps 0, 3 and 6 select; the others reuse (the block being written did not change).
    assert sparse.take_stats().retrievals == 3


def test_a_new_block_being_written_selects_again():
    sparse, _, _ = algorithm(budget_tokens=6 * BLOCK, stride=100)
    table, lens = decode_row(30 * BLOCK - 1)
    step(sparse, table, lens)
    step(sparse, table, lens + 1)  # fills the block: still the same block being written
    next_table, next_lens = decode_row(30 * BLOCK + 1)
    step(sparse, next_table, next_lens)
    assert sparse.take_stats().retrievals == 2


def test_summaries_are_made_once_per_block_and_again_after_it_is_written():
    sparse, keys, _ = algorithm(budget_tokens=6 * BLOCK, stride=1)
    table, lens = decode_row(30 * BLOCK + 1)
    step(sparse, table, lens)
    made = sparse.take_stats().summaries
    assert made == 31 - 2  # the middle blocks: all 31 but the sink and the one being written
    step(sparse, table, lens)
    assert sparse.take_stats().summaries == 0
    # The engine frees block 5 and writes a needle into it: its summary is made again, and it wins.
    keys[5] = 0.0
    keys[5, :, 0] = 50.0
    sparse.blocks_written(LAYER, torch.tensor([5]))
    query = torch.zeros(1, Q_HEADS, DIM)
    query[..., 0] = 1.0
    tables, _ = sparse.attention_begin(LAYER, query, table, lens, 1.0)
    assert sparse.take_stats().summaries == 1
    assert 5 in tables[0, :6].tolist()


def test_shared_prefix_blocks_are_summarised_once_for_every_sequence():
    sparse, _, _ = algorithm(budget_tokens=6 * BLOCK, stride=1)
    prefix = torch.arange(0, 20, dtype=torch.int32)
    tables = torch.stack([torch.cat([prefix, torch.tensor([30, 31])]), torch.cat([prefix, torch.tensor([40, 41])])])
    lens = torch.tensor([22 * BLOCK, 22 * BLOCK], dtype=torch.int32)
    step(sparse, tables.int(), lens)
    assert sparse.take_stats().summaries == 19 + 2  # the prefix's middle blocks once, then each one's own


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"algorithm": "block_mean", "budget": 0.5}, "unknown setting.*'budget'"),
        ({"algorithm": "block_mean", "budget_ratio": 1.5}, "budget_ratio"),
        ({"algorithm": "block_mean", "budget_ratio": 0.5, "budget_tokens": 64}, "exactly one"),
        ({"algorithm": "block_mean", "budget_tokens": 0}, "budget_tokens"),
        ({"algorithm": "block_mean", "budget_ratio": 0.5, "stride": 0}, "stride"),
        ({"algorithm": "block_mean", "budget_ratio": 0.5, "stride": 4, "pool": 1}, "'pool'.*at least 2"),
        ({"algorithm": "block_mean", "budget_ratio": 0.5, "stride": 4, "pool": -2}, "'pool'"),
        ({"algorithm": "block_mean", "budget_ratio": 0.5, "pool": 4}, "'pool'.*needs 'stride' > 1"),
        ({"algorithm": "block_mean", "budget_ratio": 0.5, "successors": "yes"}, "'successors' must be true or false"),
        ({"algorithm": "block_mean", "stride": 4, "pool": 2, "successors": True}, "drop 'successors'"),
        ({"algorithm": "block_mean", "budget_ratio": 0.5, "options": {"bits": 64}}, "no option.*'bits'"),
        ({"algorithm": "hash_codes", "budget_ratio": 0.5, "options": {"bits": 12}}, "multiple of 8"),
        ({"algorithm": "quest", "budget_ratio": 0.5}, "no 'ucm.sparse' plug-in named 'quest'.*block_mean"),
    ],
)
def test_bad_settings_are_refused_with_a_message_naming_them(settings, message):
    with pytest.raises(ValueError, match=message):
        ucm.sparse.create(settings)


def test_the_default_budget_is_an_eighth():
    config = SparseConfig.from_dict({"algorithm": "key_bounds"})
    assert config.budget_ratio == 1 / 8
    assert config.budget_blocks(64, BLOCK) == 8
    assert config.budget_blocks(4, BLOCK) == 2  # never below the sink and recent windows


@pytest.mark.parametrize("name", ["block_mean", "key_bounds", "hash_codes"])
@pytest.mark.parametrize("budget", [{"budget_ratio": 0.125}, {"budget_tokens": 100, "sink_tokens": 40}])
def test_choosing_every_step_for_the_whole_batch_matches_choosing_per_sequence(name, budget):
    # Stride 1 takes a batched path of its own; a first choice at any stride is the same choice.
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(400, KV_HEADS, BLOCK, DIM, generator=generator)
    every_step = ucm.sparse.create({"algorithm": name, "stride": 1, **budget})
    per_sequence = ucm.sparse.create({"algorithm": name, "stride": 2, **budget})
    for sparse in (every_step, per_sequence):
        sparse.register_kv_caches({LAYER: (keys, keys)}, BLOCK)
    lens = torch.tensor([700, 33, 1000, 200, 16 * 40], dtype=torch.int32)
    # Distinct blocks per sequence, as the engine gives running sequences.
    tables = torch.randperm(400, generator=generator)[: 5 * 63].view(5, 63).int()
    query = torch.randn(5, Q_HEADS, DIM, generator=generator)
    got = every_step.attention_begin(LAYER, query, tables, lens, 0.25)
    want = per_sequence.attention_begin(LAYER, query, tables, lens, 0.25)
    assert torch.equal(got[1], want[1])
    assert got[1].tolist() != lens.tolist()  # some sequences did read a subset
    for row in range(5):
        used = (int(got[1][row]) + BLOCK - 1) // BLOCK
        assert torch.equal(got[0][row, :used], want[0][row, :used])


def test_a_kept_choice_never_follows_a_freed_block_to_another_sequence():
    sparse, _, _ = algorithm("key_bounds", budget_tokens=4 * BLOCK, stride=8)
    first = torch.arange(0, 20, dtype=torch.int32)[None, :]  # ends in block 19, being written
    chosen, _ = step(sparse, first, torch.tensor([20 * BLOCK - 3], dtype=torch.int32))
    first_choice = set(chosen[0, :4].tolist())
    # That request finishes; block 19 goes to a new sequence as its block being written.
    other = torch.tensor([[40, 41, 42, 43, 44, 45, 46, 47, 19]], dtype=torch.int32)
    tables, lens = step(sparse, other, torch.tensor([9 * BLOCK - 3], dtype=torch.int32))
    read = set(tables[0, : (int(lens[0]) + BLOCK - 1) // BLOCK].tolist())
    assert read <= set(other[0].tolist()), f"read another request's blocks {sorted(read - set(other[0].tolist()))}"
    assert read != first_choice
    assert sparse.take_stats().retrievals == 2


@pytest.mark.parametrize("name", ["key_bounds", "hash_codes"])
def test_a_pool_is_scanned_once_per_stride_and_re_ranked_with_every_query(name):
    sparse, _, _ = algorithm(name, budget_tokens=6 * BLOCK, stride=4, pool=3)
    kept, _, _ = algorithm(name, budget_tokens=6 * BLOCK, stride=4)  # no pool: reads its first choice
    # The pool is what a selection with the pool's size picks (2 windows + 3 x 4 middle blocks) and
    # the block after each (here logical and physical blocks are the same numbers).
    scan, _, _ = algorithm(name, budget_tokens=14 * BLOCK, stride=4)
    table, lens = decode_row(40 * BLOCK + 1)
    scanned, _ = step(scan, table, lens, seed=10)  # the query of the step that scans
    picked = set(scanned[0, :14].tolist())
    pool = torch.tensor([sorted(picked | {b + 1 for b in picked if b + 1 < 41})], dtype=torch.int32)
    assert 14 < pool.shape[1] <= 28
    tail = int(lens[0]) - 40 * BLOCK
    every, _, _ = algorithm(name, budget_tokens=6 * BLOCK, stride=1)
    read_sets, kept_sets = [], []
    for i in range(4):
        tables, new_lens = step(sparse, table, lens + i, seed=10 + i)
        read = tables[0, :6]
        assert int(new_lens[0]) == 5 * BLOCK + tail + i
        assert set(read.tolist()) <= set(pool[0].tolist())
        # The same choice as choosing every step over a sequence made of the pool's blocks.
        pool_len = (pool.shape[1] - 1) * BLOCK + tail + i
        want, _ = step(every, pool, torch.tensor([pool_len], dtype=torch.int32), seed=10 + i)
        assert read.tolist() == want[0, :6].tolist()
        read_sets.append(frozenset(read.tolist()))
        kept_tables, _ = step(kept, table, lens + i, seed=10 + i)
        kept_sets.append(frozenset(kept_tables[0, :6].tolist()))
    stats = sparse.take_stats()
    assert (stats.retrievals, stats.reranked) == (1, 4)
    assert len(set(kept_sets)) == 1  # without a pool the first choice is read for the whole stride
    assert len(set(read_sets)) > 1  # with one, later queries read other blocks of the pool


def test_a_pool_as_large_as_the_sequence_chooses_as_stride_one_does():
    pooled, _, _ = algorithm("key_bounds", budget_tokens=4 * BLOCK, stride=8, pool=100)
    every, _, _ = algorithm("key_bounds", budget_tokens=4 * BLOCK, stride=1)
    table, lens = decode_row(24 * BLOCK + 7)
    for i in range(5):
        got, got_lens = step(pooled, table, lens + i, seed=i)
        want, want_lens = step(every, table, lens + i, seed=i)
        assert torch.equal(got_lens, want_lens)
        assert got[0, :4].tolist() == want[0, :4].tolist()


@pytest.mark.parametrize("stride", [1, 4])
@pytest.mark.parametrize("name", ["key_bounds", "hash_codes"])
def test_successors_spend_half_the_budget_on_the_blocks_after_the_best_ones(name, stride):
    # Budget 12 blocks, sink 1, recent 2: a scan picks the windows and (12 - 3 - 1) // 2 = 4 middle
    # blocks by score, then reads the block after each chosen block (the sink's too): at most 12.
    sparse, _, _ = algorithm(name, budget_tokens=12 * BLOCK, recent_tokens=2 * BLOCK, stride=stride, successors=True)
    scan, _, _ = algorithm(name, budget_tokens=7 * BLOCK, recent_tokens=2 * BLOCK, stride=stride)
    table, lens = decode_row(40 * BLOCK + 3)
    picked, _ = step(scan, table, lens, seed=3)
    picked = set(picked[0, :7].tolist())
    want = sorted(picked | {b + 1 for b in picked if b + 1 < 41})
    for i in range(stride):  # the same blocks for the whole stride
        tables, new_lens = step(sparse, table, lens + i, seed=3 + 100 * i)
        count = len(want)
        assert tables[0, :count].tolist() == want
        assert int(new_lens[0]) == (count - 1) * BLOCK + 3 + i
        assert 8 < count <= 12
    stats = sparse.take_stats()
    assert stats.retrievals == 1 and stats.blocks_read <= 12 * stride


def test_successors_never_read_more_than_the_budget():
    # A budget of exactly the two windows has no room for the sink's successor: the windows alone.
    sparse, _, _ = algorithm("key_bounds", budget_tokens=3 * BLOCK, recent_tokens=2 * BLOCK, successors=True)
    tables, lens = step(sparse, *decode_row(30 * BLOCK + 1))
    assert tables[0, :3].tolist() == [0, 29, 30] and lens.tolist() == [2 * BLOCK + 1]
    for budget in range(4, 12):
        sparse, _, _ = algorithm("hash_codes", budget_tokens=budget * BLOCK, successors=True, stride=2)
        for i in range(2):
            _, lens = step(sparse, *decode_row(30 * BLOCK + 1 + i), seed=budget)
            assert (int(lens[0]) - 1 - i) // BLOCK + 1 <= budget
