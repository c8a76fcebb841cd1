"""Fixtures of the connector tests: three child processes of vLLM engines (the tiny model comes from tests/conftest.py).

The engines are grouped by what they need so that each child process pays vLLM's import once:

- ``first_run``: engines that need no store written before them: the baselines (no connector),
  the cold engines that fill the stores, a producer, a consumer on an empty store, and engines
  whose configuration must be refused.
- ``second_run``: fresh engines reading what ``first_run`` wrote (warm engines, a second producer,
  a consumer), and engines reading damaged copies of the producer's store.
- ``module_path_run``: an engine that finds the connector by module path, with the plug-in off.

Helpers that tests import live in ``connectortest.py``; ``engine_run.py`` is the child process.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# The test modules import connectortest and engine_run from here, whatever pytest's import mode
# (benchmarks/ and tests/store are put on the path by tests/conftest.py).
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from engine_run import ENGINE_ENV  # noqa: E402

# The engine processes inherit these; vLLM is never imported in the test process itself.
for _key, _value in ENGINE_ENV.items():
    os.environ.setdefault(_key, _value)

import connectortest as ct  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "vllm: tests of the vLLM connector; engine tests run vLLM in child processes (about 2 minutes)"
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.vllm)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real Redis server shared by the engines of every run (tests/store/redisserver.py)."""
    from redisserver import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


#: Stores that ``second_run`` damages before its engines read them.
DAMAGED = ["corrupt-half", "corrupt-half-sync", "corrupt-all", "unreadable"]
DAMAGED += ["truncated-race", "deleted-race", "wiped-half", "corrupt-half-staged"]


@pytest.fixture(scope="session")
def stores(tmp_path_factory) -> dict[str, Path]:
    """Store roots by name; each starts absent (the store creates it)."""
    base = tmp_path_factory.mktemp("stores")
    names = ["s32", "s128", "chunk32-by-block128", "producer", "empty", "module-path"]
    names += DAMAGED + ["sync", "staged", "corrupt-concurrent", "backlog", "backlog-chunked", "flushed"]
    return {name: base / name for name in names}


#: Phases of the block-32 engines; the cold engine asks one question about DOC, warm engines another.
COLD32_PHASES = [
    ct.phase("short", ct.SHORT),
    ct.phase("single", ct.SINGLE),
    ct.phase("doc", [ct.DOC_QUESTION]),
    ct.phase("concurrent", ct.CONCURRENT, together=True),
    ct.phase("long", ct.LONG),
]
WARM32_PHASES = [p if p["name"] != "doc" else ct.phase("doc", [ct.DOC_OTHER_QUESTION]) for p in COLD32_PHASES]
BLOCK128_PHASES = [ct.phase("single", ct.SINGLE), ct.phase("concurrent", ct.CONCURRENT, together=True)]
SINGLE_PHASE = [ct.phase("single", ct.SINGLE)]
#: The concurrent prompts computed in one step (the token budget holds them all): one save per request.
CONCURRENT_IN_ONE_STEP = {
    "phases": [ct.phase("concurrent", ct.CONCURRENT, together=True)],
    "max_num_batched_tokens": 2048,
}


@pytest.fixture(scope="session")
def first_run(tiny_model, stores, redis_server, tmp_path_factory) -> dict[str, dict]:
    m = tiny_model
    base32_phases = COLD32_PHASES[:2] + [ct.phase("doc", [ct.DOC_QUESTION, ct.DOC_OTHER_QUESTION])] + COLD32_PHASES[3:]
    specs = [
        ct.engine("base32", m, 32, base32_phases),
        ct.engine("base128", m, 128, BLOCK128_PHASES),
        ct.engine("cold32", m, 32, COLD32_PHASES, stores["s32"]),
        ct.engine("cold128", m, 128, BLOCK128_PHASES, stores["s128"]),
        ct.engine("cold128-chunk32", m, 128, SINGLE_PHASE, stores["chunk32-by-block128"], chunk_tokens=32),
        # vLLM's default load failure policy: a warning from engines that load, none from one that only saves.
        ct.engine("producer", m, 32, SINGLE_PHASE, stores["producer"], role="kv_producer", failure_policy="fail"),
        ct.engine("consumer-empty", m, 32, SINGLE_PHASE, stores["empty"], role="kv_consumer"),
        ct.engine("redis-cold", m, 32, SINGLE_PHASE, failure_policy="fail", **ct.on_redis(redis_server, "engines:")),
        # No room for a second save while one is in flight: all but the first request's are skipped.
        ct.engine("backlog-cold", m, 32, [], stores["backlog"], save_backlog_bytes=0) | CONCURRENT_IN_ONE_STEP,
        # A short prompt and a long one prefilled in chunks over many steps: the long one's first
        # save finds the short one's in flight, so none of its chunks may be saved after that.
        ct.engine(
            "backlog-chunked",
            m,
            32,
            [ct.phase("chunked", ct.SHORT_THEN_LONG, together=True)],
            stores["backlog-chunked"],
            save_backlog_bytes=0,
        ),
        # One long prompt in one step, one token out: the request ends with all its chunks just handed
        # to a store of one thread that flushes every file to the disk; the phase then calls
        # wait_for_saves().
        ct.engine(
            "wait-for-saves",
            m,
            32,
            [ct.phase("long", ct.LONG, wait_for_saves=True) | {"max_tokens": 1}],
            stores["flushed"],
            store_config={"root": str(stores["flushed"]), "fsync": True, "threads": 1},
        )
        | {"max_num_batched_tokens": 2048},
        ct.engine("unknown-key", m, 32, [], stores["empty"], chunk_token=32, expect_error=True),
        ct.engine("chunk-not-dividing", m, 32, [], stores["empty"], chunk_tokens=24, expect_error=True),
    ]
    return ct.run_engines(specs, tmp_path_factory.mktemp("first-run"))


