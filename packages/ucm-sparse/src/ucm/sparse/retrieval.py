"""``BlockRetrieval``: what every block-retrieval algorithm shares.

A decode step of a long sequence reads its first blocks (the sink), its last blocks (the recent
window, the block being written among them) and the middle blocks that score best, up to the
token budget. An algorithm only says how a full block is summarised and how a query scores a
block from its summary (:meth:`summary_spec`, :meth:`summarize`, :meth:`logits`).

- Summaries are kept per physical block and per layer, computed when a retrieval first needs
  them and forgotten when the engine writes the block again (:meth:`blocks_written`), so a
  prefix shared by several requests is summarised once.
- A sequence's choice is reused for ``stride`` decode steps and made again once its block being
  written changes (the engine gives no request ids to attention, so a sequence is known by that
  block, which no other running sequence can hold). A kept choice is used only while it still
  fits the sequence: the same first block, a length a few steps on, and every chosen block still
  in its table, so a block freed by a finished request and handed to another never carries the
  old request's choice along.
- With ``pool`` (stride > 1 only), a selection keeps ``pool`` times the budget's middle blocks and
  the block after each kept block, and every step chooses the budget among them with its own
  query: the full scan is paid once per stride, and a later query that needs another part of the
  pool, or the text that runs on into the next block, still finds it.
- With ``successors``, a scan chooses about half of the budget's middle blocks by score and reads
  the block after each of them too, within the budget (at any stride).
- Sequences whose blocks fit in the budget are read whole, so a budget of 100% is dense attention.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ucm.sparse.base import UcmSparseBase
from ucm.sparse.config import SparseConfig
from ucm.sparse.kernels import reference


@dataclass
class _Choice:
    blocks: torch.Tensor  # physical blocks kept in order, the block being written last (with a pool: re-ranked)
    steps_left: int
    first_block: int  # the sequence's first block when chosen
    seq_len: int  # its length at the last use

    def fits(self, table_row: torch.Tensor, seq_len: int, num_blocks: int) -> bool:
        """Still this sequence's choice: the same first block, a length a few steps on, and every
        chosen block still in the sequence's table (a freed block may be handed to another one)."""
        if int(table_row[0]) != self.first_block or not 0 < seq_len - self.seq_len <= self.steps_left:
            return False
        return bool(torch.isin(self.blocks, table_row[:num_blocks].to(self.blocks.dtype)).all())


@dataclass
class _Layer:
    key: torch.Tensor
    value: torch.Tensor
    summaries: dict[str, torch.Tensor] | None = None
    valid: torch.Tensor | None = None  # [num_blocks] bool: the block's summary is current
    choices: dict[int, _Choice] = field(default_factory=dict)  # block being written -> choice


@dataclass
class RetrievalStats:
    """Counters since the last :meth:`BlockRetrieval.take_stats`."""

    retrievals: int = 0  # selections made (rows x layers)
    sparse_reads: int = 0  # decode rows x layers that read a subset
    blocks_read: int = 0  # blocks those reads covered
    blocks_total: int = 0  # blocks the same reads would have covered densely
    summaries: int = 0  # block summaries computed
    reranked: int = 0  # choices made within a kept pool (rows x layers)


