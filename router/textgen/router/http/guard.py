"""What stands in front of the routes: API keys, request-head limits and the drain.

Design note. The middleware stack, outermost first:

    CORSMiddleware   (Starlette's: preflights, and CORS headers on every answer)
    Gate             (request-head limits, 503 while draining, in-flight count)
    AuthenticationMiddleware(ApiKeys)   (Starlette's, with the key check below)
    routes

CORS is outermost so that a browser can read every refusal (401, 431, 503),
and so that a preflight, which carries no credentials, never meets the key
check. Each refusal is answered in the shape of the route the path names.

API keys: the router keeps only SHA-256 digests of its keys and compares the
digest of the key a request presents with each of them in constant time
(`hmac.compare_digest`, every key compared, none skipped), so neither the
keys' bytes nor which one matched leak through timing. Keys are compared
exactly: a key differing in case is another key. `/health` and `/metrics`
stay open: orchestrators probe the one and Prometheus scrapes the other
without credentials, and neither carries a prompt, an output or the model's
compute. Everything else, `/info` and `/v1/models` included, wants a key.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    AuthenticationError,
    SimpleUser,
)
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from textgen.router.errors import (
    HeadersTooLargeError,
    RouterError,
    ShuttingDownError,
    UnauthorizedError,
)
from textgen.router.http.errors import route_error

logger = logging.getLogger("textgen.router.http")

OPEN_PATHS = frozenset({"/health", "/metrics"})
"""Routes answered without an API key."""
# After the drain's deadline ends the requests still running, they get this long to say so.
_ABORT_GRACE_S = 5.0


class ApiKeys(AuthenticationBackend):
    """`Authorization: Bearer <key>` or `x-api-key: <key>`, checked against SHA-256 digests."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = tuple({_digest(key) for key in keys if key})
        if not self._digests:
            raise ValueError("ApiKeys needs at least one non-empty key")

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        if conn.url.path in OPEN_PATHS:
            return None
        presented = _presented_key(conn)
        if presented is None:
            raise AuthenticationError(
                "An API key is required: send `Authorization: Bearer <key>` or `x-api-key: <key>`"
            )
        digest = _digest(presented)
        matched = False
        for known in self._digests:  # NOTE: no early exit; every digest is compared
            matched |= hmac.compare_digest(digest, known)
        if not matched:
            raise AuthenticationError("The API key is not valid")
        return AuthCredentials(["authenticated"]), SimpleUser("api-key")


def on_auth_error(conn: HTTPConnection, error: AuthenticationError) -> Response:
    return route_error(conn.url.path, UnauthorizedError(str(error)))


def _presented_key(conn: HTTPConnection) -> str | None:
    authorization = conn.headers.get("authorization")
    if authorization is not None:
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() == "bearer" and key.strip():
            return key.strip()
    return conn.headers.get("x-api-key")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def read_key_file(path: str) -> list[str]:
    """One key per line; blank lines and lines starting with `#` are skipped."""
    with open(path, encoding="utf-8") as file:
        lines = (line.strip() for line in file)
        return [line for line in lines if line and not line.startswith("#")]


@dataclass(frozen=True)
class HeadLimits:
    """Limits on a request's head, past what the HTTP parser enforces itself."""

    max_headers: int = 100
    """Header fields per request (Apache's LimitRequestFields)."""
    max_header_bytes: int = 16 * 1024
    """Bytes of all header names and values together (the HTTP parser's own limit too)."""


@dataclass(frozen=True)
class AccessPolicy:
    """Who may call the router, from which web origins, with what request heads."""

    api_keys: tuple[str, ...] = ()
    """No keys: every route is open."""
    cors_allow_origins: tuple[str, ...] = ()
    """Web origins whose pages may call the router ("*": any); none: no CORS headers."""
    head_limits: HeadLimits = HeadLimits()


def middleware(policy: AccessPolicy, lifecycle: Lifecycle) -> list[Middleware]:
    """The stack of the design note, outermost first; the parts a policy leaves off are absent."""
    stack = []
    if policy.cors_allow_origins:
        stack.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(policy.cors_allow_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["authorization", "content-type", "x-api-key"],
                max_age=600,
            )
        )
    stack.append(Middleware(Gate, lifecycle=lifecycle, limits=policy.head_limits))
    if policy.api_keys:
        stack.append(
            Middleware(
                AuthenticationMiddleware, backend=ApiKeys(policy.api_keys), on_error=on_auth_error
            )
        )
    return stack


class Gate:
    """Pure ASGI middleware: head limits, the drain, and the count of requests in flight."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle, limits: HeadLimits) -> None:
        self._app = app
        self._lifecycle = lifecycle
        self._limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        error = self._refusal(scope)
        if error is not None:
            await route_error(scope["path"], error)(scope, receive, send)
            return
        self._lifecycle.active += 1
        try:
            await self._app(scope, receive, send)
        finally:
            self._lifecycle.active -= 1

    def _refusal(self, scope: Scope) -> RouterError | None:
        headers = scope["headers"]
        if len(headers) > self._limits.max_headers:
            return HeadersTooLargeError(
                f"The request has {len(headers)} header fields; at most "
                f"{self._limits.max_headers} are accepted"
            )
        if sum(len(name) + len(value) for name, value in headers) > self._limits.max_header_bytes:
            return HeadersTooLargeError(
                f"The request's headers are larger than {self._limits.max_header_bytes} bytes"
            )
        if self._lifecycle.draining and scope["path"] != "/metrics":
            return ShuttingDownError("The server is shutting down and accepts no new requests")
        return None


class Lifecycle:
    """The router's drain: refuse new requests, let running ones finish, then end the rest.

    `abort` (set once the router has started) ends every admitted request with
    an error event or response and returns how many it ended.
    """

    def __init__(self) -> None:
        self.active = 0
        """HTTP requests in flight (a stream counts until its last event is sent)."""
        self.draining = False
        self.abort: Callable[[RouterError], int] | None = None

    async def drain(self, timeout_s: float) -> None:
        """Return once no request is in flight, ending those still running at `timeout_s`."""
        self.draining = True
        logger.info("Draining %d request(s) for up to %.0f s", self.active, timeout_s)
        if await self._settled(timeout_s) or self.abort is None:
            return
        ended = self.abort(ShuttingDownError("The server shut down before the request finished"))
        logger.warning("Shutdown: ended %d request(s) still running after %.0f s", ended, timeout_s)
        await self._settled(_ABORT_GRACE_S)

    async def _settled(self, timeout_s: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.active and loop.time() < deadline:
            await asyncio.sleep(0.05)
        return not self.active
