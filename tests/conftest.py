"""Fixtures shared by the test folders: benchmarks/ and tests/store on the import path, and the tiny model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# benchmarks/: models.py builds the model, servers.py starts processes, and tests/benchmarks imports the
# benchmark scripts themselves. tests/store: the Redis server helper the connector and PD tests start.
HERE = Path(__file__).resolve().parent
for path in (HERE.parent / "benchmarks", HERE / "store"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny random-weight model of a real architecture, with a locally trained tokenizer."""
    from models import build

    return build(str(tmp_path_factory.mktemp("tiny-model")), "tiny")