class BlockRetrieval(UcmSparseBase, ABC):
    """Block retrieval with sink and recent windows, a token budget and a retrieval stride."""

    #: the names an algorithm accepts in ``options``
    known_options: frozenset[str] = frozenset()

    def __init__(self, config: SparseConfig):
        super().__init__(config)
        unknown = sorted(set(config.options) - self.known_options)
        if unknown:
            known = ", ".join(sorted(self.known_options)) or "none"
            raise ValueError(
                f"sparse: {config.algorithm} has no option(s) {', '.join(map(repr, unknown))}; known: {known}"
            )
        self.block_tokens = 0
        self._layers: dict[str, _Layer] = {}
        self.stats = RetrievalStats()

    # ---- what an algorithm defines ----------------------------------------------------------
    @abstractmethod
    def summary_spec(
        self, kv_heads: int, block_tokens: int, head_dim: int
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per block: name -> (shape, dtype) of each summary tensor."""

    @abstractmethod
    def summarize(self, key_cache: torch.Tensor, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Summaries of full physical ``blocks`` (each tensor ``[len(blocks), *shape]``)."""

    @abstractmethod
    def logits(
        self, query: torch.Tensor, summaries: Mapping[str, torch.Tensor], block_tables: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Estimated logits ``[rows, kv_heads, group, blocks]`` of each query head for each block of the tables."""

    # ---- hooks --------------------------------------------------------------------------------
    def register_kv_caches(self, layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]], block_tokens: int) -> None:
        self.block_tokens = block_tokens
        self._layers = {name: _Layer(key, value) for name, (key, value) in layers.items()}

    def blocks_written(self, layer: str, blocks: torch.Tensor) -> None:
        state = self._layers.get(layer)
        if state is not None and state.valid is not None and blocks.numel():
            state.valid[blocks.long()] = False

    def take_stats(self) -> RetrievalStats:
        stats, self.stats = self.stats, RetrievalStats()
        return stats

    def attention_begin(
        self, layer: str, query: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        state = self._layers.get(layer)
        if state is None:
            raise KeyError(f"sparse: layer {layer!r} was not registered (registered: {len(self._layers)} layers)")
        tokens = self.block_tokens
        if self.config.stride == 1:
            return self._choose_every_step(state, query, block_tables, seq_lens, scale)
        lens = seq_lens.tolist()
        num_blocks = [(n + tokens - 1) // tokens for n in lens]
        budgets = [self.config.budget_blocks(n, tokens) for n in num_blocks]
        rows = [i for i, (n, b) in enumerate(zip(num_blocks, budgets, strict=True)) if b < n]
        if not rows:
            state.choices.clear()
            return None
        writing = [int(block_tables[i, num_blocks[i] - 1]) for i in rows]
        choices = {}
        due = []
        for i, w in zip(rows, writing, strict=True):
            kept = state.choices.get(w)
            if kept is not None and kept.steps_left > 0 and kept.fits(block_tables[i], lens[i], num_blocks[i]):
                choices[w] = kept
            else:
                due.append(i)
        if due:
            keep = [self.config.scan_blocks(n, tokens) for n in num_blocks]  # the budget when plain
            found = self._retrieve(state, query, block_tables, seq_lens, due, num_blocks, keep, budgets, scale)
            writing_of = dict(zip(rows, writing, strict=True))
            for row, blocks in zip(due, found, strict=True):
                first = int(block_tables[row, 0])
                choices[writing_of[row]] = _Choice(blocks, self.config.stride, first, lens[row] - 1)
            self.stats.retrievals += len(due)
        state.choices = choices  # sequences not seen this step have finished or moved on
        read = [choices[w].blocks for w in writing]
        if self.config.pool:
            read = self._rerank(state, query, read, rows, lens, num_blocks, budgets, scale)
        tables = block_tables.clone()
        new_lens = seq_lens.clone()
        for row, w, blocks in zip(rows, writing, read, strict=True):
            choice = choices[w]
            choice.steps_left -= 1
            choice.seq_len = lens[row]
            count = blocks.numel()
            tables[row, :count] = blocks.to(tables.dtype)
            new_lens[row] = (count - 1) * tokens + lens[row] - (num_blocks[row] - 1) * tokens
            self.stats.blocks_read += count
            self.stats.blocks_total += num_blocks[row]
        self.stats.sparse_reads += len(rows)
        return tables, new_lens

    # ---- retrieval ------------------------------------------------------------------------------
    def _ensure_summaries(self, state: _Layer, blocks: torch.Tensor) -> None:
        if state.summaries is None:
            num_blocks, kv_heads, tokens, head_dim = state.key.shape
            spec = self.summary_spec(kv_heads, tokens, head_dim)
            device = state.key.device
            state.summaries = {
                name: torch.zeros((num_blocks, *shape), dtype=dtype, device=device)
                for name, (shape, dtype) in spec.items()
            }
            state.valid = torch.zeros(num_blocks, dtype=torch.bool, device=device)
        blocks = blocks.unique()
        stale = blocks[~state.valid[blocks]]
        if stale.numel():
            for name, value in self.summarize(state.key, stale).items():
                state.summaries[name][stale] = value.to(state.summaries[name].dtype)
            state.valid[stale] = True
            self.stats.summaries += int(stale.numel())

    def _choose(
        self,
        state: _Layer,
        query: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        rows: torch.Tensor,
        counts: torch.Tensor,
        budgets: torch.Tensor,
        scale: float,
        successors: bool = False,
        limits: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Score and choose for ``rows`` (``counts`` blocks each): their physical blocks in order,
        ``[rows, at least the largest count chosen]`` (with ``successors``, each chosen block's next
        block too, up to twice as wide), and how many of each row's are chosen. ``limits``: as for
        ``reference.with_successors`` (only a budget of just the two windows needs it)."""
        tokens = self.block_tokens
        sink, recent = self.config.windows(tokens)
        width = int(counts.max())
        tables = block_tables[rows, :width].long()
        position = torch.arange(width, device=tables.device)[None, :]
        candidates = (position >= sink) & (position < counts[:, None] - recent)
        self._ensure_summaries(state, tables[candidates])
        # Positions that are not candidates read block 0's (unused) summary: any valid index will do.
        safe = torch.where(candidates, tables, torch.zeros_like(tables))
        scores = reference.attention_share(self.logits(query[rows], state.summaries, safe, scale), candidates)
        chosen, chosen_counts = reference.select_blocks(scores, seq_lens[rows], tokens, sink, recent, budgets)
        if successors:
            chosen, chosen_counts = reference.with_successors(chosen, chosen_counts, counts, limits)
        return torch.gather(tables, 1, chosen), chosen_counts

    def _retrieve(
        self,
        state: _Layer,
        query: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        rows: list[int],
        num_blocks: list[int],
        keep: list[int],
        budgets: list[int],
        scale: float,
    ) -> list[torch.Tensor]:
        device = block_tables.device
        physical, chosen_counts = self._choose(
            state,
            query,
            block_tables,
            seq_lens,
            torch.tensor(rows, device=device),
            torch.tensor([num_blocks[i] for i in rows], device=device),
            torch.tensor([keep[i] for i in rows], device=device),
            scale,
            successors=self.config.pool > 0 or self.config.successors,
            limits=torch.tensor([budgets[i] for i in rows], device=device) if self.config.successors else None,
        )
        return [physical[r, : int(chosen_counts[r])].clone() for r in range(len(rows))]

    def _rerank(
        self,
        state: _Layer,
        query: torch.Tensor,
        pools: list[torch.Tensor],
        rows: list[int],
        lens: list[int],
        num_blocks: list[int],
        budgets: list[int],
        scale: float,
    ) -> list[torch.Tensor]:
        """The budget's blocks of each row, chosen with this step's query among its kept pool.

        A pool holds the sink, the chosen middle blocks and the recent window in order, so it is
        scored as a short sequence of its own (same windows, same tail) and mapped back."""
        out = list(pools)
        todo = [i for i, pool in enumerate(pools) if pool.numel() > budgets[rows[i]]]
        if not todo:
            return out
        tokens = self.block_tokens
        device = pools[0].device
        counts = torch.tensor([pools[i].numel() for i in todo], device=device)
        width = int(counts.max())
        table = torch.stack([torch.cat([pools[i], pools[i][-1:].expand(width - pools[i].numel())]) for i in todo])
        tails = [lens[rows[i]] - (num_blocks[rows[i]] - 1) * tokens for i in todo]
        virtual_lens = (counts - 1) * tokens + torch.tensor(tails, device=device)
        physical, chosen_counts = self._choose(
            state,
            query[[rows[i] for i in todo]],
            table,
            virtual_lens,
            torch.arange(len(todo), device=device),
            counts,
            torch.tensor([budgets[rows[i]] for i in todo], device=device),
            scale,
        )
        for r, i in enumerate(todo):
            out[i] = physical[r, : int(chosen_counts[r])]
        self.stats.reranked += len(todo)
        return out

    def _choose_every_step(
        self, state: _Layer, query: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Stride 1: every sparse row chooses again, all rows at once (no per-row bookkeeping)."""
        tokens = self.block_tokens
        lens = seq_lens.long()
        num_blocks = (lens + tokens - 1) // tokens
        config = self.config  # the one budget and scan rule, per sequence
        budgets = torch.tensor([config.budget_blocks(n, tokens) for n in num_blocks.tolist()], device=num_blocks.device)
        rows = (budgets < num_blocks).nonzero().flatten()
        if rows.numel() == 0:
            return None
        counts = num_blocks[rows]
        scans = torch.tensor([config.scan_blocks(n, tokens) for n in counts.tolist()], device=counts.device)
        physical, chosen_counts = self._choose(
            state,
            query,
            block_tables,
            seq_lens,
            rows,
            counts,
            scans,
            scale,
            successors=config.successors,
            limits=budgets[rows] if config.successors else None,
        )
        out_tables = block_tables.clone()
        # Slots past a row's count repeat its last block: never read, the new length ends before them.
        out_tables[rows, : physical.shape[1]] = physical.to(block_tables.dtype)
        tail = lens[rows] - (counts - 1) * tokens
        out_lens = seq_lens.clone()
        out_lens[rows] = ((chosen_counts - 1) * tokens + tail).to(seq_lens.dtype)
        self.stats.retrievals += rows.numel()
        self.stats.sparse_reads += rows.numel()
        self.stats.blocks_read += int(chosen_counts.sum())
        self.stats.blocks_total += int(counts.sum())
        return out_tables, out_lens
