"""``poison-unselected``: block_mean whose unchosen blocks hold NaN values while attention runs (see README)."""

from __future__ import annotations

import json

import torch

from ucm.sparse.algorithms.block_mean import BlockMean
from ucm.sparse.config import SparseConfig


class PoisonUnselected(BlockMean):
    known_options = frozenset({"report", "poison_chosen"})

    def __init__(self, config: SparseConfig):
        super().__init__(config)
        self.report = config.options.get("report")
        # The negative control: also poison one chosen block, so the outputs must change.
        self.poison_chosen = bool(config.options.get("poison_chosen", False))
        self.counts = {"sparse_rows": 0, "poisoned_blocks": 0, "read_blocks": 0, "over_budget_rows": 0, "steps": 0}
        self._saved: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def attention_begin(self, layer, query, block_tables, seq_lens, scale):
        chosen = super().attention_begin(layer, query, block_tables, seq_lens, scale)
        if chosen is None:
            return None
        tables, lens = chosen
        tokens = self.block_tokens
        unread: set[int] = set()
        for row in range(block_tables.shape[0]):
            total = (int(seq_lens[row]) + tokens - 1) // tokens
            count = (int(lens[row]) + tokens - 1) // tokens
            if count == total:
                continue
            read = set(tables[row, :count].tolist())
            unread |= set(block_tables[row, :total].tolist()) - read
            if self.poison_chosen:
                unread.add(int(tables[row, 0]))  # the sink block, always read
            self.counts["sparse_rows"] += 1
            self.counts["read_blocks"] += count
            if count > self.config.budget_blocks(total, tokens):
                self.counts["over_budget_rows"] += 1
        if unread:
            value = self._layers[layer].value
            blocks = torch.tensor(sorted(unread), dtype=torch.long, device=value.device)
            self._saved = (value, blocks, value[blocks].clone())
            value[blocks] = float("nan")
            self.counts["poisoned_blocks"] += len(unread)
        return tables, lens

    def attention_finished(self, layer, output):
        if self._saved is not None:
            value, blocks, original = self._saved
            value[blocks] = original
            self._saved = None

    def step_end(self):
        self.counts["steps"] += 1
        if self.report:
            with open(self.report, "w") as f:
                json.dump(self.counts, f)
