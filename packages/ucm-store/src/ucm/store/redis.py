"""The ``redis`` store: blocks in a Redis or Valkey server that many processes and hosts share.

A block is one hash (key = ``prefix`` + the id's bytes, one field per shard, each shard in the
same byte form as a ``posix`` file: payload, then a trailer with its checksum), so a block is
either wholly present or absent, and the server's own eviction (``maxmemory`` with an
``allkeys-lru`` or ``allkeys-lfu`` policy) drops whole blocks. Transfers are pipelined over one
connection per store thread, in native code with the GIL released.

A cache must not fail its users when the server goes away: lookups that cannot reach it report
misses (and log why, at most every ``warn_interval_s``), transfers fail their blocks with a
``StoreError``, and connections are opened again on next use. The layout and the settings are
described in docs/store.md.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from ucm.store import _native
from ucm.store._base import Option
from ucm.store._native_store import NativeStore

log = logging.getLogger(__name__)


class RedisStore(NativeStore):
    config_schema = {
        "url": Option(str, None, help="redis[s]://[[user]:password@]host[:port][/db] or unix:///path/to/socket[?db=N]"),
        "host": Option(str, "127.0.0.1", help="server host (ignored with url or unix_socket)"),
        "port": Option(int, 6379, minimum=1, help="server port"),
        "unix_socket": Option(str, None, help="path of the server's unix socket, instead of host and port"),
        "username": Option(str, None, help="ACL user name (Redis 6 and later, Valkey)"),
        "password": Option(str, None, help="password for AUTH"),
        "password_env": Option(str, None, help="name of an environment variable holding the password"),
        "db": Option(int, 0, minimum=0, help="database number"),
        "prefix": Option(str, "ucm:", help="prefix of every key this store writes"),
        "num_shards": Option(int, 1, minimum=1, help="shards per block (e.g. tensor-parallel ranks)"),
        "threads": Option(int, 4, minimum=1, help="transfer threads, each with its own connection"),
        "timeout_s": Option((int, float), 5.0, help="connect, send and reply timeout in seconds"),
        "ttl_s": Option(int, None, minimum=1, help="expire blocks this long after they were written"),
        "shard_bytes": Option(int, None, minimum=1, help="reject transfers whose buffers do not total this size"),
        "warn_interval_s": Option((int, float), 30.0, help="at most one warning per this many seconds on lookups"),
        "cluster": Option(bool, False, help="Redis Cluster: the url names any node; the others are discovered"),
        "tls": Option(bool, False, help="connect with TLS (also set by a rediss:// url)"),
        "tls_ca_file": Option(str, None, help="CA certificates (PEM) to verify the server (default: the system's)"),
        "tls_cert_file": Option(str, None, help="client certificate (PEM), for servers that require one"),
        "tls_key_file": Option(str, None, help="the client certificate's private key (PEM)"),
        "tls_server_name": Option(str, None, help="name to verify the server's certificate against (default: host)"),
        "tls_verify": Option(bool, True, help="verify the server's certificate and name"),
    }

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        endpoint = _endpoint(self.config)
        self.endpoint = endpoint["unix_socket"] or f"{endpoint['host']}:{endpoint['port']}"
        try:
            self._native = _native.RedisStore(
                endpoint=endpoint,
                prefix=self.config["prefix"],
                num_shards=self.config["num_shards"],
                threads=self.config["threads"],
                ttl_s=self.config["ttl_s"] or 0,
                shard_bytes=self.config["shard_bytes"] or 0,
            )
        except ValueError as exc:
            raise ValueError(f"store 'redis': {exc}") from None
        self._closed = False
        self._warned_at = -float("inf")
        self._warn_lock = threading.Lock()
        self.lookup_errors = 0  # lookups answered with misses because the server could not be reached

    def _lookup_failed(self, error: str) -> None:
        self.lookup_errors += 1
        with self._warn_lock:
            now = time.monotonic()
            if now - self._warned_at < self.config["warn_interval_s"]:
                return
            self._warned_at = now
        log.warning("store 'redis': lookups report misses: %s", error)

    def lookup(self, ids: Sequence[bytes]) -> list[bool]:
        found, error = self._native.lookup(ids)
        if error:
            self._lookup_failed(error)
        return found

    def lookup_prefix(self, ids: Sequence[bytes]) -> int:
        count, error = self._native.lookup_prefix(ids)
        if error:
            self._lookup_failed(error)
        return count

    def nodes(self) -> list[str]:
        """The servers blocks go to: one, or in cluster mode every primary that owns slots."""
        return self._native.nodes()

    def prefetch(self, ids: Sequence[bytes]) -> None:
        pass  # the server holds blocks in memory already

    def remove(self, ids: Sequence[bytes]) -> None:
        error = self._native.remove(ids)
        if error:
            log.warning("store 'redis': remove failed: %s", error)


def _endpoint(config: dict[str, Any]) -> dict[str, Any]:
    """Where and how to connect, from ``url`` or the separate keys (explicit keys win over the url's parts)."""
    endpoint = {
        "host": config["host"],
        "port": config["port"],
        "unix_socket": config["unix_socket"] or "",
        "username": config["username"] or "",
        "password": config["password"] or "",
        "db": config["db"],
        "timeout_s": float(config["timeout_s"]),
        "cluster": config["cluster"],
        "tls": config["tls"],
        "tls_verify": config["tls_verify"],
        "tls_ca_file": config["tls_ca_file"] or "",
        "tls_cert_file": config["tls_cert_file"] or "",
        "tls_key_file": config["tls_key_file"] or "",
        "tls_server_name": config["tls_server_name"] or "",
    }
    if bool(endpoint["tls_cert_file"]) != bool(endpoint["tls_key_file"]):
        raise ValueError("store 'redis': tls_cert_file and tls_key_file go together")
    url = config["url"]
    if url:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme == "rediss":
            endpoint["tls"] = True
        if parsed.scheme in ("redis", "rediss"):
            endpoint["host"] = parsed.hostname or endpoint["host"]
            endpoint["port"] = parsed.port or endpoint["port"]
            if parsed.path.strip("/"):
                try:
                    endpoint["db"] = int(parsed.path.strip("/"))
                except ValueError:
                    raise ValueError(f"store 'redis': url {url!r}: the path must be a database number") from None
        elif parsed.scheme == "unix":
            endpoint["unix_socket"] = parsed.path
            query = urllib.parse.parse_qs(parsed.query)
            if "db" in query:
                endpoint["db"] = int(query["db"][0])
        else:
            raise ValueError(f"store 'redis': url {url!r} must start with redis://, rediss:// or unix://")
        if parsed.username and not config["username"]:
            endpoint["username"] = urllib.parse.unquote(parsed.username)
        if parsed.password and not config["password"]:
            endpoint["password"] = urllib.parse.unquote(parsed.password)
    if config["password_env"]:
        name = config["password_env"]
        if name not in os.environ:
            raise ValueError(f"store 'redis': password_env names {name!r}, which is not set")
        endpoint["password"] = os.environ[name]
    return endpoint