@pytest.fixture(scope="session")
def second_run(tiny_model, stores, first_run, redis_server, tmp_path_factory) -> dict[str, dict]:
    m = tiny_model
    # Copies of the producer's store, which holds exactly the chunks of SINGLE, most of them damaged.
    for name in DAMAGED + ["sync", "staged"]:
        shutil.copytree(stores["producer"], stores[name])
    for name in ("corrupt-half", "corrupt-half-sync", "corrupt-half-staged"):
        for path in ct.block_files(stores[name])[::2]:
            ct.corrupt(path)
    for path in ct.block_files(stores["corrupt-all"]):
        ct.corrupt(path)
    # The cold block-32 engine's store (every phase's chunks), every other block file damaged.
    shutil.copytree(stores["s32"], stores["corrupt-concurrent"])
    for path in ct.block_files(stores["corrupt-concurrent"])[::2]:
        ct.corrupt(path)
    for path in ct.block_files(stores["wiped-half"])[::2]:
        path.unlink()
    for path in ct.block_files(stores["unreadable"]):
        # Found by a lookup, but every read fails with an I/O error (EISDIR), which the store keeps
        # (it may be transient) where it removes a file it finds damaged.
        path.unlink()
        path.mkdir()
    specs = [
        ct.engine("warm32", m, 32, WARM32_PHASES, stores["s32"]),
        ct.engine("warm128", m, 128, BLOCK128_PHASES, stores["s128"], prewarm_bytes=0),
        ct.engine("warm32-chunk32", m, 32, SINGLE_PHASE, stores["chunk32-by-block128"], chunk_tokens=32),
        # The same store at the writer's block size: 32-token chunks of each prompt's last, partial block too.
        ct.engine("warm128-chunk32", m, 128, SINGLE_PHASE, stores["chunk32-by-block128"], chunk_tokens=32),
        ct.engine("producer-again", m, 32, SINGLE_PHASE, stores["producer"], role="kv_producer"),
        ct.engine("consumer", m, 32, SINGLE_PHASE, stores["producer"], role="kv_consumer"),
        ct.engine("sync", m, 32, SINGLE_PHASE, stores["sync"], load_async=False),
        # A memory tier in front of posix: loads go through a staging buffer, not straight into the cache.
        ct.engine("staged", m, 32, SINGLE_PHASE, stores["staged"], **ct.memory_in_front(stores["staged"])),
        ct.engine(
            "corrupt-half-staged",
            m,
            32,
            SINGLE_PHASE,
            stores["corrupt-half-staged"],
            **ct.memory_in_front(stores["corrupt-half-staged"]),
        ),
        ct.engine("corrupt-half", m, 32, SINGLE_PHASE, stores["corrupt-half"]),
        ct.engine("corrupt-half-sync", m, 32, SINGLE_PHASE, stores["corrupt-half-sync"], load_async=False),
        # Requests admitted together, loading at once, some of their chunks damaged.
        ct.engine(
            "corrupt-concurrent",
            m,
            32,
            [ct.phase("concurrent", ct.CONCURRENT, together=True)],
            stores["corrupt-concurrent"],
        ),
        ct.engine("corrupt-all", m, 32, SINGLE_PHASE, stores["corrupt-all"]),
        ct.engine("unreadable", m, 32, SINGLE_PHASE, stores["unreadable"]),
        ct.engine("truncated-race", m, 32, SINGLE_PHASE, stores["truncated-race"], sabotage="truncate"),
        ct.engine("deleted-race", m, 32, SINGLE_PHASE, stores["deleted-race"], sabotage="delete"),
        ct.engine("wiped-half", m, 32, SINGLE_PHASE, stores["wiped-half"]),
        ct.engine("backlog-warm", m, 32, [], stores["backlog"]) | CONCURRENT_IN_ONE_STEP,
        # Another engine process on the Redis server the cold one wrote to.
        ct.engine("redis-warm", m, 32, SINGLE_PHASE, **ct.on_redis(redis_server, "engines:")),
        # Last: the server restarts (empty) between the first lookup that hits and its load.
        ct.engine(
            "redis-restart",
            m,
            32,
            SINGLE_PHASE,
            sabotage="redis-restart",
            redis=redis_server.spec(),
            **ct.on_redis(redis_server, "engines:"),
        ),
    ]
    return ct.run_engines(specs, tmp_path_factory.mktemp("second-run"))


@pytest.fixture(scope="session")
def module_path_run(tiny_model, stores, first_run, tmp_path_factory) -> dict[str, dict]:
    root = stores["module-path"]
    shutil.copytree(stores["producer"], root)
    spec = ct.engine("module-path", tiny_model, 32, SINGLE_PHASE, root, module_path="ucm.connector.vllm")
    # Only vLLM's own plug-ins: "UcmConnector" is not registered, so only the module path can find it.
    env = {"VLLM_PLUGINS": "lora_filesystem_resolver"}
    return ct.run_engines([spec], tmp_path_factory.mktemp("module-path-run"), env=env)
