"""``hash_codes``: every key summarised by a short sign hash (random hyperplanes) and its norm.

A block scores by its best token's estimated logit, ``|q| |k| cos(pi * hamming / bits)``: the
Hamming distance of sign hashes estimates the angle between query and key. Per token it keeps
``bits / 8`` bytes and a norm, a small fraction of the key itself. Options: ``bits`` (default
128, a multiple of 8) and ``seed`` (default 0; the hyperplanes depend only on it).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ucm.sparse.config import SparseConfig
from ucm.sparse.kernels import reference
from ucm.sparse.retrieval import BlockRetrieval


class HashCodes(BlockRetrieval):
    known_options = frozenset({"bits", "seed"})

    def __init__(self, config: SparseConfig):
        super().__init__(config)
        self.bits = config.options.get("bits", 128)
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or self.bits <= 0 or self.bits % 8:
            raise ValueError(f"sparse: hash_codes option 'bits' must be a positive multiple of 8, got {self.bits!r}")
        self.seed = config.options.get("seed", 0)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"sparse: hash_codes option 'seed' must be an integer, got {self.seed!r}")
        self._planes: torch.Tensor | None = None

    def _planes_for(self, kv_heads: int, head_dim: int, device: torch.device) -> torch.Tensor:
        if self._planes is None:
            self._planes = reference.hash_planes(kv_heads, head_dim, self.bits, self.seed, device)
        return self._planes

    def summary_spec(self, kv_heads: int, block_tokens: int, head_dim: int):
        return {
            "codes": ((kv_heads, block_tokens, self.bits // 8), torch.uint8),
            "norms": ((kv_heads, block_tokens), torch.float32),
        }

    def summarize(self, key_cache: torch.Tensor, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        planes = self._planes_for(key_cache.shape[1], key_cache.shape[3], key_cache.device)
        codes, norms = reference.key_codes(key_cache, blocks, planes)
        return {"codes": codes, "norms": norms}

    def logits(
        self, query: torch.Tensor, summaries: Mapping[str, torch.Tensor], block_tables: torch.Tensor, scale: float
    ) -> torch.Tensor:
        planes = self._planes_for(summaries["codes"].shape[1], query.shape[2], query.device)
        return reference.hash_logits(query, summaries["codes"], summaries["norms"], planes, block_tables, scale)
