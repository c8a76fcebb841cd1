"""The native build's backend options: asking for a toolkit that is missing fails, naming it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

STORE_PACKAGE = Path(__file__).resolve().parents[2] / "packages" / "ucm-store"


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_ascend_on_without_cann_names_the_toolkit_and_the_fix(tmp_path):
    if Path("/usr/local/Ascend").exists():
        pytest.skip("this machine has an Ascend toolkit")
    result = subprocess.run(
        ["cmake", "-S", str(STORE_PACKAGE), "-B", str(tmp_path), "-DUCM_WITH_ASCEND=ON", "-DUCM_WITH_CUDA=OFF"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin:/usr/local/bin"},
        timeout=120,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "UCM_WITH_ASCEND=ON but the Ascend CANN toolkit" in output
    assert "-DUCM_WITH_ASCEND=OFF" in output
