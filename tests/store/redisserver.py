"""A real Redis (or Valkey) server for the tests: started on a free loopback port, stopped at the end.

``.ci/run`` installs Debian's ``redis-server``; without it, tests that need a server are skipped
on a developer's machine and fail under CI (``CI`` set), so a broken install cannot pass unseen.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

BINARIES = ("valkey-server", "redis-server")


def find_server() -> str | None:
    for name in BINARIES:
        path = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
        if path:
            return path
    return None


def require_server() -> str:
    path = find_server()
    if path is None:
        message = "no redis-server or valkey-server on PATH (.ci/run installs Debian's redis-server)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(port: int, *args: bytes | str, password: str | None = None, tls_ca: str | None = None) -> object:
    """Send one command over a fresh connection; return the decoded RESP reply (bytes, int, str, list, None)."""
    parts = [a.encode() if isinstance(a, str) else a for a in args]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        s = ssl.create_default_context(cafile=tls_ca).wrap_socket(raw, server_hostname="127.0.0.1") if tls_ca else raw
        wire = b""
        if password:
            wire += _encode([b"AUTH", password.encode()])
        wire += _encode(parts)
        s.sendall(wire)
        reader = s.makefile("rb")
        if password:
            _decode(reader)
        return _decode(reader)


def _encode(parts: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def _decode(reader) -> object:
    raw = reader.readline()
    if not raw:
        raise ConnectionError("the server closed the connection")  # SHUTDOWN answers so
    line = raw[:-2]
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        return RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = reader.read(size + 2)[:-2]
        return data
    if kind == b"*":
        return [_decode(reader) for _ in range(int(rest))]
    raise AssertionError(f"unexpected reply {line!r}")


class RedisServer:
    """One server process; ``stop()`` and ``start()`` again keep its port (restarts lose every key)."""

    def __init__(
        self, workdir: Path, password: str | None = None, tls: dict | None = None, extra: list[str] | None = None
    ):
        """``tls``: ``{"cert", "key", "ca"}`` PEM paths; the server then speaks TLS only. ``extra``: more
        server arguments (e.g. cluster mode)."""
        self.binary = require_server()
        self.workdir = workdir
        self.port = free_port()
        self.password = password
        self.tls = tls
        self.extra = extra or []
        self.process: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, detached: bool = False) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.workdir), "--daemonize", "no", "--protected-mode", "no"]
        args += self.extra
        if self.password:
            args += ["--requirepass", self.password]
        if self.tls:
            args[args.index("--port") + 1] = "0"
            args += [
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                self.tls["cert"],
                "--tls-key-file",
                self.tls["key"],
            ]
            args += ["--tls-ca-cert-file", self.tls["ca"], "--tls-auth-clients", "optional"]
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / f"server-{self.port}.log", "ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=detached)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.command("PING") == "PONG":
                    return
            except (OSError, ssl.SSLError):
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.process.kill()
        self.process.wait(10)
        raise RuntimeError(f"{self.binary} did not start on port {self.port}; see {self.workdir}")

    def stop(self) -> None:
        # Whichever process serves the port now: another process may have restarted the server.
        with contextlib.suppress(OSError):
            self.command("SHUTDOWN", "NOSAVE")
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            self.process.wait(10)
            self.process = None

    def command(self, *args: bytes | str) -> object:
        return command(self.port, *args, password=self.password, tls_ca=self.tls["ca"] if self.tls else None)

    def spec(self) -> dict:
        """What another process needs to restart this server (``restart_server``)."""
        return {"binary": self.binary, "port": self.port, "workdir": str(self.workdir), "password": self.password}


def restart_server(spec: dict) -> None:
    """Shut the server on ``spec["port"]`` down without saving and start a new, empty one there.

    The new server outlives the caller; ``RedisServer.stop()`` in the test process shuts it down.
    """
    server = RedisServer.__new__(RedisServer)
    server.binary, server.port = spec["binary"], spec["port"]
    server.workdir, server.password, server.process = Path(spec["workdir"]), spec["password"], None
    server.tls, server.extra = None, []
    with contextlib.suppress(OSError):
        server.command("SHUTDOWN", "NOSAVE")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            server.command("PING")
        except OSError:
            break
        time.sleep(0.02)
    server.start(detached=True)


def make_certificates(directory: Path) -> dict:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, signed by the CA (openssl CLI)."""
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=ucm-test-ca",
    )
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "2",
            "-extfile",
            "san.cnf",
        )
    return {
        "ca": str(directory / "ca.crt"),
        "cert": str(directory / "server.crt"),
        "key": str(directory / "server.key"),
        "client_cert": str(directory / "client.crt"),
        "client_key": str(directory / "client.key"),
    }


class RedisCluster:
    """Three primaries in cluster mode (no replicas), slots spread by ``redis-cli --cluster create``."""

    def __init__(self, workdir: Path, size: int = 3):
        self.servers = []
        for n in range(size):
            directory = workdir / f"node{n}"
            # The cluster bus gets its own free port (by default it is the client port + 10000,
            # which may be taken, or past 65535).
            extra = ["--cluster-enabled", "yes", "--cluster-config-file", str(directory / "nodes.conf")]
            extra += ["--cluster-port", str(free_port())]
            extra += ["--cluster-node-timeout", "5000"]
            self.servers.append(RedisServer(directory, extra=extra))
        nodes = [f"127.0.0.1:{s.port}" for s in self.servers]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.wait_ok()

    def wait_ok(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(b"cluster_state:ok" in s.command("CLUSTER", "INFO") for s in self.servers):
                return
            time.sleep(0.1)
        raise RuntimeError("the test cluster did not reach cluster_state:ok")

    @property
    def url(self) -> str:
        return self.servers[0].url

    def node_id(self, server: RedisServer) -> str:
        return server.command("CLUSTER", "MYID").decode()

    def move_slots(self, source: RedisServer, target: RedisServer, count: int) -> None:
        """Reshard ``count`` slots, with their keys, from one primary to another (as an operator would)."""
        subprocess.run(
            ["redis-cli", "--cluster", "reshard", f"127.0.0.1:{source.port}", "--cluster-from", self.node_id(source)]
            + ["--cluster-to", self.node_id(target), "--cluster-slots", str(count), "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        self.wait_ok()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
