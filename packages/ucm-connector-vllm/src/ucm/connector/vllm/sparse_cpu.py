"""vLLM's CPU attention backend with sparse decode: registered in place of ``CPU_ATTN``.

The implementation is vLLM's own with one change. Before a layer's attention, the decode rows of
the batch (one query token each) are shown to the configured algorithm, which may answer with a
block table and lengths naming only the blocks to read; vLLM's kernel then runs on those.
Prefill rows, the cache update and the kernel itself are vLLM's. Without a ``sparse`` section in
``kv_connector_extra_config`` every call goes straight to vLLM's implementation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ucm.connector.vllm.sparse import worker_algorithm
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl


class SparseCpuImpl(CPUAttentionBackendImpl):
    """vLLM's CPU attention, with decode rows reading only the blocks the sparse algorithm chose."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from vllm.config import get_current_vllm_config

        vllm_config = get_current_vllm_config()
        self._sparse = worker_algorithm(vllm_config) if self.attn_type == AttentionType.DECODER else None
        if self._sparse is not None:
            if self.sliding_window not in (None, -1):
                raise ValueError("UcmConnector: sparse attention does not apply to sliding-window attention layers")
            if self.alibi_slopes is not None or self.sinks is not None:
                raise ValueError("UcmConnector: sparse attention does not support ALiBi or attention-sink models")
            if self.is_fp8_kv_cache:
                raise ValueError(
                    f"UcmConnector: sparse attention does not support an fp8 KV cache (kv_cache_dtype "
                    f"{self.kv_cache_dtype!r}) yet: its block summaries would read scaled bytes as keys"
                )
            if self.kv_sharing_target_layer_name is not None:
                raise ValueError(
                    "UcmConnector: sparse attention does not support layers that share another layer's KV cache"
                )

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if self._sparse is not None:
            slots = slot_mapping[slot_mapping >= 0]
            block_tokens = kv_cache.shape[2]
            self._sparse.blocks_written(layer.layer_name, torch.unique(slots // block_tokens))

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args: Any, **kwargs: Any):
        if self._sparse is None or attn_metadata is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        metadata = self._sparse_metadata(layer, query, attn_metadata) or attn_metadata
        result = super().forward(layer, query, key, value, kv_cache, metadata, output, *args, **kwargs)
        self._sparse.attention_finished(layer.layer_name, output)
        return result

    def _sparse_metadata(self, layer, query: torch.Tensor, metadata):
        """The metadata with decode rows reading only their chosen blocks, or None when all read everything."""
        starts = metadata.query_start_loc
        decode = ((starts[1:] - starts[:-1]) == 1).nonzero().flatten()
        if decode.numel() == 0:
            return None
        chosen = self._sparse.attention_begin(
            layer.layer_name,
            query[starts[decode].long()],
            metadata.block_table[decode],
            metadata.seq_lens[decode],
            self.scale,
        )
        if chosen is None:
            return None
        from vllm import _custom_ops as ops
        from vllm import envs

        block_table = metadata.block_table.clone()
        seq_lens = metadata.seq_lens.clone()
        block_table[decode] = chosen[0].to(block_table.dtype)
        seq_lens[decode] = chosen[1].to(seq_lens.dtype)
        # vLLM's kernel plans its work from the lengths: plan again for the shorter ones.
        scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=starts.numel() - 1,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_size,
            seq_lens=seq_lens,
            dtype=query.dtype,
            query_start_loc=starts,
            causal=metadata.causal,
            sliding_window_size=-1,
            isa=layer.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            dynamic_causal=metadata.dynamic_causal,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        return dataclasses.replace(
            metadata,
            block_table=block_table,
            seq_lens=seq_lens,
            max_seq_len=int(seq_lens.max()),
            scheduler_metadata=scheduler_metadata,
        )


class SparseCpuBackend(CPUAttentionBackend):
    """``CPU_ATTN`` with :class:`SparseCpuImpl` (everything else is vLLM's)."""

    @staticmethod
    def get_impl_cls():
        return SparseCpuImpl
