"""UCM's vLLM KV connector.

Use it with ``--kv-transfer-config '{"kv_connector": "UcmConnector", "kv_role": "kv_both",
"kv_load_failure_policy": "recompute"}'`` (registered by this distribution's vLLM plug-in), or
with ``"kv_connector_module_path": "ucm.connector.vllm"``. See docs/connector.md.
"""

from __future__ import annotations

from typing import Any

__all__ = ["UcmConnector"]


def __getattr__(name: str) -> Any:
    # Imported on first use: vLLM resolves the class in processes that never create a connector.
    if name == "UcmConnector":
        from ucm.connector.vllm.connector import UcmConnector

        return UcmConnector
    raise AttributeError(name)
