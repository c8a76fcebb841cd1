"""GPU tests: run on a machine with a CUDA device and a ucm-store built with the CUDA path.

Everything here is marked ``gpu`` and skipped elsewhere; the README's test command deselects the
marker. Results from the lent H200 are recorded in docs/benchmarks/gpu.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU and the CUDA transfer path (skipped without them)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.gpu)
