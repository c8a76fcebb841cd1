"""The ``vllm.general_plugins`` entry point: makes ``"kv_connector": "UcmConnector"`` resolvable.

vLLM runs it once in every process it starts; it only records where the class lives, so the
connector (and torch-heavy code) is imported only where a connector is created.
"""

from __future__ import annotations

CONNECTOR_NAME = "UcmConnector"


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, "ucm.connector.vllm", CONNECTOR_NAME)
