"""Fixtures shared by the ucm-store tests; plain helpers live in ``storetest.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The test modules and their child processes import storetest from here, whatever pytest's import mode.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from storetest import REDIS_URL_ENV, STORE_KINDS, store_config  # noqa: E402


@pytest.fixture
def open_test_store(tmp_path):
    """``open_test_store(kind, num_shards=1, root=None, **options)``: a store closed at teardown.

    Stores of the same test share ``tmp_path / "root"`` unless given another root.
    """
    from ucm.store import open_store

    opened = []

    def factory(kind: str, num_shards: int = 1, root: Path | None = None, **options):
        name, config = store_config(kind, root or tmp_path / "root", num_shards, **options)
        store = open_store(name, config)
        opened.append(store)
        return store

    yield factory
    for store in reversed(opened):
        store.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real Redis server for the whole session (tests that restart one start their own)."""
    import os

    from redisserver import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    os.environ[REDIS_URL_ENV] = server.url
    yield server
    server.stop()


@pytest.fixture(params=STORE_KINDS)
def store_kind(request):
    if "redis" in request.param:
        request.getfixturevalue("redis_server")
    return request.param


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes seconds (child processes, large blocks); still runs by default")
