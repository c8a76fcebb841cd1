"""What the connector reports: a stats object vLLM aggregates, and its Prometheus counters.

Each worker (and the scheduler) returns a ``UcmConnectorStats`` per step; vLLM merges them and
hands the dict to ``UcmPromMetrics.observe`` in the front end, which feeds counters exposed at the
server's ``/metrics`` (names start with ``vllm:ucm_``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
from vllm.v1.metrics.utils import create_metric_per_engine

# stats key -> (metric name, help text)
COUNTERS = {
    "lookups": ("vllm:ucm_lookups", "Prompts looked up in the UCM store"),
    "lookup_chunks": ("vllm:ucm_lookup_chunks", "Chunks looked up in the UCM store"),
    "hit_chunks": ("vllm:ucm_hit_chunks", "Leading chunks found in the UCM store"),
    "loaded_chunks": ("vllm:ucm_loaded_chunks", "Chunks loaded from the UCM store"),
    "loaded_bytes": ("vllm:ucm_loaded_bytes", "Bytes loaded from the UCM store"),
    "load_seconds": ("vllm:ucm_load_seconds", "Seconds spent loading from the UCM store (submit to ready)"),
    "shared_memory_hits": (
        "vllm:ucm_shared_memory_hits",
        "Chunks loaded from the posix store's shared host-memory tier rather than its files",
    ),
    "load_failures": ("vllm:ucm_load_failures", "Chunks whose load failed and were recomputed"),
    "saved_chunks": ("vllm:ucm_saved_chunks", "Chunks saved to the UCM store"),
    "saved_bytes": ("vllm:ucm_saved_bytes", "Bytes saved to the UCM store"),
    "save_seconds": ("vllm:ucm_save_seconds", "Seconds spent saving to the UCM store (submit to committed)"),
    "save_failures": ("vllm:ucm_save_failures", "Chunks that could not be saved"),
    "step_seconds": (
        "vllm:ucm_step_seconds",
        "Seconds the engine's steps spent in the connector: the scheduler's lookups and plans, the workers' "
        "copies out of the KV cache, hand-offs to the store and synchronous loads (summed over the workers)",
    ),
    "save_skipped": (
        "vllm:ucm_save_skipped",
        "Chunks not saved because the store was behind by save_backlog_bytes",
    ),
}


@dataclass
class UcmConnectorStats(KVConnectorStats):
    def add(self, **values: float) -> None:
        for key, value in values.items():
            self.data[key] = self.data.get(key, 0) + value

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> UcmConnectorStats:
        self.add(**other.data)
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not self.data


class UcmPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {
            key: create_metric_per_engine(
                self._counter_cls(name=name, documentation=doc, labelnames=labelnames), per_engine_labelvalues
            )
            for key, (name, doc) in COUNTERS.items()
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, value in transfer_stats_data.items():
            counters = self._counters.get(key)
            if counters is not None and value:
                counters[engine_idx].inc(value)
