"""The ``vllm.general_plugins`` entry point: makes ``"kv_connector": "UcmConnector"`` resolvable and,
with ucm-sparse installed, puts the sparse CPU attention backend in place of ``CPU_ATTN``.

vLLM runs it once in every process it starts; it only records where classes live, so the
connector and the backend (and torch-heavy code) are imported only where they are used.
"""

from __future__ import annotations

import importlib.util

CONNECTOR_NAME = "UcmConnector"
SPARSE_CPU_BACKEND = "ucm.connector.vllm.sparse_cpu.SparseCpuBackend"


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, "ucm.connector.vllm", CONNECTOR_NAME)
    register_sparse_backends()


def register_sparse_backends() -> None:
    """The sparse backend passes through to vLLM's unless a ``sparse`` section is configured."""
    if importlib.util.find_spec("ucm.sparse") is None:
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return  # the CUDA backend (FlashAttention with sparse decode) is not built yet: docs/sparse.md
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, SPARSE_CPU_BACKEND)
