"""The HTTP layer's first look at a request: who is asking, how much body, how fast.

Every byte of a request is the client's to choose, so nothing of a body is
read before two checks that need none of it:

1. **Authentication first.** Every ``/api/v1`` route needs a bearer token;
   :class:`RequestGuard` checks it (a SHA-256 lookup with a constant-time
   compare, :func:`edgeota.server.tokens.authenticate`) before the route, and
   so before FastAPI parses a body, runs. A request without a valid token is
   answered 401 and its connection closed, its body never read (the attack of
   issue 21: an 800 MB chunked POST to ``/api/v1/tokens`` without a token).
   The principal rides on the request's ``state`` for
   :func:`edgeota.server.api.deps.get_principal`, so a request is
   authenticated once.
2. **A cap per route, enforced while the body streams.** :func:`body_rules`
   is the table (a report 16 KiB, a bundle ``[uploads] max_bundle_bytes``,
   the sign-in form 4 KiB, everything else ``[http] max_json_bytes`` or a
   multiple of it). A declared ``Content-Length`` above the cap is refused
   unread; a chunked body is counted as it arrives and refused the moment it
   passes the cap (413 ``too_large``).

A body must also keep coming (:class:`~edgeota.server.config.HttpLimits`):
no pause longer than ``body_idle_seconds`` and, once ``body_grace_seconds``
have been spent waiting for it, no less than ``body_min_bytes_per_second`` on
average (408 ``request_timeout``). The time counted is the time spent waiting
for the client, so a slow handler is never blamed on its client. A request
head trickled byte by byte never reaches this module: the connection's
protocol cuts it (:mod:`edgeota.server.api.serving`).

Whenever a response leaves before the body was read to its end (a refusal,
or a route that needs no body), it says ``Connection: close``: the rest of
the body is never read, and the connection cannot be kept busy with it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgeota.protocol.reports import MAX_REPORT_SIZE
from edgeota.server.config import HttpLimits, ServerConfig
from edgeota.server.context import ServerContext
from edgeota.server.services.errors import ErrorCode
from edgeota.server.tokens import AuthenticationError, Principal, authenticate

__all__ = [
    "API_PREFIX",
    "MAX_FORM_BYTES",
    "PRINCIPAL_STATE",
    "BodyRefusedError",
    "BodyRule",
    "RequestGuard",
    "body_rules",
]

API_PREFIX = "/api/v1"
PRINCIPAL_STATE = "principal"  # the key of the authenticated caller in a request's state
MAX_FORM_BYTES = 4096  # the sign-in and sign-out forms (a token is under 100 bytes)
_BEARER = "bearer "
_CLOSE = (b"connection", b"close")
# On every response that sets none of its own (the dashboard's pages do): nothing the API
# answers is a document a browser should render, run or frame.
_API_HEADERS = (
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
)


class BodyRefusedError(HTTPException):
    """A body refused while it streams: above its cap (413) or too slow (408).

    An ``HTTPException`` on purpose: FastAPI re-raises those from its body
    parsing (any other exception there becomes a bare 400), so the app's
    handler answers it with its code, and ``Connection: close``.
    """

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(status, detail, headers={"Connection": "close"})


@dataclass(frozen=True)
class BodyRule:
    """The largest body requests of ``method`` to paths matching ``path`` may send."""

    method: str
    path: re.Pattern[str]
    max_bytes: int
    why: str

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and self.path.fullmatch(path) is not None


def body_rules(config: ServerConfig) -> tuple[BodyRule, ...]:
    """The per-route body caps, first match wins; unlisted requests get ``max_json_bytes``."""
    json_bytes = config.http_limits.max_json_bytes

    def rule(method: str, path: str, max_bytes: int, why: str) -> BodyRule:
        return BodyRule(method, re.compile(path), max_bytes, why)

    return (
        rule("PUT", r"/api/v1/blobs/[^/]*", config.uploads.max_bundle_bytes,
             "a sealed bundle ([uploads] max_bundle_bytes)"),
        rule("POST", r"/api/v1/devices/[^/]*/reports", MAX_REPORT_SIZE,
             "a signed status report"),
        # 100 000 device ids of 64 characters, quoted: about 6.6 MB.
        rule("POST", r"/api/v1/deployments", 8 * json_bytes, "a deployment's device list"),
        # A hash bin's signed metadata: every target of the bin with its custom fields.
        rule("POST", r"/api/v1/releases(/[^/]*/signatures)?", 4 * json_bytes,
             "a release's signed bin metadata"),
        rule("POST", r"/login|/logout", MAX_FORM_BYTES, "the sign-in form"),
    )


def _json_error(status: int, code: ErrorCode, detail: str,
                extra: tuple[tuple[bytes, bytes], ...] = ()) -> tuple[Message, Message]:
    body = json.dumps({"detail": detail, "code": str(code)}).encode()
    start: Message = {
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()), _CLOSE, *_API_HEADERS,
                    *extra],
    }
    return start, {"type": "http.response.body", "body": body}


@dataclass
class _BodyMeter:
    """Counts one request's body as the app receives it and refuses what breaks a limit."""

    receive: Receive
    max_bytes: int
    limits: HttpLimits
    clock: Callable[[], float]
    received: int = 0
    waited: float = 0.0
    complete: bool = False

    async def __call__(self) -> Message:
        if self.complete:  # the body is in: the app listens for a disconnect, unbounded
            return await self.receive()
        started = self.clock()
        try:
            with anyio.fail_after(self.limits.body_idle_seconds):
                message = await self.receive()
        except TimeoutError as e:
            raise BodyRefusedError(
                408, f"no body bytes for {self.limits.body_idle_seconds:g} s") from e
        self.waited += self.clock() - started
        if message["type"] != "http.request":
            self.complete = True  # http.disconnect: nothing more will come
            return message
        self.received += len(message.get("body", b""))
        if self.received > self.max_bytes:
            raise BodyRefusedError(413, f"body exceeds {self.max_bytes} bytes")
        if not message.get("more_body", False):
            self.complete = True
        elif (self.waited > self.limits.body_grace_seconds
              and self.received < self.limits.body_min_bytes_per_second * self.waited):
            raise BodyRefusedError(
                408, f"body arrives at {self.received / self.waited:.0f} bytes/s, below "
                     f"{self.limits.body_min_bytes_per_second}")
        return message


