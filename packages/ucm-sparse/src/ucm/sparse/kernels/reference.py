"""Torch reference of every sparse-attention kernel: the definition the fast kernels are tested against.

Shapes used throughout (one attention layer):

- ``query``: ``[batch, q_heads, head_dim]``, one decode token per sequence.
- ``key_cache`` / ``value_cache``: ``[num_blocks, kv_heads, block_tokens, head_dim]`` views of the
  engine's paged cache, with any strides (vLLM's CPU and FlashAttention layouts both view this way).
- ``block_tables``: ``int32 [batch, max_blocks]``, the physical block of each logical block; entries
  past a sequence's length are ignored (any value).
- ``seq_lens``: ``int32 [batch]``, tokens in each sequence's cache, the decode token's own included.

Query heads are grouped onto KV heads (GQA): query head ``h`` reads KV head ``h // (q_heads // kv_heads)``.

Block summaries live per *physical* block (``[num_blocks, ...]``), so a block shared by several
sequences (a common prefix) is summarised once, and a summary stays valid until its block is written.

Block scores estimate the share of a decode step's attention each block would receive: per query
head, a softmax over the candidate blocks of an estimated logit, summed over heads. The estimated
logit is the algorithm's own (block-mean key, key-bound maximum, or hash-code similarity).
"""

from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


# ---- summaries (per physical block) ----------------------------------------------------------


