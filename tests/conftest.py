"""Fixtures shared by the test folders: benchmarks/ and tests/store on the import path, and the tiny model."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# benchmarks/: models.py builds the model, servers.py starts processes, and tests/benchmarks imports the
# benchmark scripts themselves. tests/store: the Redis server helper the connector and PD tests start.
HERE = Path(__file__).resolve().parent
for path in (HERE.parent / "benchmarks", HERE / "store"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


@pytest.fixture(scope="session", autouse=True)
def shared_memory_dir():
    """The posix store's shared host-memory tier (on by default in the connector) keeps its arena files
    in a directory of this session, removed at its end, rather than in /dev/shm itself. Child
    processes and engines inherit the setting."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = tempfile.mkdtemp(prefix="ucm-tests-", dir=base)
    previous = os.environ.get("UCM_SHARED_MEMORY_DIR")
    os.environ["UCM_SHARED_MEMORY_DIR"] = path
    yield path
    if previous is None:
        os.environ.pop("UCM_SHARED_MEMORY_DIR", None)
    else:
        os.environ["UCM_SHARED_MEMORY_DIR"] = previous
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny random-weight model of a real architecture, with a locally trained tokenizer."""
    from models import build

    return build(str(tmp_path_factory.mktemp("tiny-model")), "tiny")
