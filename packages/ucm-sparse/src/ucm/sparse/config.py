"""The ``sparse`` settings: which algorithm, how many KV tokens a decode step may read, and when to re-select."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class SparseConfig:
    """Settings shared by every block-retrieval algorithm; ``options`` holds the algorithm's own.

    The budget is either ``budget_ratio`` (a share of the sequence's blocks, 1.0 = dense) or
    ``budget_tokens`` (a fixed number of tokens); sequences within the budget are read whole.
    """

    # Defaults from the quality study (docs/benchmarks/sparse-quality.md): key bounds keep exact
    # recall where a block's mean loses it, and choosing every step keeps it where reusing a choice
    # for several steps does not.
    algorithm: str = "key_bounds"
    budget_ratio: float | None = None
    budget_tokens: int | None = None
    sink_tokens: int = 1  # rounded up to whole blocks: at least the first block
    recent_tokens: int = 1  # rounded up to whole blocks: at least the block being written
    stride: int = 1  # decode steps between two selections of a sequence
    # stride > 1: a selection keeps ``pool`` times the budget's middle blocks and the block after each,
    # and every step chooses the budget among them with its own query (0: every step reads the
    # selection as it was made)
    pool: int = 0
    # spend about half of the budget's middle blocks on the block after each of the best-scoring
    # ones (text a block starts often runs on into the next), the whole read still within the budget
    successors: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.algorithm, str) or not self.algorithm:
            raise ValueError(f"sparse: 'algorithm' must be a plug-in name, got {self.algorithm!r}")
        if (self.budget_ratio is None) == (self.budget_tokens is None):
            raise ValueError("sparse: give exactly one of 'budget_ratio' (0 < r <= 1) and 'budget_tokens' (> 0)")
        if self.budget_ratio is not None and not (
            isinstance(self.budget_ratio, (int, float))
            and not isinstance(self.budget_ratio, bool)
            and 0 < self.budget_ratio <= 1
        ):
            raise ValueError(f"sparse: 'budget_ratio' must be in (0, 1], got {self.budget_ratio!r}")
        for name in ("budget_tokens", "sink_tokens", "recent_tokens", "stride", "pool"):
            value = getattr(self, name)
            if value is None and name == "budget_tokens":
                continue
            least = 0 if name in ("sink_tokens", "pool") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                kind = "a non-negative" if least == 0 else "a positive"
                raise ValueError(f"sparse: {name!r} must be {kind} integer, got {value!r}")
        if self.pool == 1:
            raise ValueError("sparse: 'pool' is a multiple of the budget: 0 (no pool) or at least 2, got 1")
        if self.pool and self.stride == 1:
            raise ValueError("sparse: 'pool' re-ranks a kept selection, so it needs 'stride' > 1")
        if not isinstance(self.successors, bool):
            raise ValueError(f"sparse: 'successors' must be true or false, got {self.successors!r}")
        if self.successors and self.pool:
            raise ValueError("sparse: a 'pool' already keeps each chosen block's successor: drop 'successors'")
        if not isinstance(self.options, dict):
            raise ValueError(f"sparse: 'options' must be a mapping, got {type(self.options).__name__}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparseConfig:
        if not isinstance(data, dict):
            raise ValueError(f"sparse: expected a mapping of settings, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            names = ", ".join(map(repr, unknown))
            raise ValueError(f"sparse: unknown setting(s) {names}; known: {', '.join(sorted(known))}")
        settings = dict(data)
        if "budget_ratio" not in settings and "budget_tokens" not in settings:
            settings["budget_ratio"] = 1.0 / 8
        return cls(**settings)

    def windows(self, block_tokens: int) -> tuple[int, int]:
        """Sink and recent windows in blocks (the recent window always holds the block being written)."""
        return math.ceil(self.sink_tokens / block_tokens), max(1, math.ceil(self.recent_tokens / block_tokens))

    def budget_blocks(self, num_blocks: int, block_tokens: int) -> int:
        """How many of a sequence's ``num_blocks`` blocks a decode step reads."""
        if self.budget_tokens is not None:
            wanted = math.ceil(self.budget_tokens / block_tokens)
        else:
            wanted = math.ceil(self.budget_ratio * num_blocks - 1e-9)
        sink, recent = self.windows(block_tokens)
        return min(num_blocks, max(wanted, sink + recent))

    def scan_blocks(self, num_blocks: int, block_tokens: int) -> int:
        """How many blocks a full scan chooses by score (the windows among them) before successors
        join them: the budget; with a pool, the windows and ``pool`` times the budget's middle
        blocks; with ``successors``, the windows and half of what the budget leaves after them and
        the sink's own successor, so that with every chosen block's successor the read stays
        within the budget. The one exception: a budget of just the two windows has no room for
        the sink's successor, and its read must skip the successors (``BlockRetrieval`` does)."""
        budget = self.budget_blocks(num_blocks, block_tokens)
        sink, recent = self.windows(block_tokens)
        if self.pool:
            return min(num_blocks, sink + recent + self.pool * (budget - sink - recent))
        if self.successors:
            return sink + recent + max(0, (budget - sink - recent - (1 if sink else 0)) // 2)
        return budget
