"""``key_bounds``: each block summarised by its keys' per-channel minimum and maximum.

A block scores by an upper bound of its largest logit (per channel, the larger of the query
times the minimum and times the maximum): a block holding one key that matches the query well
cannot be missed for its other keys. Twice the summary memory of ``block_mean``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ucm.sparse.kernels import reference
from ucm.sparse.retrieval import BlockRetrieval


class KeyBounds(BlockRetrieval):
    def summary_spec(self, kv_heads: int, block_tokens: int, head_dim: int):
        return {"bounds": ((2, kv_heads, head_dim), torch.float32)}

    def summarize(self, key_cache: torch.Tensor, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"bounds": reference.key_bounds(key_cache, blocks)}

    def logits(
        self, query: torch.Tensor, summaries: Mapping[str, torch.Tensor], block_tables: torch.Tensor, scale: float
    ) -> torch.Tensor:
        return reference.key_bound_logits(query, summaries["bounds"], block_tables, scale)
