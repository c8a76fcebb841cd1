"""Sparse attention inside vLLM: the ``sparse`` settings and each process's algorithm instance.

Sparse attention is switched on by a ``sparse`` section in UcmConnector's
``kv_connector_extra_config`` (docs/sparse.md). A worker process has one algorithm instance,
shared by every layer's attention implementation (``sparse_cpu``, which asks for it while the
model is built) and by ``UcmConnector`` (which registers the KV caches with it and hands it the
scheduler's per-step metadata).

What vLLM offers no hook for (docs/sparse.md): attention metadata carries no request ids, so a
sequence is known by the block it is writing; and a request cannot hold fewer KV slots than its
length, so ``num_slots_needed`` is not acted on yet.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("ucm.connector.vllm")

_worker_algorithm: Any = None
_worker_config: Any = None


def sparse_settings(vllm_config: Any) -> dict[str, Any] | None:
    """The ``sparse`` section of UcmConnector's extra config, or None."""
    transfer = getattr(vllm_config, "kv_transfer_config", None)
    if transfer is None or transfer.kv_connector != "UcmConnector":
        return None
    return (transfer.kv_connector_extra_config or {}).get("sparse")


def create_algorithm(settings: dict[str, Any]):
    """A fresh instance of the configured algorithm (a clear error for bad settings)."""
    try:
        import ucm.sparse
    except ImportError as exc:
        raise ValueError(
            "UcmConnector: kv_connector_extra_config has a 'sparse' section but ucm-sparse is not installed "
            "(pip install ucm-connector-vllm[sparse])"
        ) from exc
    return ucm.sparse.create(settings)


def worker_algorithm(vllm_config: Any):
    """This worker process's algorithm instance (created on first use), or None without a ``sparse`` section."""
    global _worker_algorithm, _worker_config
    settings = sparse_settings(vllm_config)
    if settings is None:
        return None
    if _worker_algorithm is None or _worker_config != settings:
        _worker_algorithm, _worker_config = create_algorithm(settings), dict(settings)
        log.info("UcmConnector: sparse attention %s with %s", type(_worker_algorithm).__name__, settings)
    return _worker_algorithm
