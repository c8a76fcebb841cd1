"""``UcmAscendConnector``: the vLLM connector's logic, unchanged, on vllm-ascend.

Everything device-neutral lives in ``ucm.connector.vllm``: keys, the store, scheduling, staging,
streams and events (through ``torch.npu``, which torch-npu provides with the same interface as
``torch.cuda``), and the page views, including vllm-ascend's (K, V) pair per layer. What this
class adds is a check at start-up that the ACL transfer path is there, so an engine without it
fails at once with a message naming the fix rather than at its first load.
"""

from __future__ import annotations

from typing import Any

from ucm.connector.vllm.connector import UcmConnector


def require_ascend_transfer_path() -> None:
    try:
        from ucm.store import _ascend  # noqa: F401
    except ImportError:
        raise RuntimeError(
            "UcmAscendConnector: ucm-store was built without the Ascend transfer path (ucm.store._ascend); source "
            "the CANN toolkit's set_env.sh and reinstall ucm-store with -Ccmake.define.UCM_WITH_ASCEND=ON"
        ) from None


class UcmAscendConnector(UcmConnector):
    """UCM's prefix cache on Ascend NPUs; see :class:`ucm.connector.vllm.UcmConnector`."""

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        first = next(iter(kv_caches.values()))
        tensor = first[0] if isinstance(first, (tuple, list)) else first
        if tensor.device.type == "npu":
            require_ascend_transfer_path()
        super().register_kv_caches(kv_caches)
