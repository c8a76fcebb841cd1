"""Throughput of the ``redis`` store next to ``redis-benchmark`` on the same server, in one run.

For each block size, a batch of blocks is dumped to and loaded from a local Redis server through
``ucm.store`` (one ``dump``/``load`` call, then ``wait``), and ``redis-benchmark`` (the server's
own C client) runs pipelined SET and GET of values of that size with as many connections as the
store has threads. Both are reported in GB/s of values moved; the ratio says how close the store's
pipelines (checksums, hashes, trailers, scatter into the caller's buffers) come to the server's
own limit. Both write as many distinct keys as the batch has blocks (the server allocates as much).

Starts its own ``redis-server`` on a free loopback port unless ``--port`` names a running one.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import cpu_model, load_average, package_version  # noqa: E402
from servers import free_port  # noqa: E402

MIB = 1 << 20


def start_server(binary: str, workdir: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return process, port
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"{binary} did not start")


def redis_benchmark(port: int, test: str, size: int, count: int, clients: int, pipeline: int) -> float:
    """GB/s of values ``redis-benchmark`` moves with ``test`` (set or get), over ``count`` distinct keys."""
    out = subprocess.run(
        ["redis-benchmark", "-p", str(port), "-t", test, "-d", str(size), "-n", str(count), "-r", str(count)]
        + ["-c", str(clients), "-P", str(pipeline), "--csv"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = list(csv.reader(io.StringIO(out)))
    rps = float(rows[-1][1])
    return rps * size / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64K,1M,4M", help="block sizes (default: %(default)s)")
    parser.add_argument("--batch-mib", type=int, default=256, help="MiB per batch (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=4, help="store threads = benchmark clients (default: 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per number, best reported (default: 3)")
    parser.add_argument("--port", type=int, help="use the Redis server already on this port")
    args = parser.parse_args()

    from ucm.store import open_store

    sizes = [
        int(s[:-1]) * (1024 if s[-1] in "Kk" else MIB) if s[-1] in "KkMm" else int(s) for s in args.sizes.split(",")
    ]
    binary = shutil.which("valkey-server") or shutil.which("redis-server")
    workdir = tempfile.mkdtemp(prefix="ucm-redis-bench-")
    process = None
    port = args.port
    if port is None:
        if binary is None or shutil.which("redis-benchmark") is None:
            print(
                "needs redis-server (or valkey-server) and redis-benchmark: apt-get install redis-server",
                file=sys.stderr,
            )
            return 2
        process, port = start_server(binary, workdir)
    print("# redis store benchmark\n")
    print(f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"- machine: {cpu_model()}, {os.cpu_count()} cores; load average at start: {load_average()}")
    version = subprocess.run([binary or "redis-server", "--version"], capture_output=True, text=True).stdout.strip()
    print(f"- server: {version}, on loopback; ucm-store {package_version('ucm-store')}")
    print(f"- store threads = redis-benchmark clients: {args.threads}; redis-benchmark pipeline depth 16\n")
    columns = ["block", "blocks", "UCM dump (GB/s)", "redis-benchmark SET (GB/s)", "ratio"]
    columns += ["UCM load (GB/s)", "redis-benchmark GET (GB/s)", "ratio"]
    print("| " + " | ".join(columns) + " |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    try:
        with open_store("redis", {"port": port, "threads": args.threads, "prefix": "bench:"}) as store:
            for size in sizes:
                count = max(1, args.batch_mib * MIB // size)
                sources = [np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8) for i in range(count)]
                targets = [np.empty(size, np.uint8) for _ in range(count)]
                dumps, loads = [], []
                for repeat in range(args.repeats):
                    ids = [hashlib.sha256(f"{size}/{repeat}/{i}".encode()).digest() for i in range(count)]
                    started = time.perf_counter()
                    store.wait(store.dump(ids, sources))
                    dumps.append(count * size / (time.perf_counter() - started) / 1e9)
                    started = time.perf_counter()
                    store.wait(store.load(ids, targets))
                    loads.append(count * size / (time.perf_counter() - started) / 1e9)
                    assert all((a == b).all() for a, b in zip(sources, targets, strict=True))
                    store.remove(ids)
                n = max(count, 16)
                peer_set = max(redis_benchmark(port, "set", size, n, args.threads, 16) for _ in range(args.repeats))
                peer_get = max(redis_benchmark(port, "get", size, n, args.threads, 16) for _ in range(args.repeats))
                dump, load = max(dumps), max(loads)
                label = f"{size // 1024} KiB" if size < MIB else f"{size // MIB} MiB"
                print(
                    f"| {label} | {count} | {dump:.2f} | {peer_set:.2f} | {dump / peer_set:.2f}x | {load:.2f} | "
                    f"{peer_get:.2f} | {load / peer_get:.2f}x |",
                    flush=True,
                )
    finally:
        if process is not None:
            process.kill()
            process.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
