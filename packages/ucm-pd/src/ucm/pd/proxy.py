"""The prefill/decode proxy: an OpenAI-compatible front for prefill and decode vLLM servers.

Each completion or chat request goes first to a prefill server (``kv_role: kv_producer``) as the
same request with one output token and no streaming. That server computes the prompt's KV and,
with UCM's connector, answers only once every full chunk of it is committed to the shared store.
The proxy then sends the original request to a decode server (``kv_role: kv_consumer``), which
finds the chunks in the store, loads them instead of computing them, and generates the answer
(streamed or not) back through the proxy.

Routing is load-aware: among the healthy servers of a role, the one with the fewest requests in
flight (ties in turn). A background task checks every server's ``/health``; a server that fails
a check or a request is skipped until a check succeeds again. A failed prefill never fails the
request: the decode server then computes the prompt itself (a miss costs time, not an error).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

log = logging.getLogger("ucm.pd")

#: Request headers passed on to the servers (the API key among them).
FORWARDED_HEADERS = ("Authorization", "X-Request-Id", "OpenAI-Organization", "OpenAI-Project")


@dataclass
class Backend:
    """One vLLM server behind the proxy."""

    url: str
    role: str  # "prefill" or "decode"
    healthy: bool = True
    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    last_error: str = ""
    checked_at: float = 0.0

    def state(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "role": self.role,
            "healthy": self.healthy,
            "in_flight": self.in_flight,
            "requests": self.requests,
            "failures": self.failures,
            "last_error": self.last_error,
        }


@dataclass
class Stats:
    requests: int = 0
    prefill_fallbacks: int = 0  # requests whose prefill failed: the decode server computed the prompt
    decode_retries: int = 0
    errors: int = 0
    prefill_seconds: float = 0.0
    started: float = field(default_factory=time.monotonic)


class Router:
    """Picks the healthy server of a role with the fewest requests in flight."""

    def __init__(self, prefill: list[str], decode: list[str]):
        if not prefill or not decode:
            raise ValueError("need at least one prefill server and one decode server")
        self.backends = [Backend(_base(u), "prefill") for u in prefill] + [Backend(_base(u), "decode") for u in decode]
        self._turn = itertools.count()

    def of(self, role: str) -> list[Backend]:
        return [b for b in self.backends if b.role == role]

    def pick(self, role: str, exclude: Backend | None = None) -> Backend | None:
        candidates = [b for b in self.of(role) if b.healthy and b is not exclude]
        if not candidates:
            return None
        least = min(b.in_flight for b in candidates)
        tied = [b for b in candidates if b.in_flight == least]
        return tied[next(self._turn) % len(tied)]


def _base(url: str) -> str:
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"server url {url!r} must start with http:// or https://")
    return url


def prefill_request(body: dict[str, Any], kind: str) -> dict[str, Any]:
    """The request the prefill server gets: the same prompt and sampling, one token, not streamed."""
    prefill = dict(body)
    prefill["max_tokens"] = 1
    if kind == "chat":
        prefill["max_completion_tokens"] = 1
    prefill["stream"] = False
    prefill.pop("stream_options", None)
    prefill["n"] = 1
    for key in ("best_of", "min_tokens"):  # would conflict with one token
        prefill.pop(key, None)
    return prefill


class PDProxy:
    def __init__(
        self,
        prefill: list[str],
        decode: list[str],
        health_interval_s: float = 5.0,
        request_timeout_s: float = 3600.0,
        connect_timeout_s: float = 5.0,
    ):
        self.router = Router(prefill, decode)
        self.health_interval_s = health_interval_s
        self.request_timeout_s = request_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.stats = Stats()
        self._session: aiohttp.ClientSession | None = None
        self._health_task: asyncio.Task | None = None

    # -- application ------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/completions", lambda r: self.handle(r, "/v1/completions", "completions"))
        app.router.add_post("/v1/chat/completions", lambda r: self.handle(r, "/v1/chat/completions", "chat"))
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/stats", self.report)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        timeout = aiohttp.ClientTimeout(total=self.request_timeout_s, sock_connect=self.connect_timeout_s)
        self._session = aiohttp.ClientSession(timeout=timeout)
        await self.check_all()
        self._health_task = asyncio.create_task(self._check_forever())

    async def _stop(self, app: web.Application) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self._session is not None:
            await self._session.close()

    # -- health -----------------------------------------------------------------------------
    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await self.check_all()

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(b) for b in self.router.backends))

    async def _check(self, backend: Backend) -> None:
        assert self._session is not None
        try:
            timeout = aiohttp.ClientTimeout(total=max(1.0, self.connect_timeout_s))
            async with self._session.get(backend.url + "/health", timeout=timeout) as response:
                ok = response.status == 200
                reason = f"/health answered {response.status}"
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            ok, reason = False, f"/health failed: {exc.__class__.__name__}: {exc}"
        backend.checked_at = time.monotonic()
        if ok != backend.healthy:
            log.warning(
                "%s server %s is %s%s", backend.role, backend.url, "up" if ok else "down", "" if ok else f" ({reason})"
            )
        backend.healthy = ok
        if not ok:
            backend.last_error = reason

    def _failed(self, backend: Backend, error: str) -> None:
        backend.failures += 1
        backend.last_error = error
        if backend.healthy:
            log.warning(
                "%s server %s failed a request and is skipped until its next health check: %s",
                backend.role,
                backend.url,
                error,
            )
        backend.healthy = False

    # -- requests ---------------------------------------------------------------------------
    async def handle(self, request: web.Request, path: str, kind: str) -> web.StreamResponse:
        self.stats.requests += 1
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the request body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object")
        headers = {k: v for k, v in request.headers.items() if k in FORWARDED_HEADERS}

        refused = await self._prefill(path, prefill_request(body, kind), headers)
        if refused is not None:
            return refused  # the request itself is wrong: the decode server would refuse it too
        return await self._decode(request, path, body, headers)

    async def _prefill(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> web.Response | None:
        """Runs the prefill; returns a response for the client only when the request itself is bad (4xx)."""
        assert self._session is not None
        backend = self.router.pick("prefill")
        if backend is None:
            self.stats.prefill_fallbacks += 1
            return None
        backend.in_flight += 1
        backend.requests += 1
        started = time.monotonic()
        try:
            async with self._session.post(backend.url + path, json=body, headers=headers) as response:
                data = await response.read()
                if 400 <= response.status < 500:
                    return web.Response(status=response.status, body=data, content_type="application/json")
                if response.status != 200:
                    self.stats.prefill_fallbacks += 1
                    backend.failures += 1
                    backend.last_error = f"prefill answered {response.status}: {data[:200]!r}"
                    log.warning(
                        "prefill server %s answered %d; the decode server computes the prompt",
                        backend.url,
                        response.status,
                    )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self.stats.prefill_fallbacks += 1
            self._failed(backend, f"{exc.__class__.__name__}: {exc}")
        finally:
            backend.in_flight -= 1
            self.stats.prefill_seconds += time.monotonic() - started
        return None

    async def _decode(
        self, request: web.Request, path: str, body: dict[str, Any], headers: dict[str, str]
    ) -> web.StreamResponse:
        assert self._session is not None
        tried: Backend | None = None
        for attempt in range(2):  # a decode server that cannot be reached gets one retry elsewhere
            backend = self.router.pick("decode", exclude=tried)
            if backend is None:
                break
            if attempt:
                self.stats.decode_retries += 1
            backend.in_flight += 1
            backend.requests += 1
            try:
                async with self._session.post(backend.url + path, json=body, headers=headers) as response:
                    if not body.get("stream") or response.status != 200:
                        data = await response.read()
                        return web.Response(
                            status=response.status, body=data, content_type=response.content_type or "application/json"
                        )
                    out = web.StreamResponse(
                        status=200, headers={"Content-Type": response.headers.get("Content-Type", "text/event-stream")}
                    )
                    await out.prepare(request)
                    async for piece in response.content.iter_any():
                        await out.write(piece)
                    await out.write_eof()
                    return out
            except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
                self._failed(backend, f"{exc.__class__.__name__}: {exc}")
                tried = backend
            finally:
                backend.in_flight -= 1
        self.stats.errors += 1
        return _error(503, "no decode server could take the request")

    async def models(self, request: web.Request) -> web.Response:
        assert self._session is not None
        backend = self.router.pick("decode")
        if backend is None:
            return _error(503, "no healthy decode server")
        try:
            async with self._session.get(backend.url + "/v1/models") as response:
                return web.Response(status=response.status, body=await response.read(), content_type="application/json")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self._failed(backend, str(exc))
            return _error(502, f"decode server {backend.url} did not answer")

    async def health(self, request: web.Request) -> web.Response:
        ready = all(any(b.healthy for b in self.router.of(role)) for role in ("prefill", "decode"))
        return web.json_response(
            {"ready": ready, "servers": [b.state() for b in self.router.backends]}, status=200 if ready else 503
        )

    async def report(self, request: web.Request) -> web.Response:
        s = self.stats
        return web.json_response(
            {
                "requests": s.requests,
                "prefill_fallbacks": s.prefill_fallbacks,
                "decode_retries": s.decode_retries,
                "errors": s.errors,
                "prefill_seconds": round(s.prefill_seconds, 6),
                "uptime_s": round(time.monotonic() - s.started, 3),
                "servers": [b.state() for b in self.router.backends],
            }
        )


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "ucm_pd_error", "code": status}}, status=status)


def serve(prefill: list[str], decode: list[str], host: str, port: int, health_interval_s: float = 5.0) -> None:
    proxy = PDProxy(prefill, decode, health_interval_s=health_interval_s)
    web.run_app(proxy.app(), host=host, port=port, print=lambda *_: None)
