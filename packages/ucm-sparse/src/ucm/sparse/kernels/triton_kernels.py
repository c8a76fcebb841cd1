"""Triton kernels for sparse decode on CUDA: the fast versions of :mod:`ucm.sparse.kernels.reference`.

Same conventions as the reference: ``query [batch, q_heads, head_dim]``; paged K/V views
``[num_blocks, kv_heads, block_tokens, head_dim]`` with any strides (for a FlashAttention-layout
cache ``[2, num_blocks, block_tokens, kv_heads, head_dim]`` the key view is
``cache[0].permute(0, 2, 1, 3)``); ``block_tables`` int32 ``[batch, max_blocks]``; ``seq_lens``
int32 ``[batch]``; query head ``h`` reads KV head ``h // (q_heads // kv_heads)``.

- :func:`paged_decode`: split-K decode attention over a block table; reads only the blocks the
  table lists up to each sequence's length, so with a table from :func:`select_and_build` its
  time follows the sparse budget.
- :func:`mean_keys`, :func:`key_bounds`: summaries of full blocks (``block_mean``'s mean keys,
  ``key_bounds``' per-channel minimum and maximum).
- :func:`block_mean_scores`, :func:`key_bound_scores`: ``attention_share`` of the algorithm's
  logits over the candidate (middle) blocks, the candidates worked out in the kernel from
  ``seq_lens`` and the windows.
- :func:`select_and_build`: ``select_blocks`` then ``sparse_tables`` on the GPU with no host sync
  (one kernel: radix select of the k-th best score, then compaction), so a retrieval can sit in
  a CUDA graph. One budget for all sequences, or one each.

This module imports without Triton or CUDA (CI has neither); :func:`available` says whether the
kernels can run. With ``TRITON_INTERPRET=1`` they also run on CPU tensors (slowly), for checks.
"""

from __future__ import annotations

import functools
import math
import os

import torch

try:  # Triton is the optional ``cuda`` extra; without it the module imports and available() is False.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None

__all__ = [
    "available",
    "block_mean_scores",
    "key_bound_scores",
    "key_bounds",
    "mean_keys",
    "paged_decode",
    "select_and_build",
]

_LOG2E = 1.4426950408889634  # 1 / ln(2)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> bool:
    """Whether the kernels can run here: Triton (3.4 or newer) is importable and a CUDA device is present."""
    return triton is not None and _histogram_takes_a_mask() and (torch.cuda.is_available() or _interpreting())


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("ucm.sparse Triton kernels need the 'triton' package (install ucm-sparse[cuda])")
    if not _histogram_takes_a_mask():
        raise RuntimeError(
            f"ucm.sparse Triton kernels need triton >= 3.4 (tl.histogram's mask), got {triton.__version__}"
        )


@functools.cache
def _histogram_takes_a_mask() -> bool:
    import inspect

    return "mask" in inspect.signature(tl.histogram).parameters


def _fail(message: str) -> None:
    raise ValueError(f"ucm.sparse kernels: {message}")


def _check_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    if tensor.device != device:
        _fail(f"{name} is on {tensor.device}, expected {device} (the query's device)")
    if device.type != "cuda" and not _interpreting():
        _fail(f"{name} is on {device}: the Triton kernels need CUDA tensors")


