"""``block_mean``: each block summarised by its mean key; a block scores by the query's dot product with it.

Cheap to keep (one key per block and head) and to score (one dot product per block and head).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ucm.sparse.kernels import reference
from ucm.sparse.retrieval import BlockRetrieval


class BlockMean(BlockRetrieval):
    def summary_spec(self, kv_heads: int, block_tokens: int, head_dim: int):
        return {"mean": ((kv_heads, head_dim), torch.float32)}

    def summarize(self, key_cache: torch.Tensor, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mean": reference.mean_keys(key_cache, blocks)}

    def logits(
        self, query: torch.Tensor, summaries: Mapping[str, torch.Tensor], block_tables: torch.Tensor, scale: float
    ) -> torch.Tensor:
        return reference.block_mean_logits(query, summaries["mean"], block_tables, scale)
