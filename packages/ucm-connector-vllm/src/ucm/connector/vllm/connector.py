"""``UcmConnector``: vLLM's KV connector interface over a UCM store.

Scheduler side: computes chunk keys for each new prompt, asks the store how many leading chunks
it holds beyond vLLM's own prefix hit, and plans per step which chunks to load (external hits)
and which to save (chunks that became fully computed this step).

Worker side: loads run in the store's native threads while the engine keeps stepping. A store
that can (``posix``) reads each chunk in small pieces and scatters them straight into the paged
cache; with any other store the chunks land in a staging buffer and are scattered once the task
has finished. The request is reported ready when its load is over. Saves copy the step's new
chunks out of the paged cache at the end of the step (the only thing the forward pass waits for)
and write them in the background.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ucm.connector.vllm import keys as chunk_keys
from ucm.connector.vllm.config import ConnectorConfig
from ucm.connector.vllm.host_memory import available_memory_bytes
from ucm.connector.vllm.metrics import UcmConnectorStats, UcmPromMetrics
from ucm.connector.vllm.paged import LayerwiseCopyIn, PagedKV, StagingPool, cpu_page_packing
from ucm.store import StoreError, open_store
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

try:
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
except ImportError:  # older vLLM (such as the one vllm-ascend pins) has no per-source hit metrics
    CacheHitSource = None

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("ucm.connector.vllm")

#: Default prewarm budget, at most: a hot set of system prompts and documents, without making every
#: engine start read tens of GiB from a store that many servers share (prewarm_bytes raises it).
DEFAULT_PREWARM_CAP = 4 << 30
#: Default bound on bytes copied out for saving and not yet in the store, at most.
DEFAULT_SAVE_BACKLOG_CAP = 4 << 30
#: Default size of the posix store's shared host-memory tier, at most (it also stays within a
#: quarter of the memory available and half the free space of its memory filesystem).
DEFAULT_SHARED_MEMORY_CAP = 4 << 30
#: Seconds between two warnings about skipped saves.
SKIP_WARNING_INTERVAL_S = 60.0
#: The hooks' time is reported once it adds up to this, or with the step's other stats.
STEP_SECONDS_REPORT_S = 0.001


def _step_hook(method):
    """Adds the hook's wall time to ``self._step_seconds``: the engine's step waits for every hook,
    the scheduler's (lookups, plans) and the worker's (copies, hand-offs to the store)."""

    @functools.wraps(method)
    def timed(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self._step_seconds += time.perf_counter() - started

    return timed


@dataclass
class ChunkJob:
    """Chunks of one request to move between the store and the paged cache."""

    req_id: str
    first_chunk: int  # index of keys[0] among the request's chunks
    keys: list[bytes]
    block_ids: list[int]  # the cache block holding each chunk
    chunk_in_block: list[int]  # which chunk of that block


@dataclass
class UcmConnectorMetadata(KVConnectorMetadata):
    loads: list[ChunkJob] = field(default_factory=list)
    saves: list[ChunkJob] = field(default_factory=list)
    sparse: Any = None  # the sparse algorithm's per-step metadata


@dataclass
class _RequestState:
    """Scheduler-side bookkeeping of one request."""

    request: Any
    keys: list[bytes]  # of the prompt's full chunks
    stored_chunks: int = 0  # leading chunks known to be in the store
    local_tokens: int = 0  # vLLM's own prefix hit, as last offered to get_num_new_matched_tokens
    loadable_chunks: int | None = None  # set once a load failed: chunks from here on are not offered again
    load: ChunkJob | None = None  # the last load planned, until its outcome is known
    load_sent: bool = False  # the load is in a step's metadata, so the next outputs tell its outcome


@dataclass
class _Transfer:
    """A store task in flight on the worker, with the staging memory it reads or fills (if any)."""

    job: ChunkJob
    task: Any
    started: float
    staging: torch.Tensor | None = None  # None: the store loads straight into the cache
    buffer: torch.Tensor | None = None  # the pool buffer under ``staging``
    copied: Any = None  # CUDA caches: the event after the device copy into ``staging`` (saves)


class UcmConnector(KVConnectorBase_V1):
    """Prefix cache beyond device memory: KV chunks persisted to, and loaded from, a UCM store."""

    _cache_hit_source = CacheHitSource.DISK if CacheHitSource is not None else None

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config, role, kv_cache_config)
        transfer = vllm_config.kv_transfer_config
        self.config = ConnectorConfig.from_extra_config(transfer.kv_connector_extra_config)
        self._saves_enabled = transfer.is_kv_producer
        self._loads_enabled = transfer.is_kv_consumer
        self._wait_for_commit = transfer.kv_role == "kv_producer"
        cache_config = vllm_config.cache_config
        self._model_dtype = vllm_config.model_config.dtype
        self._kv_cache_dtype = cache_config.cache_dtype
        self.block_tokens = cache_config.block_size
        self.chunk_tokens = self.config.chunk_tokens or self.block_tokens
        if self.block_tokens % self.chunk_tokens != 0:
            raise ValueError(
                f"UcmConnector: chunk_tokens {self.chunk_tokens} must divide the block size {self.block_tokens}"
            )
        parallel = vllm_config.parallel_config
        self.tp_size = parallel.tensor_parallel_size
        self.namespace = chunk_keys.namespace_digest(self._namespace_fields(vllm_config))
        store_config = self.config.resolved_store_config(num_shards=self.tp_size)
        if self.config.store == "posix":
            # Only the worker moves bytes; the scheduler's store only looks chunks up.
            if role == KVConnectorRole.SCHEDULER:
                store_config["shared_memory_bytes"] = 0
            elif store_config.get("shared_memory_bytes") is None:
                store_config["shared_memory_bytes"] = _default_shared_memory_bytes(store_config)
        self.store = open_store(self.config.store, store_config)
        self._warn_if_process_local(store_config, vllm_config.model_config.model)
        if role == KVConnectorRole.SCHEDULER and self._loads_enabled:
            self._warn_if_load_failures_fail(transfer.kv_load_failure_policy)
        self._stats = UcmConnectorStats()
        self._step_seconds = 0.0  # hooks' time not yet reported (vllm:ucm_step_seconds)
        # The shared tier's hits so far, for vllm:ucm_shared_memory_hits (None: no tier).
        self._tier_hits = 0 if store_config.get("shared_memory_bytes") and self.config.store == "posix" else None
        # Sparse attention: the scheduler side keeps its own instance; the worker side shares the
        # one its attention layers use (ucm.connector.vllm.sparse).
        self._sparse = None
        if self.config.sparse is not None:
            from ucm.connector.vllm import sparse

            self._sparse = (
                sparse.create_algorithm(self.config.sparse)
                if role == KVConnectorRole.SCHEDULER
                else sparse.worker_algorithm(vllm_config)
            )

        # scheduler side
        self._requests: dict[str, _RequestState] = {}
        self._pending_loads: list[ChunkJob] = []
        # worker side
        self._paged: PagedKV | None = None
        self._shard = 0
        self._loads: deque[_Transfer] = deque()
        self._saves: deque[_Transfer] = deque()
        self._save_backlog = 0  # bytes of the chunks in self._copying and self._saves
        self._save_backlog_limit = 0  # set in register_kv_caches
        self._skipped_since_warning = 0
        self._last_skip_warning = -math.inf
        # Requests that had a save skipped: request id -> the first chunk that may be missing from
        # the store. Saves past it are never reached by a prefix lookup, so they are skipped too; a
        # save that starts at or before it (a preempted request computes again from there) moves it
        # on. Dropped when the request finishes.
        self._save_gaps: dict[str, int] = {}
        self._finished_loads: set[str] = set()
        self._failed_blocks: set[int] = set()
        self._idle_step = False
        self._prewarm_reported = True  # until a prewarm starts (register_kv_caches)
        self._staging: StagingPool | None = None
        self._copy_stream = None  # CUDA caches: the side stream of the copies out of the cache
        self._copying: deque[_Transfer] = deque()  # CUDA saves whose copy out may still run
        self._layerwise: LayerwiseCopyIn | None = None  # CUDA synchronous loads, layer by layer

    # ==== shared ===========================================================================
    def _namespace_fields(self, vllm_config: VllmConfig) -> dict[str, Any]:
        """What changes the meaning of stored bytes. Block size, layout and TP size do not (docs/format.md)."""
        model = vllm_config.model_config
        cache_dtype = vllm_config.cache_config.cache_dtype
        return {
            "model": self.config.namespace or model.model,
            "revision": None if self.config.namespace else model.revision,
            "dtype": str(model.dtype),
            "cache_dtype": str(model.dtype) if cache_dtype == "auto" else str(cache_dtype),
            "layers": model.get_num_layers(vllm_config.parallel_config),
            "kv_heads": model.get_total_num_kv_heads(),
            "head_size": model.get_head_size(),
            "chunk_tokens": self.chunk_tokens,
        }

    @staticmethod
    def _warn_if_load_failures_fail(policy: str) -> None:
        """vLLM's own default ends a request whose load fails (a store restarted or a chunk evicted
        between lookup and load) with an error; with "recompute" it is a miss."""
        if policy == "fail":
            log.warning(
                'UcmConnector: kv_load_failure_policy is "fail", so a request whose chunks cannot be read '
                "(a shared store restarting, a chunk evicted or damaged after its lookup) ends with an error; "
                'set "kv_load_failure_policy": "recompute" in --kv-transfer-config to compute such chunks instead'
            )

    def _warn_if_process_local(self, store_config: dict[str, Any], model: str) -> None:
        """Warn about settings under which another process or a restart can never hit."""
        root = store_config.get("root")
        if isinstance(root, str) and not os.path.isabs(root):
            log.warning(
                "UcmConnector: store root %r is relative, so processes started elsewhere use another directory; "
                "give an absolute path",
                root,
            )
        if self.config.namespace is None and os.path.exists(model) and not os.path.isabs(model):
            log.warning(
                "UcmConnector: the model path %r is relative and part of the store keys, so an engine started "
                "from another directory (or with an absolute path) misses; give an absolute path or set "
                '"namespace" in kv_connector_extra_config',
                model,
            )
        if self.config.store == "memory" and not store_config.get("backend"):
            log.warning(
                "UcmConnector: the 'memory' store without a backend lives inside one process, so another "
                "engine process or a restart never hits it; add a backend, e.g. "
                '"store_config": {"capacity_bytes": ..., "backend": {"name": "posix", "config": {"root": ...}}}'
            )

    @property
    def requires_kv_delivery(self) -> bool:
        # A cache is best effort: a preempted request need not keep its in-flight output for us.
        return False

    def get_kv_connector_stats(self) -> UcmConnectorStats | None:
        # The hooks' time goes out with other stats, or once it adds up to STEP_SECONDS_REPORT_S:
        # most decode steps spend microseconds in the hooks, less than a stats object costs vLLM.
        if self._step_seconds and (not self._stats.is_empty() or self._step_seconds >= STEP_SECONDS_REPORT_S):
            self._stats.add(step_seconds=self._step_seconds)
            self._step_seconds = 0.0
        if self._stats.is_empty():
            return None
        if self._tier_hits is not None and "loaded_chunks" in self._stats.data:
            hits = self.store.shared_memory_hits()
            self._stats.add(shared_memory_hits=hits - self._tier_hits)
            self._tier_hits = hits
        stats, self._stats = self._stats, UcmConnectorStats()
        return stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> UcmConnectorStats:
        return UcmConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues) -> UcmPromMetrics:
        return UcmPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def wait_for_saves(self) -> None:
        """Worker side: return once every chunk handed to the store so far is committed (or has failed,
        which is logged and counted as at the end of a step).

        For callers that need the store complete while the engine is idle between requests: a tool
        that charges the background writes to the requests that caused them, or one that reads the
        store from another process next. The engine's steps never call it (its shutdown does);
        calling it during a step is not supported."""
        self._dump_copied(block=True)
        self._reap_saves(block=True)

    def shutdown(self) -> None:
        # Pending saves are committed first (a failed one is logged, as at the end of a step): an
        # engine that stops cleanly leaves everything it computed in the store.
        self.wait_for_saves()
        for transfer in list(self._loads):
            try:
                self.store.wait(transfer.task)
            except StoreError:
                pass
        self._loads.clear()
        self.store.close()

    # ==== scheduler side ===================================================================
    def _state(self, request: Request) -> _RequestState | None:
        state = self._requests.get(request.request_id)
        if state is not None:
            return state
        if request.prompt_token_ids is None or getattr(request, "mm_features", None):
            return None  # prompt embeddings and multimodal inputs are not keyed by their tokens alone
        lora = request.lora_request.lora_name if request.lora_request is not None else None
        seed = chunk_keys.request_seed(self.namespace, request.cache_salt, lora)
        state = _RequestState(request, chunk_keys.chunk_keys(seed, request.prompt_token_ids, self.chunk_tokens))
        self._requests[request.request_id] = state
        if self._sparse is not None:
            self._sparse.request_begin(request.request_id, len(request.prompt_token_ids))
        return state

    @_step_hook
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        state = self._state(request)
        if state is None or not state.keys:
            return 0, False
        state.stored_chunks = self.store.lookup_prefix(state.keys)
        if state.loadable_chunks is not None:
            state.stored_chunks = min(state.stored_chunks, state.loadable_chunks)
        state.local_tokens = num_computed_tokens
        self._stats.add(lookups=1, lookup_chunks=len(state.keys), hit_chunks=state.stored_chunks)
        if not self._loads_enabled:
            return 0, False
        # The last prompt token is always computed (it yields the first output token).
        loadable = min(state.stored_chunks * self.chunk_tokens, request.num_tokens - 1)
        loadable -= loadable % self.chunk_tokens
        external = loadable - num_computed_tokens
        if external <= 0:
            return 0, False
        return external, self.config.load_async

    @_step_hook
    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if num_external_tokens == 0:
            return  # nothing to load (also the second call for an asynchronous load)
        state = self._requests[request.request_id]
        first = state.local_tokens // self.chunk_tokens
        last = (state.local_tokens + num_external_tokens) // self.chunk_tokens
        state.load = self._job(request.request_id, state.keys, blocks.get_block_ids()[0], first, last)
        state.load_sent = False
        self._pending_loads.append(state.load)

    @_step_hook
    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        # A chunk that failed to load is recomputed by vLLM; never offer it (or what follows) again,
        # or a request whose first chunk cannot be read would be readmitted and fail forever.
        invalid = connector_output.invalid_block_ids
        finished = connector_output.finished_recving or set()
        for state in self._requests.values():
            job = state.load
            if job is None or not state.load_sent:
                continue
            failed = [i for i, block in enumerate(job.block_ids) if block in invalid] if invalid else []
            if failed:
                state.loadable_chunks = job.first_chunk + failed[0]
            # A synchronous load ran in the step these outputs are from; an asynchronous one is
            # over once reported finished.
            if failed or not self.config.load_async or job.req_id in finished:
                state.load = None

    def _job(self, req_id: str, keys: list[bytes], block_ids: list[int], first: int, last: int) -> ChunkJob:
        per_block = self.block_tokens // self.chunk_tokens
        chunks = range(first, last)
        return ChunkJob(
            req_id,
            first,
            keys[first:last],
            [block_ids[c // per_block] for c in chunks],
            [c % per_block for c in chunks],
        )

    @_step_hook
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = UcmConnectorMetadata(loads=self._pending_loads)
        self._pending_loads = []
        if self._sparse is not None:
            meta.sparse = self._sparse.build_step_metadata(scheduler_output.num_scheduled_tokens)
        for job in meta.loads:
            state = self._requests.get(job.req_id)
            if state is not None:
                state.load_sent = True
        if not self._saves_enabled:
            return meta
        block_state = scheduler_output.kv_connector_block_state
        scheduled = [(r.req_id, r.num_computed_tokens) for r in scheduler_output.scheduled_new_reqs]
        cached = scheduler_output.scheduled_cached_reqs
        scheduled += list(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
        for req_id, computed in scheduled:
            state = self._requests.get(req_id)
            if state is None or block_state is None:
                continue
            # Chunks before `computed` are in the cache; any beyond it that the store was thought to
            # hold are being recomputed (a failed load, or the last chunk), so save them again:
            # the store skips chunks it already holds.
            state.stored_chunks = min(state.stored_chunks, computed // self.chunk_tokens)
            done = computed + scheduler_output.num_scheduled_tokens.get(req_id, 0)
            full = min(done // self.chunk_tokens, len(state.keys))
            if full <= state.stored_chunks:
                continue
            block_ids = block_state.get_block_ids(req_id)
            if block_ids is None:
                continue
            meta.saves.append(self._job(req_id, state.keys, block_ids[0], state.stored_chunks, full))
            state.stored_chunks = full
        return meta

    @_step_hook
    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # Saves are copied out of the cache within their step, so the blocks can be freed at once.
        self._requests.pop(request.request_id, None)
        if self._sparse is not None:
            self._sparse.request_finished(request.request_id)
        return False, None

    # ==== worker side ======================================================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.platforms import current_platform

        first = next(iter(kv_caches.values()))
        if isinstance(first, (tuple, list)):
            layout = "split"  # vllm-ascend: a (K, V) pair per layer
        else:
            layout = "cpu" if current_platform.is_cpu() else "flash"
        packing = "strided"
        if layout == "cpu":  # vLLM's CPU attention picks its page packing from these (cpu_attn.py)
            head_size = first.shape[-1] // 2
            packing = cpu_page_packing(self._model_dtype, self.block_tokens, head_size, self._kv_cache_dtype)
        self._paged = PagedKV(kv_caches, layout, self.chunk_tokens, packing)
        if self._sparse is not None and self._paged.packing != "strided":
            raise RuntimeError(
                "UcmConnector: sparse attention reads K through strided views, and vLLM packs this CPU cache for "
                "AMX tiles (bf16); run with --dtype float16 or float32 for sparse attention here"
            )
        self._staging = StagingPool(self._paged)
        if self._paged.on_device:
            # High priority: the copy's resident kernel gets its few SMs even while compute is queued.
            self._copy_stream = self._paged.api.Stream(device=self._paged.device, priority=-1)
            self._layerwise = LayerwiseCopyIn(self._paged, self._copy_stream)
        if self._sparse is not None:
            views = dict(zip(self._paged.layer_names, self._paged.views, strict=True))
            self._sparse.register_kv_caches(views, self._paged.block_tokens)
        if self.tp_size > 1:
            from vllm.distributed import get_tensor_model_parallel_rank

            self._shard = get_tensor_model_parallel_rank()
        limit = self.config.save_backlog_bytes
        if limit is None:
            # Each tensor-parallel rank holds its own backlog: together they take at most the quarter.
            share = available_memory_bytes() // (4 * max(1, self.tp_size))
            limit = min(share, DEFAULT_SAVE_BACKLOG_CAP) or DEFAULT_SAVE_BACKLOG_CAP
        self._save_backlog_limit = limit
        self._start_prewarm(kv_caches)

    def _start_prewarm(self, kv_caches: dict[str, Any]) -> None:
        """Read the store's most recent chunks back into memory in the background, so the first loads
        after a (re)start are served from memory rather than the disk or the network."""
        if not self._loads_enabled:
            return
        budget = self.config.prewarm_bytes
        if budget is None:
            budget = min(_kv_cache_bytes(kv_caches), available_memory_bytes() // 4, DEFAULT_PREWARM_CAP)
        if budget > 0:
            self.store.prewarm(budget, self._shard if self.tp_size > 1 else None)
            self._prewarm_reported = False

    @_step_hook
    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self._idle_step = forward_context is None or forward_context.attn_metadata is None
        if self._copying:
            # Blocks still being copied out may be freed and reused by this step: its compute waits
            # for those copies on the device (the host does not wait).
            self._paged.api.current_stream(self._paged.device).wait_event(self._copying[-1].copied)
        meta = self._get_connector_metadata()
        if self._sparse is not None:
            self._sparse.step_begin(meta.sparse)
            for job in meta.loads:  # the blocks' old content (and any summary of it) is gone
                blocks = torch.tensor(job.block_ids, dtype=torch.long)
                for name in self._paged.layer_names:
                    self._sparse.blocks_written(name, blocks)
        for job in meta.loads:
            shards = [self._shard] * len(job.keys)
            started = time.perf_counter()
            if self.store.can_load_into and not self._paged.on_device:
                task = self.store.load_into(job.keys, self._paged.target(job.block_ids, job.chunk_in_block), shards)
                self._loads.append(_Transfer(job, task, started))
                continue
            staging, buffer = self._staging.take(len(job.keys))
            task = self.store.load(job.keys, self._paged.chunk_buffers(staging), shards)
            self._loads.append(_Transfer(job, task, started, staging, buffer))
        if not self.config.load_async:
            while self._loads:  # a synchronous load is not reported as a finished receive
                self._finish_load(self._loads.popleft(), report=False)

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Host caches: synchronous loads finish in start_load_kv, asynchronous ones before their
        # request runs. CUDA caches: a synchronous load's copy into this layer must be over first.
        # Called once per layer and step: timed only when there is something to wait for.
        if self._layerwise is not None:
            started = time.perf_counter()
            self._layerwise.wait_layer(layer_name)
            self._step_seconds += time.perf_counter() - started

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        pass  # chunks are copied out once per step, in wait_for_save

    @_step_hook
    def wait_for_save(self) -> None:
        if self._layerwise is not None:
            self._layerwise.wait_all()  # layers the forward pass did not announce
        if not self.has_connector_metadata():
            return
        if self._sparse is not None:
            self._sparse.step_end()
        for job in self._get_connector_metadata().saves:
            nbytes = len(job.keys) * self._paged.chunk_bytes
            if not self._room_to_save(job, nbytes):
                continue
            started = time.perf_counter()
            staging, buffer = self._staging.take(len(job.keys))
            if self._paged.on_device:
                # The copy out runs on a side stream once the compute queued so far has written the
                # KV; the forward pass goes on, and the store gets the chunks when the copy is over.
                self._copy_stream.wait_stream(self._paged.api.current_stream(self._paged.device))
                self._paged.copy_async(True, job.block_ids, job.chunk_in_block, staging, self._copy_stream)
                copied = self._paged.api.Event()
                copied.record(self._copy_stream)
                self._copying.append(_Transfer(job, None, started, staging, buffer, copied))
                self._save_backlog += nbytes
                continue
            self._paged.gather(job.block_ids, job.chunk_in_block, staging)
            task = self.store.dump(job.keys, self._paged.chunk_buffers(staging), [self._shard] * len(job.keys))
            self._saves.append(_Transfer(job, task, started, staging, buffer))
            self._save_backlog += nbytes
        self._dump_copied(block=self._wait_for_commit)
        # A producer answers only once its chunks are committed, so a consumer started after the
        # reply always finds them.
        self._reap_saves(block=self._wait_for_commit)

    def _room_to_save(self, job: ChunkJob, nbytes: int) -> bool:
        """Whether to save ``job`` (``nbytes`` of chunks) now; counts it as skipped when the store is
        too far behind, or when it lies past a gap an earlier skip left in its request. A job is
        otherwise taken when nothing is in flight, so one prefill larger than the bound is still saved."""
        if self._wait_for_commit:
            return True
        gap = self._save_gaps.get(job.req_id)
        if (gap is None or job.first_chunk <= gap) and (
            not self._save_backlog or self._save_backlog + nbytes <= self._save_backlog_limit
        ):
            if gap is not None:  # this save reaches back to the gap: the saved prefix now ends after it
                self._save_gaps[job.req_id] = max(gap, job.first_chunk + len(job.keys))
            return True
        self._save_gaps[job.req_id] = job.first_chunk if gap is None else min(gap, job.first_chunk)
        self._stats.add(save_skipped=len(job.keys))
        self._skipped_since_warning += len(job.keys)
        self._warn_skipped_saves()
        return False

    def _warn_skipped_saves(self) -> None:
        """Logs the chunks skipped since the last warning, at most once a minute."""
        now = time.monotonic()
        if self._skipped_since_warning and now - self._last_skip_warning >= SKIP_WARNING_INTERVAL_S:
            log.warning(
                "UcmConnector: %d chunk(s) were not saved: the store was behind by more than save_backlog_bytes "
                "(%.0f MiB), or they followed chunks skipped for that; they will be recomputed when needed",
                self._skipped_since_warning,
                self._save_backlog_limit / (1 << 20),
            )
            self._last_skip_warning, self._skipped_since_warning = now, 0

    def _dump_copied(self, block: bool) -> None:
        """CUDA caches: hand the chunks whose copy out of the device is over to the store."""
        while self._copying and (block or self._copying[0].copied.query()):
            transfer = self._copying.popleft()
            transfer.copied.synchronize()
            job = transfer.job
            transfer.task = self.store.dump(
                job.keys, self._paged.chunk_buffers(transfer.staging), [self._shard] * len(job.keys)
            )
            self._saves.append(transfer)

    def _reap_saves(self, block: bool) -> None:
        while self._saves and (block or self.store.check(self._saves[0].task)):
            transfer = self._saves.popleft()
            count = len(transfer.job.keys)
            self._save_backlog -= count * self._paged.chunk_bytes
            try:
                self.store.wait(transfer.task)
                failed = 0
            except StoreError as exc:
                failed = len(exc.ids)
                log.warning(
                    "UcmConnector: %d chunk(s) of request %s were not saved: %s", failed, transfer.job.req_id, exc
                )
            self._stats.add(
                saved_chunks=count - failed,
                save_failures=failed,
                saved_bytes=(count - failed) * self._paged.chunk_bytes,
                save_seconds=time.perf_counter() - transfer.started,
            )
            self._staging.give(transfer.buffer)

    def _finish_load(self, transfer: _Transfer, report: bool = True) -> None:
        job = transfer.job
        failed: set[bytes] = set()
        try:
            self.store.wait(transfer.task)
        except StoreError as exc:
            failed = set(exc.ids)
            log.warning(
                "UcmConnector: %d chunk(s) of request %s failed to load and are recomputed: %s",
                len(failed),
                job.req_id,
                exc,
            )
        good = [i for i, key in enumerate(job.keys) if key not in failed]
        copied_in = None
        if good and transfer.staging is not None:
            copied_in = self._copy_in(job, good, transfer.staging, before_forward=not report)
        # A chunk loaded straight into the cache may have left bytes there before it failed: its
        # whole block is reported, so vLLM recomputes it.
        self._failed_blocks.update(job.block_ids[i] for i, key in enumerate(job.keys) if key in failed)
        self._stats.add(
            loaded_chunks=len(good),
            load_failures=len(failed),
            loaded_bytes=len(good) * self._paged.chunk_bytes,
            load_seconds=time.perf_counter() - transfer.started,
        )
        if transfer.buffer is not None:
            self._staging.give(transfer.buffer, copied_in)
        if report:
            self._finished_loads.add(job.req_id)

    def _copy_in(self, job: ChunkJob, good: list[int], staging: torch.Tensor, before_forward: bool) -> Any:
        """Copy a staged load into the cache; return the device event after it (None on the host)."""
        if not self._paged.on_device:
            if len(good) < len(job.keys):
                staging = staging.index_select(2, torch.tensor(good, dtype=torch.long))
            self._paged.scatter([job.block_ids[i] for i in good], [job.chunk_in_block[i] for i in good], staging)
            return None
        # Device caches copy failed chunks too: their blocks are reported and recomputed before
        # anything reads them.
        if before_forward:
            # A synchronous load, before this step's forward pass: layer by layer, so each layer's
            # compute waits only for its own copy.
            return self._layerwise.start(job.block_ids, job.chunk_in_block, staging)
        # On the compute stream, so every later forward pass reads the chunks.
        stream = self._paged.api.current_stream(self._paged.device)
        self._paged.copy_async(False, job.block_ids, job.chunk_in_block, staging, stream)
        copied_in = self._paged.api.Event()
        copied_in.record(stream)
        return copied_in

    @_step_hook
    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if not self._prewarm_reported:
            self._report_prewarm()
        self._dump_copied(block=False)
        self._reap_saves(block=False)
        self._warn_skipped_saves()  # skips counted after the last warning are not left unlogged
        for req_id in finished_req_ids:
            self._save_gaps.pop(req_id, None)
        # On a step with nothing to compute, waiting for the oldest load costs nothing.
        while self._loads and (self.store.check(self._loads[0].task) or self._idle_step):
            self._finish_load(self._loads.popleft())
            self._idle_step = False
        done, self._finished_loads = self._finished_loads, set()
        return None, done or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def _report_prewarm(self) -> None:
        stats = self.store.prewarm_stats()
        if stats is None or not stats["running"]:
            self._prewarm_reported = True
        if stats is not None and not stats["running"] and stats["files"]:
            log.info(
                "UcmConnector: prewarm read %.1f MiB (%d files) of the store's most recent chunks in %.2f s",
                stats["bytes"] / (1 << 20),
                stats["files"],
                stats["seconds"],
            )


def _kv_cache_bytes(kv_caches: dict[str, Any]) -> int:
    """Bytes of the engine's KV cache (layers that share one tensor counted once)."""
    seen: dict[int, int] = {}
    for cache in kv_caches.values():
        for tensor in cache if isinstance(cache, (tuple, list)) else (cache,):
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _default_shared_memory_bytes(store_config: dict[str, Any]) -> int:
    """The shared tier's default size: at most DEFAULT_SHARED_MEMORY_CAP, a quarter of the memory
    available, and half the free space of its memory filesystem (other programs use it too)."""
    from ucm.store.posix import shared_memory_dir

    try:
        fs = os.statvfs(shared_memory_dir(store_config.get("shared_memory_dir")))
    except OSError:
        return 0  # no memory filesystem there: no tier
    return min(DEFAULT_SHARED_MEMORY_CAP, available_memory_bytes() // 4, fs.f_bavail * fs.f_frsize // 2)