def _check_index(name: str, tensor: torch.Tensor, dims: int) -> None:
    if tensor.dtype not in (torch.int32, torch.int64):
        _fail(f"{name} must be int32 or int64, got {tensor.dtype}")
    if tensor.dim() != dims:
        _fail(f"{name} must have {dims} dimension(s), got shape {tuple(tensor.shape)}")


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check_decode_inputs(query, key_cache, value_cache, block_tables, seq_lens) -> tuple[int, int, int, int, int]:
    if query.dim() != 3:
        _fail(f"query must be [batch, q_heads, head_dim], got shape {tuple(query.shape)}")
    batch, q_heads, dim = query.shape
    if key_cache.dim() != 4 or value_cache.dim() != 4:
        _fail(
            "key_cache and value_cache must be [num_blocks, kv_heads, block_tokens, head_dim] views, got "
            f"{tuple(key_cache.shape)} and {tuple(value_cache.shape)}"
        )
    if key_cache.shape != value_cache.shape:
        _fail(f"key_cache {tuple(key_cache.shape)} and value_cache {tuple(value_cache.shape)} differ in shape")
    _, kv_heads, block_tokens, kdim = key_cache.shape
    if kdim != dim:
        _fail(f"head_dim of the cache ({kdim}) differs from the query's ({dim})")
    if dim < 16 or dim & (dim - 1):
        _fail(f"head_dim must be a power of two >= 16, got {dim}")
    if kv_heads < 1 or q_heads % kv_heads:
        _fail(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        _fail(f"query must be float16, bfloat16 or float32, got {query.dtype}")
    if key_cache.dtype != value_cache.dtype or key_cache.dtype != query.dtype:
        _fail(
            "query, key_cache and value_cache must share a dtype, got "
            f"{query.dtype}, {key_cache.dtype}, {value_cache.dtype}"
        )
    _check_index("block_tables", block_tables, 2)
    _check_index("seq_lens", seq_lens, 1)
    if block_tables.shape[0] != batch or seq_lens.shape[0] != batch:
        _fail(
            f"block_tables {tuple(block_tables.shape)} and seq_lens {tuple(seq_lens.shape)} must have one row per "
            f"query ({batch})"
        )
    for name, tensor in (("key_cache", key_cache), ("value_cache", value_cache)):
        _check_device(name, tensor, query.device)
    _check_device("block_tables", block_tables, query.device)
    _check_device("seq_lens", seq_lens, query.device)
    return batch, q_heads, dim, kv_heads, block_tokens


# ---- Triton kernels ----------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _decode_split_kernel(
        Q,
        K,
        V,
        TABLE,
        LENS,
        O_PART,
        LSE_PART,
        OUT,
        scale_log2,
        num_splits,
        s_qb,
        s_qh,
        s_qd,
        s_kb,
        s_kh,
        s_kt,
        s_kd,
        s_vb,
        s_vh,
        s_vt,
        s_vd,
        s_tb,
        s_tn,
        s_ob,
        s_oh,
        s_od,
        KV_HEADS: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_G: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BT: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DIRECT: tl.constexpr,
    ):
        """One (sequence, KV head, split): online softmax over the split's tokens for the head's query group."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // KV_HEADS
        kvh = pid % KV_HEADS
        seq_len = tl.load(LENS + b).to(tl.int32)
        # Each sequence's tokens are cut into num_splits equal chunks (whole tiles).
        chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
        start = split * chunk
        end = tl.minimum(start + chunk, seq_len)

        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, HEAD_DIM)
        n = tl.arange(0, BLOCK_N)
        heads = kvh * GROUP + g
        g_ok = g < GROUP
        q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + d[None, :] * s_qd, mask=g_ok[:, None], other=0.0)

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
        row = TABLE + b.to(tl.int64) * s_tb
        k_head = K + kvh * s_kh
        v_head = V + kvh * s_vh
        for tok0 in range(start, end, BLOCK_N):
            tok = tok0 + n
            ok = tok < end
            phys = tl.load(row + (tok // BT) * s_tn, mask=ok, other=0).to(tl.int64)
            within = tok % BT
            k = tl.load(
                k_head + phys[:, None] * s_kb + within[:, None] * s_kt + d[None, :] * s_kd, mask=ok[:, None], other=0.0
            )
            s = tl.dot(q, tl.trans(k)) * scale_log2
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                v_head + phys[:, None] * s_vb + within[:, None] * s_vt + d[None, :] * s_vd, mask=ok[:, None], other=0.0
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

        has = l_i > 0
        res = acc / tl.where(has, l_i, 1.0)[:, None]
        if DIRECT:
            tl.store(
                OUT + b * s_ob + heads[:, None] * s_oh + d[None, :] * s_od,
                res.to(OUT.dtype.element_ty),
                mask=g_ok[:, None],
            )
        else:
            part = (b * (KV_HEADS * GROUP) + heads) * num_splits + split
            tl.store(O_PART + part[:, None] * HEAD_DIM + d[None, :], res, mask=g_ok[:, None])
            lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
            tl.store(LSE_PART + part, lse, mask=g_ok)

    @triton.jit
    def _decode_combine_kernel(
        O_PART,
        LSE_PART,
        OUT,
        num_splits,
        s_ob,
        s_oh,
        s_od,
        Q_HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        SPLITS_PAD: tl.constexpr,
    ):
        """One (sequence, query head): merge the splits' partial outputs by their log-sum-exp."""
        pid = tl.program_id(0)
        b = pid // Q_HEADS
        h = pid % Q_HEADS
        s = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, HEAD_DIM)
        s_ok = s < num_splits
        lse = tl.load(LSE_PART + pid * num_splits + s, mask=s_ok, other=float("-inf"))
        top = tl.max(lse, 0)
        top = tl.where(top == float("-inf"), 0.0, top)
        w = tl.exp2(lse - top)
        o = tl.load(O_PART + (pid * num_splits + s)[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None], other=0.0)
        total = tl.sum(w, 0)
        res = tl.sum(w[:, None] * o, 0) / tl.where(total > 0, total, 1.0)
        tl.store(OUT + b * s_ob + h * s_oh + d * s_od, res.to(OUT.dtype.element_ty))

    @triton.jit
    def _summary_kernel(
        K,
        BLOCKS,
        OUT,
        s_kb,
        s_kh,
        s_kt,
        s_kd,
        s_ob,
        s_o2,
        s_oh,
        s_od,
        BT: tl.constexpr,
        BT_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        INDEXED: tl.constexpr,
        BOUNDS: tl.constexpr,
    ):
        """One (block, KV head): the block's mean key, or (BOUNDS) its per-channel key minimum and maximum."""
        i = tl.program_id(0)
        h = tl.program_id(1)
        blk = tl.load(BLOCKS + i).to(tl.int64)
        t = tl.arange(0, BT_PAD)
        d = tl.arange(0, HEAD_DIM)
        t_ok = t[:, None] < BT
        out_row = blk if INDEXED else i.to(tl.int64)
        dest = OUT + out_row * s_ob + h * s_oh + d * s_od
        k = tl.load(K + blk * s_kb + h * s_kh + t[:, None] * s_kt + d[None, :] * s_kd, mask=t_ok, other=0.0)
        k = k.to(tl.float32)
        if BOUNDS:
            tl.store(dest, tl.min(tl.where(t_ok, k, float("inf")), 0).to(OUT.dtype.element_ty))
            tl.store(dest + s_o2, tl.max(tl.where(t_ok, k, float("-inf")), 0).to(OUT.dtype.element_ty))
        else:
            tl.store(dest, (tl.sum(k, 0) / BT).to(OUT.dtype.element_ty))

    @triton.jit
    def _score_logits_kernel(
        Q,
        SUMMARY,
        TABLE,
        LENS,
        LOGITS,
        STAT_MAX,
        STAT_SUM,
        scale,
        width,
        num_chunks,
        s_qb,
        s_qh,
        s_qd,
        s_mb,
        s_m2,
        s_mh,
        s_md,
        s_tb,
        s_tn,
        KV_HEADS: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_G: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BT: tl.constexpr,
        SINK: tl.constexpr,
        RECENT: tl.constexpr,
        BLOCK_W: tl.constexpr,
        BOUNDS: tl.constexpr,
    ):
        """One (sequence, KV head, chunk of blocks): logits of the head's query group against the
        candidates' summaries (mean keys, or with BOUNDS per-channel key bounds: the larger of
        q * min and q * max, summed), stored, with the chunk's per-head max and sum of exponentials."""
        pid = tl.program_id(0)
        c = tl.program_id(1)
        b = pid // KV_HEADS
        kvh = pid % KV_HEADS
        seq_len = tl.load(LENS + b).to(tl.int32)
        num_blocks = tl.cdiv(seq_len, BT)
        n = c * BLOCK_W + tl.arange(0, BLOCK_W)
        cand = (n >= SINK) & (n < num_blocks - RECENT) & (n < width)
        phys = tl.load(TABLE + b.to(tl.int64) * s_tb + n * s_tn, mask=cand, other=0).to(tl.int64)
        g = tl.arange(0, BLOCK_G)
        g_ok = g < GROUP
        heads = kvh * GROUP + g
        # Exact float32 products: the chunk's summary tile is loaded once (all loads in flight
        # together), then each query head of the group is scored against it.
        d = tl.arange(0, HEAD_DIM)
        at = SUMMARY + phys[:, None] * s_mb + kvh * s_mh + d[None, :] * s_md
        first = tl.load(at, mask=cand[:, None], other=0.0).to(tl.float32)
        if BOUNDS:
            second = tl.load(at + s_m2, mask=cand[:, None], other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_W], tl.float32)
        for gi in tl.static_range(GROUP):
            q = tl.load(Q + b * s_qb + (kvh * GROUP + gi) * s_qh + d * s_qd).to(tl.float32)[None, :]
            if BOUNDS:
                row = tl.sum(tl.maximum(q * first, q * second), 1)
            else:
                row = tl.sum(q * first, 1)
            acc = tl.where(g[:, None] == gi, row[None, :], acc)
        logits = acc * scale
        logits = tl.where(cand[None, :], logits, float("-inf"))
        rows = b * (KV_HEADS * GROUP) + heads
        tl.store(
            LOGITS + rows.to(tl.int64)[:, None] * width + n[None, :], logits, mask=g_ok[:, None] & (n < width)[None, :]
        )
        top = tl.max(logits, 1)
        safe = tl.where(top == float("-inf"), 0.0, top)
        total = tl.sum(tl.exp(logits - safe[:, None]), 1)
        tl.store(STAT_MAX + rows * num_chunks + c, top, mask=g_ok)
        tl.store(STAT_SUM + rows * num_chunks + c, total, mask=g_ok)

    @triton.jit
    def _score_share_kernel(
        LOGITS,
        STAT_MAX,
        STAT_SUM,
        LENS,
        SCORES,
        width,
        num_chunks,
        s_ob,
        s_on,
        Q_HEADS: tl.constexpr,
        HQ_PAD: tl.constexpr,
        BT: tl.constexpr,
        SINK: tl.constexpr,
        RECENT: tl.constexpr,
        BLOCK_W: tl.constexpr,
        STAT_CHUNK: tl.constexpr,
    ):
        """One (sequence, chunk of blocks): per head softmax over all candidates, summed over heads."""
        b = tl.program_id(0)
        c = tl.program_id(1)
        h = tl.arange(0, HQ_PAD)
        h_ok = h < Q_HEADS
        rows = b * Q_HEADS + h
        top = tl.full([HQ_PAD], float("-inf"), tl.float32)
        total = tl.zeros([HQ_PAD], tl.float32)
        for c0 in range(0, num_chunks, STAT_CHUNK):
            cc = c0 + tl.arange(0, STAT_CHUNK)
            ok = h_ok[:, None] & (cc < num_chunks)[None, :]
            part_max = tl.load(STAT_MAX + rows[:, None] * num_chunks + cc[None, :], mask=ok, other=float("-inf"))
            part_sum = tl.load(STAT_SUM + rows[:, None] * num_chunks + cc[None, :], mask=ok, other=0.0)
            new_top = tl.maximum(top, tl.max(part_max, 1))
            safe = tl.where(new_top == float("-inf"), 0.0, new_top)
            total = total * tl.exp(top - safe) + tl.sum(part_sum * tl.exp(part_max - safe[:, None]), 1)
            top = new_top
        safe = tl.where(top == float("-inf"), 0.0, top)
        inv = 1.0 / tl.where(total > 0, total, 1.0)
        n = c * BLOCK_W + tl.arange(0, BLOCK_W)
        n_ok = n < width
        logits = tl.load(
            LOGITS + rows.to(tl.int64)[:, None] * width + n[None, :],
            mask=h_ok[:, None] & n_ok[None, :],
            other=float("-inf"),
        )
        share = tl.sum(tl.exp(logits - safe[:, None]) * inv[:, None], 0)
        seq_len = tl.load(LENS + b).to(tl.int32)
        num_blocks = tl.cdiv(seq_len, BT)
        cand = (n >= SINK) & (n < num_blocks - RECENT)
        tl.store(SCORES + b * s_ob + n * s_on, tl.where(cand, share, float("-inf")), mask=n_ok)

    @triton.jit
    def _middle_keys(row, n, s_sn, width, num_blocks, SINK: tl.constexpr, RECENT: tl.constexpr):
        """Order-preserving int32 keys of the scores at positions ``n`` (sign bit flipped, so their
        bytes sort as unsigned digits; NaN ranks as -1e30 and no score below -1e30, as the
        reference ranks them) and whether each position is a middle block."""
        n_ok = n < width
        s = tl.load(row + n * s_sn, mask=n_ok, other=0.0).to(tl.float32)
        s = tl.maximum(tl.where(s != s, -1e30, s), -1e30) + 0.0  # + 0.0 turns -0.0 into 0.0
        bits = s.to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # signed order of the floats
        cand = n_ok & (n >= SINK) & (n < num_blocks - RECENT)
        return key ^ -2147483648, cand

    @triton.jit
    def _select_kernel(
        SCORES,
        TABLE,
        LENS,
        OUT_TABLE,
        OUT_LENS,
        BUDGETS,
        width,
        k_mid,
        take,
        out_width,
        s_sb,
        s_sn,
        s_tb,
        s_tn,
        s_ob,
        s_on,
        BT: tl.constexpr,
        SINK: tl.constexpr,
        RECENT: tl.constexpr,
        CHUNK: tl.constexpr,
        PER_ROW: tl.constexpr,
        SUCCESSORS: tl.constexpr,
        SINGLE: tl.constexpr,
        DIGIT_BITS: tl.constexpr,
        NBINS: tl.constexpr,
    ):
        """One sequence: the k-th best middle score by radix select (up to 32 / DIGIT_BITS passes of
        digit histograms, fewer once the k-th key's bin is taken whole; a row of up to CHUNK
        blocks is read once), then sink, recent and the best ``k_mid`` middle blocks (with
        SUCCESSORS, and the block after each chosen one) compacted in ascending order into the
        sparse table, the rest of its ``out_width`` slots padded with the last block; the length."""
        b = tl.program_id(0)
        seq_len = tl.load(LENS + b).to(tl.int32)
        num_blocks = tl.cdiv(seq_len, BT)
        if PER_ROW:  # this sequence's budget (the table is as wide as the largest)
            k_mid = tl.maximum(tl.minimum(tl.load(BUDGETS + b).to(tl.int32), take) - SINK - RECENT, 0)
        ar = tl.arange(0, CHUNK)
        row = SCORES + b.to(tl.int64) * s_sb
        zero = tl.sum(tl.zeros([CHUNK], tl.int32), 0)  # scalar tensors: loop-carried values keep one type
        prefix = zero  # the k-th key's digits found so far
        need = zero + k_mid  # keys equal to the prefix still to take, best first
        fewer = zero  # 1 when there are fewer middle blocks than wanted: all of them are taken
        done = zero  # 1 once every key that starts with the prefix is to be taken: later digits change nothing
        if SINGLE:  # the whole row fits one chunk: read it once, keep it in registers
            ukey0, cand0 = _middle_keys(row, ar, s_sn, width, num_blocks, SINK, RECENT)
        for pas in tl.static_range(32 // DIGIT_BITS):
            shift = 32 - DIGIT_BITS * (pas + 1)
            if done == 0:
                if SINGLE:
                    match = cand0
                    if pas > 0:
                        match = cand0 & ((ukey0 >> (shift + DIGIT_BITS)) == (prefix >> (shift + DIGIT_BITS)))
                    hist = tl.histogram((ukey0 >> shift) & (NBINS - 1), NBINS, mask=match)
                else:
                    hist = tl.zeros([NBINS], tl.int32)
                    for n0 in range(0, width, CHUNK):
                        ukey, cand = _middle_keys(row, n0 + ar, s_sn, width, num_blocks, SINK, RECENT)
                        match = cand
                        if pas > 0:
                            match = cand & ((ukey >> (shift + DIGIT_BITS)) == (prefix >> (shift + DIGIT_BITS)))
                        hist += tl.histogram((ukey >> shift) & (NBINS - 1), NBINS, mask=match)
                at_least = tl.cumsum(hist, 0, reverse=True)  # keys whose digit is >= each bin
                # The digit is the last bin with at least `need` keys at or above it (those bins are
                # a prefix); the keys above it are the other bins'. When a bin has exactly `need`
                # keys at or above it, the digit's bin is taken whole and the search is over. One
                # reduction gives the three counts (bits 0-31, 32-47 and 48 up).
                ge = at_least >= need
                packed = tl.sum(
                    tl.where(ge, 4294967296, hist.to(tl.int64)) + tl.where(at_least == need, 281474976710656, 0), 0
                )
                n_ge = ((packed >> 32) & 65535).to(tl.int32)
                if pas == 0:
                    fewer = (n_ge == 0).to(tl.int32)
                digit = tl.maximum(n_ge - 1, 0)
                need = need - (packed & 4294967295).to(tl.int32)
                prefix = prefix | (digit << shift)
                done = ((packed >> 48) > 0).to(tl.int32) | fewer
        # Fewer middle blocks than wanted: all of them (every middle key beats the smallest int).
        kth = tl.where(fewer > 0, -2147483648, prefix ^ -2147483648)
        table_row = TABLE + b.to(tl.int64) * s_tb
        out_row = OUT_TABLE + b.to(tl.int64) * s_ob
        count = zero
        ties = zero
        for n0 in range(0, width, CHUNK):
            n = n0 + ar
            if SINGLE:
                ukey, cand = ukey0, cand0
            else:
                ukey, cand = _middle_keys(row, n, s_sn, width, num_blocks, SINK, RECENT)
            key = ukey ^ -2147483648
            inside = (n < width) & (n < num_blocks)
            tie = (cand & (key == kth)).to(tl.int32)
            tie_rank = tl.cumsum(tie, 0) - tie + ties
            # With k_mid = 0 no key beats the all-ones prefix and need is 0.
            mid = cand & ((key > kth) | ((tie > 0) & (tie_rank < need)))
            chosen = inside & ((n < SINK) | (n >= num_blocks - RECENT) | mid)
            if SUCCESSORS:  # the same test at the block before: ties before it are ties before n less its own
                prev = n - 1
                ukey_p, cand_p = _middle_keys(row, tl.maximum(prev, 0), s_sn, width, num_blocks, SINK, RECENT)
                key_p = ukey_p ^ -2147483648
                tie_p = (cand_p & (key_p == kth)).to(tl.int32)
                mid_p = cand_p & ((key_p > kth) | ((tie_p > 0) & (tie_rank - tie_p < need)))
                # `inside` puts n, and so p, within the table and the sequence.
                chosen = chosen | (inside & (prev >= 0) & ((prev < SINK) | (prev >= num_blocks - RECENT) | mid_p))
            taken = chosen.to(tl.int32)
            slot = tl.cumsum(taken, 0) - taken + count
            phys = tl.load(table_row + n * s_tn, mask=chosen, other=0)
            tl.store(out_row + slot * s_on, phys, mask=chosen)
            count += tl.sum(taken, 0)
            ties += tl.sum(tie, 0)
        last = tl.load(table_row + tl.maximum(num_blocks - 1, 0) * s_tn)
        for s0 in range(0, out_width, CHUNK):
            s = s0 + ar
            tl.store(out_row + s * s_on, tl.zeros([CHUNK], last.dtype) + last, mask=(s >= count) & (s < out_width))
        tail = seq_len - (num_blocks - 1) * BT
        tl.store(OUT_LENS + b, (tl.maximum(count - 1, 0) * BT + tail).to(OUT_LENS.dtype.element_ty))


# ---- Python API --------------------------------------------------------------------------------


def _decode_splits(rows: int, max_tokens: int, block_n: int, device: torch.device) -> int:
    """Splits per (sequence, KV head): enough programs for about four per multiprocessor, each at
    least two tiles long. Worked out from the table's width, never from seq_lens (no host sync)."""
    wanted = math.ceil(4 * _sm_count(device) / max(rows, 1))
    by_work = max(1, math.ceil(max_tokens / (2 * block_n)))
    return max(1, min(wanted, by_work, 256))


def paged_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Decode attention over a paged cache (``reference.paged_decode``), ``[batch, q_heads, head_dim]``.

    Flash-decoding: a grid of (sequence x KV head) x splits, each program the KV head's whole query
    group over one split of the sequence's tokens (float32 online softmax), then a combine kernel
    (skipped when one split suffices). Reads ``block_tables[b, :ceil(seq_lens[b] / block_tokens)]``
    and no other block; a table from :func:`select_and_build` makes it sparse attention.
    ``num_splits``, ``block_n`` (tokens per tile), ``num_warps`` and ``num_stages`` are tuning knobs;
    the defaults are worked out from the shapes alone, so the call never syncs with the host.
    """
    _require_triton()
    batch, q_heads, dim, kv_heads, block_tokens = _check_decode_inputs(
        query, key_cache, value_cache, block_tables, seq_lens
    )
    if out is None:
        out = torch.empty_like(query)
    elif out.shape != query.shape or out.device != query.device:
        _fail(f"out must be {tuple(query.shape)} on {query.device}, got {tuple(out.shape)} on {out.device}")
    if batch == 0:
        return out
    group = q_heads // kv_heads
    rows = batch * kv_heads
    max_tokens = block_tables.shape[1] * block_tokens
    tile = block_n or (max(64, _pow2(block_tokens)) if dim <= 128 else max(32, _pow2(block_tokens)))
    splits = num_splits if num_splits is not None else _decode_splits(rows, max_tokens, tile, query.device)
    if block_n is None:
        # Long splits over many (sequence, head) rows stream better in larger tiles (measured on an H200).
        block_n = 128 if dim <= 128 and tile <= 128 and rows >= 64 and max_tokens >= 1024 * splits else tile
    if block_n < 16 or block_n & (block_n - 1):
        _fail(f"block_n must be a power of two >= 16, got {block_n}")
    if splits < 1:
        _fail(f"num_splits must be >= 1, got {splits}")
    direct = splits == 1
    if direct:
        o_part = lse_part = out  # unused
    else:
        o_part = torch.empty((batch * q_heads * splits, dim), device=query.device, dtype=torch.float32)
        lse_part = torch.empty((batch * q_heads * splits,), device=query.device, dtype=torch.float32)
    _decode_split_kernel[(rows, splits)](
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        o_part,
        lse_part,
        out,
        float(scale) * _LOG2E,
        splits,
        *query.stride(),
        *key_cache.stride(),
        *value_cache.stride(),
        *block_tables.stride(),
        *out.stride(),
        KV_HEADS=kv_heads,
        GROUP=group,
        BLOCK_G=max(16, _pow2(group)),
        HEAD_DIM=dim,
        BT=block_tokens,
        BLOCK_N=block_n,
        DIRECT=direct,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if not direct:
        _decode_combine_kernel[(batch * q_heads,)](
            o_part,
            lse_part,
            out,
            splits,
            *out.stride(),
            Q_HEADS=q_heads,
            HEAD_DIM=dim,
            SPLITS_PAD=max(2, _pow2(splits)),
            num_warps=4,
        )
    return out


def _summaries(key_cache: torch.Tensor, blocks: torch.Tensor, out, indexed: bool, bounds: bool) -> torch.Tensor:
    name = "key_bounds" if bounds else "mean_keys"
    _require_triton()
    if key_cache.dim() != 4:
        _fail(f"key_cache must be [num_blocks, kv_heads, block_tokens, head_dim], got {tuple(key_cache.shape)}")
    num_blocks, kv_heads, block_tokens, dim = key_cache.shape
    if dim & (dim - 1):
        _fail(f"head_dim must be a power of two, got {dim}")
    _check_index("blocks", blocks, 1)
    _check_device("blocks", blocks, key_cache.device)
    rows = num_blocks if indexed else blocks.shape[0]
    shape = (rows, 2, kv_heads, dim) if bounds else (rows, kv_heads, dim)
    if out is None:
        if indexed:
            _fail(f"{name}(indexed=True) needs the summary table as out")
        out = torch.empty(shape, device=key_cache.device, dtype=torch.float32)
    elif tuple(out.shape) != shape or out.device != key_cache.device:
        _fail(f"out must be {shape} on {key_cache.device}, got {tuple(out.shape)} on {out.device}")
    if blocks.numel() == 0:
        return out
    strides = out.stride() if bounds else (out.stride(0), 0, *out.stride()[1:])
    _summary_kernel[(blocks.shape[0], kv_heads)](
        key_cache,
        blocks,
        out,
        *key_cache.stride(),
        *strides,
        BT=block_tokens,
        BT_PAD=max(2, _pow2(block_tokens)),
        HEAD_DIM=dim,
        INDEXED=indexed,
        BOUNDS=bounds,
        num_warps=4,
    )
    return out


def mean_keys(
    key_cache: torch.Tensor, blocks: torch.Tensor, out: torch.Tensor | None = None, *, indexed: bool = False
) -> torch.Tensor:
    """Block-mean keys of the full ``blocks`` (float32 unless ``out`` says otherwise), as ``reference.mean_keys``.

    With ``indexed=False`` row ``i`` of ``out [len(blocks), kv_heads, head_dim]`` is block ``blocks[i]``'s
    mean. With ``indexed=True`` ``out`` is the per-physical-block summary table
    ``[num_blocks, kv_heads, head_dim]`` and row ``blocks[i]`` is written in place (one launch
    instead of a computation and a scatter).
    """
    return _summaries(key_cache, blocks, out, indexed, bounds=False)


def key_bounds(
    key_cache: torch.Tensor, blocks: torch.Tensor, out: torch.Tensor | None = None, *, indexed: bool = False
) -> torch.Tensor:
    """Per-channel key minimum and maximum of the full ``blocks``, as ``reference.key_bounds``:
    ``[len(blocks), 2, kv_heads, head_dim]`` (float32 unless ``out`` says otherwise; in the cache's
    own dtype the bounds are exact, a minimum and a maximum of its values, at half the bytes).
    ``indexed`` as for :func:`mean_keys`, with ``out`` the table ``[num_blocks, 2, kv_heads, head_dim]``.
    """
    return _summaries(key_cache, blocks, out, indexed, bounds=True)


def _check_windows(block_tokens: int, sink_blocks: int, recent_blocks: int) -> None:
    if block_tokens < 1:
        _fail(f"block_tokens must be >= 1, got {block_tokens}")
    if sink_blocks < 0 or recent_blocks < 0:
        _fail(f"sink_blocks and recent_blocks must be >= 0, got {sink_blocks} and {recent_blocks}")


def _block_scores(
    query: torch.Tensor,
    summary: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tokens: int,
    sink_blocks: int,
    recent_blocks: int,
    scale: float,
    out: torch.Tensor | None,
    bounds: bool,
    block_w: int = 32,
    num_warps: int = 4,
) -> torch.Tensor:
    _require_triton()
    if query.dim() != 3:
        _fail(f"query must be [batch, q_heads, head_dim], got shape {tuple(query.shape)}")
    batch, q_heads, dim = query.shape
    if bounds:
        if summary.dim() != 4 or summary.shape[1] != 2:
            _fail(f"bounds must be [num_blocks, 2, kv_heads, head_dim], got shape {tuple(summary.shape)}")
        strides = summary.stride()
    else:
        if summary.dim() != 3:
            _fail(f"means must be [num_blocks, kv_heads, head_dim], got shape {tuple(summary.shape)}")
        strides = (summary.stride(0), 0, *summary.stride()[1:])
    name = "bounds" if bounds else "means"
    kv_heads = summary.shape[-2]
    if summary.shape[-1] != dim:
        _fail(f"head_dim of {name} ({summary.shape[-1]}) differs from the query's ({dim})")
    if dim < 16 or dim & (dim - 1):
        _fail(f"head_dim must be a power of two >= 16, got {dim}")
    if kv_heads < 1 or q_heads % kv_heads:
        _fail(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    _check_index("block_tables", block_tables, 2)
    _check_index("seq_lens", seq_lens, 1)
    if block_tables.shape[0] != batch or seq_lens.shape[0] != batch:
        _fail(f"block_tables {tuple(block_tables.shape)} and seq_lens {tuple(seq_lens.shape)} need {batch} rows")
    _check_windows(block_tokens, sink_blocks, recent_blocks)
    for label, tensor in ((name, summary), ("block_tables", block_tables), ("seq_lens", seq_lens)):
        _check_device(label, tensor, query.device)
    width = block_tables.shape[1]
    if out is None:
        out = torch.empty((batch, width), device=query.device, dtype=torch.float32)
    elif tuple(out.shape) != (batch, width) or out.dtype != torch.float32:
        _fail(f"out must be float32 {(batch, width)}, got {out.dtype} {tuple(out.shape)}")
    if batch == 0 or width == 0:
        return out
    group = q_heads // kv_heads
    chunks = triton.cdiv(width, block_w)
    logits = torch.empty((batch * q_heads, width), device=query.device, dtype=torch.float32)
    stat_max = torch.empty((batch * q_heads, chunks), device=query.device, dtype=torch.float32)
    stat_sum = torch.empty_like(stat_max)
    _score_logits_kernel[(batch * kv_heads, chunks)](
        query,
        summary,
        block_tables,
        seq_lens,
        logits,
        stat_max,
        stat_sum,
        float(scale),
        width,
        chunks,
        *query.stride(),
        *strides,
        *block_tables.stride(),
        KV_HEADS=kv_heads,
        GROUP=group,
        BLOCK_G=_pow2(group),
        HEAD_DIM=dim,
        BT=block_tokens,
        SINK=sink_blocks,
        RECENT=recent_blocks,
        BLOCK_W=block_w,
        BOUNDS=bounds,
        num_warps=num_warps,
    )
    _score_share_kernel[(batch, triton.cdiv(width, 64))](
        logits,
        stat_max,
        stat_sum,
        seq_lens,
        out,
        width,
        chunks,
        *out.stride(),
        Q_HEADS=q_heads,
        HQ_PAD=max(2, _pow2(q_heads)),
        BT=block_tokens,
        SINK=sink_blocks,
        RECENT=recent_blocks,
        BLOCK_W=64,
        STAT_CHUNK=64,
        num_warps=4,
    )
    return out


def block_mean_scores(
    query: torch.Tensor,
    means: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tokens: int,
    sink_blocks: int,
    recent_blocks: int,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block scores ``[batch, max_blocks]`` (float32) of the block-mean algorithm.

    Equal to ``reference.attention_share(reference.block_mean_logits(query, means, block_tables,
    scale), candidates)`` with ``candidates`` the middle blocks: logical block ``n`` of sequence
    ``b`` with ``sink_blocks <= n < ceil(seq_lens[b] / block_tokens) - recent_blocks``. Other
    positions score ``-inf``, and their table entries and summaries are never read (any value).
    ``means``: the per-physical-block summaries ``[num_blocks, kv_heads, head_dim]`` (any float
    dtype, any strides). Two launches: logits with per-chunk softmax statistics, then the shares.
    """
    return _block_scores(
        query, means, block_tables, seq_lens, block_tokens, sink_blocks, recent_blocks, scale, out, bounds=False
    )


def key_bound_scores(
    query: torch.Tensor,
    bounds: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tokens: int,
    sink_blocks: int,
    recent_blocks: int,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block scores ``[batch, max_blocks]`` (float32) of the key-bounds algorithm:
    ``reference.attention_share(reference.key_bound_logits(...), candidates)``, candidates and
    launches as in :func:`block_mean_scores`. ``bounds``: the per-physical-block summaries
    ``[num_blocks, 2, kv_heads, head_dim]`` (minimum, then maximum; any float dtype, any strides).
    """
    return _block_scores(
        query, bounds, block_tables, seq_lens, block_tokens, sink_blocks, recent_blocks, scale, out, bounds=True
    )


def select_and_build(
    scores: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tokens: int,
    sink_blocks: int,
    recent_blocks: int,
    budget_blocks: int | torch.Tensor,
    *,
    max_budget: int | None = None,
    successors: bool = False,
    digit_bits: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.select_blocks`` (then ``reference.with_successors`` with ``successors``) and
    ``reference.sparse_tables`` in one launch.

    Returns the sparse block table ``[batch, min(max budget, max_blocks)]`` (``block_tables``'
    dtype) and the sparse lengths ``[batch]`` (``seq_lens``' dtype), ready for :func:`paged_decode`.
    Each row holds the sink blocks, the best ``budget - sink_blocks - recent_blocks`` middle blocks
    and the recent blocks in ascending order, then copies of the last block (never read).
    Scores rank as the reference ranks them (NaN as -1e30); only middle positions' scores are read.
    Middle blocks tied with the k-th best score are taken lowest position first (the reference
    leaves the order of ties open). One program per sequence finds the k-th best score by radix
    select and compacts the chosen blocks.

    ``budget_blocks``: one budget, or one per sequence (an integer tensor ``[batch]`` on the
    device); every budget must cover the two windows. With per-sequence budgets the table's width
    is the largest budget: pass it as ``max_budget`` to keep the call free of host syncs (a CUDA
    graph needs that), otherwise it is read from the device.

    With ``successors`` each chosen block's next block joins it (a retrieval pool, or the
    ``successors`` setting with ``SparseConfig.scan_blocks`` as the budget): the table is then up
    to twice the budget wide, and the length counts every block it names. The caller keeps that
    within its own budget (with a budget of just the two windows the sink's successor is one
    block more: choose without successors there, as ``BlockRetrieval`` does).
    ``digit_bits`` (1, 2, 4 or 8): the radix select's digit, at most ``32 / digit_bits`` passes (4
    was the fastest on an H200 for rows of 512 to 20000 blocks).
    """
    _require_triton()
    if scores.dim() != 2:
        _fail(f"scores must be [batch, max_blocks], got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        _fail(f"scores must be floating point, got {scores.dtype}")
    batch, width = scores.shape
    _check_index("block_tables", block_tables, 2)
    _check_index("seq_lens", seq_lens, 1)
    if block_tables.shape[0] != batch or block_tables.shape[1] < width or seq_lens.shape[0] != batch:
        _fail(
            f"block_tables {tuple(block_tables.shape)} and seq_lens {tuple(seq_lens.shape)} must cover scores "
            f"{tuple(scores.shape)}"
        )
    _check_windows(block_tokens, sink_blocks, recent_blocks)
    if digit_bits not in (1, 2, 4, 8):
        _fail(f"digit_bits must be 1, 2, 4 or 8, got {digit_bits}")
    _check_device("scores", scores, scores.device)
    for name, tensor in (("block_tables", block_tables), ("seq_lens", seq_lens)):
        _check_device(name, tensor, scores.device)
    windows = sink_blocks + recent_blocks
    per_row = isinstance(budget_blocks, torch.Tensor)
    if per_row:
        _check_index("budget_blocks", budget_blocks, 1)
        _check_device("budget_blocks", budget_blocks, scores.device)
        if budget_blocks.shape[0] != batch:
            _fail(f"budget_blocks has {budget_blocks.shape[0]} entries for {batch} sequences")
        if max_budget is None:
            max_budget = int(budget_blocks.max()) if batch else windows  # a host sync
        budgets = budget_blocks
    else:
        max_budget = int(budget_blocks)
        budgets = seq_lens  # unused
    if max_budget < windows:
        _fail(f"budget_blocks ({max_budget}) must cover sink_blocks + recent_blocks ({windows})")
    take = min(max_budget, width)
    out_width = min(2 * max_budget, width) if successors else take
    table = torch.empty((batch, out_width), device=scores.device, dtype=block_tables.dtype)
    lens = torch.empty((batch,), device=scores.device, dtype=seq_lens.dtype)
    if batch == 0 or take == 0:
        return table, lens
    chunk = min(8192, max(1024, _pow2(width)))
    _select_kernel[(batch,)](
        scores,
        block_tables,
        seq_lens,
        table,
        lens,
        budgets,
        width,
        max(0, take - windows),
        take,
        out_width,
        *scores.stride(),
        *block_tables.stride(),
        *table.stride(),
        BT=block_tokens,
        SINK=sink_blocks,
        RECENT=recent_blocks,
        CHUNK=chunk,
        PER_ROW=per_row,
        SUCCESSORS=successors,
        SINGLE=width <= chunk,
        DIGIT_BITS=digit_bits,
        NBINS=1 << digit_bits,
        num_warps=max(4, chunk // 512),
    )
    return table, lens