class RequestGuard:
    """ASGI middleware: authenticate ``/api/v1`` requests, then meter their bodies."""

    def __init__(self, app: ASGIApp, *, ctx: ServerContext,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.ctx = ctx
        self.rules = body_rules(ctx.config)
        self.limits = ctx.config.http_limits
        self.clock = clock

    def max_body(self, method: str, path: str) -> int:
        for rule in self.rules:
            if rule.matches(method, path):
                return rule.max_bytes
        return self.limits.max_json_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path: str = scope["path"]
        # h11 caps a head only while it is incomplete; one that arrived whole in one read
        # is measured here.
        head_size = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b"")) + sum(
            len(name) + len(value) + 4 for name, value in scope["headers"])
        if head_size > self.limits.max_head_bytes:
            await _send_all(send, _json_error(
                431, ErrorCode.TOO_LARGE,
                f"request head of {head_size} bytes exceeds {self.limits.max_head_bytes}"))
            return
        max_bytes = self.max_body(scope["method"], path)
        length = headers.get("content-length")
        if length is not None and not length.isdigit():  # h11 refuses these already
            await _send_all(send, _json_error(
                400, ErrorCode.INVALID_REQUEST, "Content-Length is not a number"))
            return
        # More than 20 digits is above every cap; int() of it is never computed.
        declared = None if length is None else int(length) if len(length) <= 20 else 10**20
        has_body = (declared is not None and declared > 0) or (
            "chunked" in headers.get("transfer-encoding", "").lower())
        if declared is not None and declared > max_bytes:
            await _send_all(send, _json_error(
                413, ErrorCode.TOO_LARGE, f"body of {declared} bytes exceeds {max_bytes}"))
            return
        if path == API_PREFIX or path.startswith(API_PREFIX + "/"):
            refusal = await self._authenticate(scope, headers)
            if refusal is not None:
                await _send_all(send, _json_error(
                    401, ErrorCode.UNAUTHENTICATED, refusal,
                    ((b"www-authenticate", b"Bearer"),)))
                return
        meter = _BodyMeter(receive, max_bytes, self.limits, self.clock,
                           complete=not has_body)
        started = False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                extra = [header for header in _API_HEADERS
                         if header[0] not in {name for name, _ in message.get("headers", [])}]
                if not meter.complete:
                    extra.append(_CLOSE)
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self.app(scope, meter, guarded_send)
        except BodyRefusedError as e:  # a route that let it through its own handlers
            if started:
                raise
            code = ErrorCode.TOO_LARGE if e.status_code == 413 else ErrorCode.REQUEST_TIMEOUT
            await _send_all(send, _json_error(e.status_code, code, str(e.detail)))

    async def _authenticate(self, scope: Scope, headers: Headers) -> str | None:
        """Put the caller on the request's state; the reason for a 401 when there is none."""
        header = headers.get("authorization", "")
        if not header.lower().startswith(_BEARER):
            return "missing bearer token"
        try:
            principal = await run_in_threadpool(self._lookup, header[len(_BEARER):].strip())
        except AuthenticationError as e:
            return str(e)
        state: dict[str, Any] = scope.setdefault("state", {})
        state[PRINCIPAL_STATE] = principal
        return None

    def _lookup(self, token: str) -> Principal:
        # Its own short transaction: authentication may record last use, and that
        # write must not hold SQLite's lock for the whole request.
        with self.ctx.sessions() as session, session.begin():
            return authenticate(session, token)


async def _send_all(send: Send, messages: tuple[Message, ...]) -> None:
    for message in messages:
        await send(message)
