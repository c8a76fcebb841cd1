"""``UcmSparseBase``: the contract between an engine integration and a sparse-attention algorithm.

An engine integration (``ucm.connector.vllm`` for vLLM) calls the hooks; an algorithm overrides
the ones it needs. Nothing here knows the engine: the worker-side hooks see KV caches as K and V
views ``[num_blocks, kv_heads, block_tokens, head_dim]`` (any strides) and decode steps as
queries, block tables and sequence lengths (``ucm.sparse.kernels.reference`` gives the shapes).

Scheduler side (the engine's scheduler process):
    request_begin / request_finished, build_step_metadata (what the worker needs this step),
    num_slots_needed (how many KV slots a request must hold on the device).
Worker side (each model process):
    register_kv_caches, step_begin / step_end, blocks_written (KV written this step: summaries of
    those blocks are stale), attention_begin (choose what a layer's decode rows read) and
    attention_finished.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ucm.sparse.config import SparseConfig


class UcmSparseBase:
    """Base of every sparse-attention algorithm; the default of every hook is dense attention."""

    def __init__(self, config: SparseConfig):
        self.config = config

    # ---- scheduler side -------------------------------------------------------------------
    def request_begin(self, request_id: str, prompt_tokens: int) -> None:
        """A request was seen for the first time."""

    def request_finished(self, request_id: str) -> None:
        """A request is over: drop what was kept for it."""

    def build_step_metadata(self, scheduled_tokens: Mapping[str, int]) -> Any:
        """What the workers need for this step (request id -> tokens scheduled); sent with the step."""
        return None

    def num_slots_needed(self, request_id: str, num_tokens: int) -> int:
        """KV slots a request of ``num_tokens`` tokens must hold on the device (dense: all of them).

        An algorithm that keeps unselected blocks off the device answers less.
        """
        return num_tokens

    # ---- worker side ----------------------------------------------------------------------
    def register_kv_caches(self, layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]], block_tokens: int) -> None:
        """The engine's KV caches: layer name -> (K view, V view), each ``[blocks, kv_heads, block_tokens, D]``."""

    def step_begin(self, metadata: Any) -> None:
        """A step starts; ``metadata`` is what :meth:`build_step_metadata` returned for it."""

    def blocks_written(self, layer: str, blocks: torch.Tensor) -> None:
        """The step writes KV into physical ``blocks`` of ``layer`` (their old content is gone)."""

    def attention_begin(
        self, layer: str, query: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Choose what ``layer``'s decode rows read.

        ``query``: ``[rows, q_heads, D]``; ``block_tables``: ``[rows, max_blocks]``; ``seq_lens``:
        ``[rows]``. Returns ``(block_tables, seq_lens)`` to read instead (the chosen blocks, in order),
        or None to read everything.
        """
        return None

    def attention_finished(self, layer: str, output: torch.Tensor) -> None:
        """``layer``'s attention for this step is done; ``output`` is its result."""

    def step_end(self) -> None:
        """The step is over."""
