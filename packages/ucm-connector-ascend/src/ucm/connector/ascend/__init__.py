"""UCM's KV connector on Ascend NPUs (vllm-ascend).

``--kv-transfer-config '{"kv_connector": "UcmAscendConnector", "kv_role": "kv_both",
"kv_load_failure_policy": "recompute"}'``, registered by this distribution's vLLM plug-in. See
docs/ascend.md.
"""

from __future__ import annotations

from typing import Any

__all__ = ["UcmAscendConnector"]


def __getattr__(name: str) -> Any:
    if name == "UcmAscendConnector":
        from ucm.connector.ascend.connector import UcmAscendConnector

        return UcmAscendConnector
    raise AttributeError(name)