def mean_keys(key_cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Block-mean keys ``[len(blocks), kv_heads, head_dim]`` (float32) of full blocks ``blocks``."""
    return key_cache[blocks].float().mean(dim=2)


def key_bounds(key_cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Per-channel key minimum and maximum ``[len(blocks), 2, kv_heads, head_dim]`` (float32)."""
    keys = key_cache[blocks].float()
    return torch.stack((keys.amin(dim=2), keys.amax(dim=2)), dim=1)


def hash_planes(kv_heads: int, head_dim: int, bits: int, seed: int = 0, device=None) -> torch.Tensor:
    """Random hyperplanes ``[kv_heads, head_dim, bits]`` (float32) for sign hashing (the same seed, the same planes)."""
    if bits % 8:
        raise ValueError(f"hash bits must be a multiple of 8, got {bits}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(kv_heads, head_dim, bits, generator=generator).to(device)


def _pack_bits(signs: torch.Tensor) -> torch.Tensor:
    """``[..., bits]`` bools -> ``[..., bits // 8]`` uint8, bit ``i`` of byte ``j`` = sign ``8 j + i``."""
    weights = (1 << torch.arange(8, device=signs.device, dtype=torch.int32)).view(*([1] * (signs.dim() - 1)), 1, 8)
    grouped = signs.view(*signs.shape[:-1], signs.shape[-1] // 8, 8).to(torch.int32)
    return (grouped * weights).sum(dim=-1).to(torch.uint8)


def hash_codes(vectors: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """Sign codes ``[..., heads, bits // 8]`` of ``vectors [..., heads, D]`` against ``planes [heads, D, bits]``."""
    projected = torch.einsum("...hd,hdb->...hb", vectors.float(), planes)
    return _pack_bits(projected > 0)


def key_codes(key_cache: torch.Tensor, blocks: torch.Tensor, planes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token hash codes ``[n, kv_heads, block_tokens, bits // 8]`` and key norms ``[n, kv_heads, block_tokens]``."""
    keys = key_cache[blocks].float()  # [n, H, T, D]
    codes = hash_codes(keys.transpose(1, 2), planes).transpose(1, 2)  # per token, heads second
    return codes.contiguous(), keys.norm(dim=-1)


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int16)


def hamming(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bit differences between packed codes (broadcast), summed over the last dimension."""
    table = _POPCOUNT.to(a.device)
    return table[torch.bitwise_xor(a, b).long()].sum(dim=-1)


# ---- scores ----------------------------------------------------------------------------------


def _grouped(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[batch, q_heads, D]`` -> ``[batch, kv_heads, group, D]``."""
    batch, q_heads, dim = query.shape
    return query.view(batch, kv_heads, q_heads // kv_heads, dim)


def attention_share(logits: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Scores ``[batch, blocks]`` from estimated logits ``[batch, kv_heads, group, blocks]``: per head a
    softmax over the candidate blocks, summed over heads. Non-candidates score ``-inf``."""
    mask = candidates[:, None, None, :]
    share = torch.softmax(logits.masked_fill(~mask, NEG_INF), dim=-1).nan_to_num(0.0)
    return share.sum(dim=(1, 2)).masked_fill(~candidates, NEG_INF)


def block_mean_logits(
    query: torch.Tensor, means: torch.Tensor, block_tables: torch.Tensor, scale: float
) -> torch.Tensor:
    """Estimated logits ``[batch, kv_heads, group, blocks]``: the query against each block's mean key."""
    kv_heads = means.shape[1]
    table = means[block_tables.long()]  # [B, n, H, D]
    return torch.einsum("bhgd,bnhd->bhgn", _grouped(query.float(), kv_heads), table) * scale


def key_bound_logits(
    query: torch.Tensor, bounds: torch.Tensor, block_tables: torch.Tensor, scale: float
) -> torch.Tensor:
    """Upper bound of each block's largest logit (per channel, the larger of q*min and q*max)."""
    kv_heads = bounds.shape[2]
    table = bounds[block_tables.long()]  # [B, n, 2, H, D]
    q = _grouped(query.float(), kv_heads)[:, None]  # [B, 1, H, G, D]
    low = q * table[:, :, 0, :, None, :]
    high = q * table[:, :, 1, :, None, :]
    return torch.maximum(low, high).sum(dim=-1).permute(0, 2, 3, 1) * scale


def hash_logits(
    query: torch.Tensor,
    codes: torch.Tensor,
    norms: torch.Tensor,
    planes: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Each block's largest logit, estimated from hash codes: ``|q| |k| cos(pi * hamming / bits)``, max over tokens."""
    kv_heads, _, bits = planes.shape
    q = _grouped(query.float(), kv_heads)  # [B, H, G, D]
    q_codes = hash_codes(q.transpose(1, 2), planes).transpose(1, 2)  # [B, H, G, bytes]
    table = codes[block_tables.long()]  # [B, n, H, T, bytes]
    distance = hamming(q_codes[:, None, :, :, None, :], table[:, :, :, None, :, :])  # [B, n, H, G, T]
    cosine = torch.cos(distance.float() * (math.pi / bits))
    key_norms = norms[block_tables.long()][:, :, :, None, :]  # [B, n, H, 1, T]
    estimate = (cosine * key_norms).amax(dim=-1)  # [B, n, H, G]
    return (estimate * q.norm(dim=-1)[:, None] * scale).permute(0, 2, 3, 1)


# ---- selection -------------------------------------------------------------------------------


def select_blocks(
    scores: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tokens: int,
    sink_blocks: int,
    recent_blocks: int,
    budget_blocks: int | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose each sequence's blocks: the first ``sink_blocks``, the last ``recent_blocks`` (the partial
    last block among them) and the best-scoring others, ``budget_blocks`` in all.

    ``scores``: ``[batch, max_blocks]`` (only middle blocks' scores matter); ``budget_blocks``: one
    budget or one per sequence. Returns logical block indices ``[batch, max budget]`` in ascending
    order (padded with the last block where a sequence has fewer blocks than its budget) and the
    count chosen per sequence.
    """
    batch, width = scores.shape
    num_blocks = (seq_lens.long() + block_tokens - 1) // block_tokens  # [B]
    position = torch.arange(width, device=scores.device)[None, :]
    sink = position < sink_blocks
    recent = (position >= num_blocks[:, None] - recent_blocks) & (position < num_blocks[:, None])
    # Middle blocks rank by score (finite, so they always beat positions past the sequence).
    ranked = scores.float().nan_to_num(nan=NEG_INF).clamp(min=-1e30)
    ranked = ranked.masked_fill(sink | recent, float("inf")).masked_fill(position >= num_blocks[:, None], NEG_INF)
    budgets = torch.as_tensor(budget_blocks, device=scores.device).long().expand(batch)
    take = min(int(budgets.max()), width)
    picks = ranked.topk(take, dim=1).indices  # best first
    rank = torch.arange(take, device=scores.device)[None, :]
    inside = (picks < num_blocks[:, None]) & (rank < budgets[:, None])
    picks = torch.where(inside, picks, torch.full_like(picks, width)).sort(dim=1).values
    counts = inside.sum(dim=1)
    # Slots past a short sequence's blocks point at its last block (never read: see sparse_tables).
    last = (num_blocks - 1).clamp(min=0)[:, None].expand(-1, take)
    valid = torch.arange(take, device=scores.device)[None, :] < counts[:, None]
    return torch.where(valid, picks, last), counts


def with_successors(
    chosen: torch.Tensor, counts: torch.Tensor, num_blocks: torch.Tensor, limits: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add to each sequence's chosen blocks the block after each of them (within the sequence).

    ``chosen``: logical indices ``[batch, take]`` in ascending order, ``counts`` of them valid (as
    :func:`select_blocks` returns them); ``num_blocks``: blocks per sequence. Returns the same
    form: ascending, padded with the last block, and the new counts. Text that a block starts
    often goes on in the next one (a line, a number, a name), which a later query then needs.
    With ``limits`` (blocks per sequence), a sequence whose blocks and successors would be more
    than its limit keeps its choice without successors.
    """
    batch, take = chosen.shape
    width = max(int(num_blocks.max()) if batch else 0, 1)
    valid = torch.arange(take, device=chosen.device)[None, :] < counts[:, None]
    mask = torch.zeros((batch, width + 1), dtype=torch.bool, device=chosen.device)
    mask.scatter_(1, torch.where(valid, chosen.long(), width), True)  # padding lands in the spare column
    plain = mask[:, :width]
    position = torch.arange(width, device=chosen.device)[None, :]
    mask = plain.clone()
    mask[:, 1:] |= plain[:, :-1]
    mask &= position < num_blocks[:, None]
    if limits is not None:
        mask = torch.where((mask.sum(dim=1) > limits)[:, None], plain, mask)
    new_counts = mask.sum(dim=1)
    wide = int(new_counts.max()) if batch else 0
    order = torch.where(mask, position, width).sort(dim=1).values[:, :wide]
    last = (num_blocks.long() - 1).clamp(min=0)[:, None].expand(-1, wide)
    order = torch.where(torch.arange(wide, device=chosen.device)[None, :] < new_counts[:, None], order, last)
    return order, new_counts


def sparse_tables(
    block_tables: torch.Tensor, seq_lens: torch.Tensor, chosen: torch.Tensor, counts: torch.Tensor, block_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block table and lengths that make a dense paged decode read only the chosen blocks.

    The chosen blocks keep their order, so the partial last block stays last and the new length is
    ``(count - 1) * block_tokens`` plus the tokens of the last block. Keys already carry their
    rotary positions, so attention over the subset is exact for the tokens it covers.
    """
    table = torch.gather(block_tables.long(), 1, chosen).to(block_tables.dtype)
    tail = seq_lens.long() - ((seq_lens.long() + block_tokens - 1) // block_tokens - 1) * block_tokens
    lens = (counts - 1).clamp(min=0) * block_tokens + tail
    return table, lens.to(seq_lens.dtype)


# ---- decode attention ------------------------------------------------------------------------


def paged_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode attention over a paged cache: ``[batch, q_heads, head_dim]`` in the query's dtype.

    Reads exactly the blocks named by ``block_tables[:, :ceil(seq_len / block_tokens)]``; with a
    table from :func:`sparse_tables` that is sparse attention over the chosen blocks.
    """
    batch, q_heads, dim = query.shape
    kv_heads, block_tokens = key_cache.shape[1], key_cache.shape[2]
    group = q_heads // kv_heads
    out = torch.empty_like(query)
    for b in range(batch):
        length = int(seq_lens[b])
        used = (length + block_tokens - 1) // block_tokens
        blocks = block_tables[b, :used].long()
        keys = key_cache[blocks].permute(1, 0, 2, 3).reshape(kv_heads, used * block_tokens, dim)[:, :length]
        values = value_cache[blocks].permute(1, 0, 2, 3).reshape(kv_heads, used * block_tokens, dim)[:, :length]
        q = query[b].float().view(kv_heads, group, dim)
        logits = torch.einsum("hgd,htd->hgt", q, keys.float()) * scale
        weights = torch.softmax(logits, dim=-1)
        out[b] = torch.einsum("hgt,htd->hgd", weights, values.float()).reshape(q_heads, dim).to(query.dtype)
    return out
