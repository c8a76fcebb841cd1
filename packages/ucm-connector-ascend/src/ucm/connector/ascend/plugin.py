"""The ``vllm.general_plugins`` entry point: makes ``"kv_connector": "UcmAscendConnector"`` resolvable.

vllm-ascend registers ``UCMConnector`` for its own integration; this name does not clash with it.
"""

from __future__ import annotations

CONNECTOR_NAME = "UcmAscendConnector"


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, "ucm.connector.ascend", CONNECTOR_NAME)
