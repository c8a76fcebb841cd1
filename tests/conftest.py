"""Fixtures shared by the test folders: benchmarks/ on the import path and the tiny model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# benchmarks/models.py builds the model; tests/benchmarks imports the benchmark scripts themselves.
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny random-weight model of a real architecture, with a locally trained tokenizer."""
    from models import build

    return build(str(tmp_path_factory.mktemp("tiny-model")), "tiny")
