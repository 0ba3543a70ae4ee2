"""How uvicorn serves the app: connection limits a hostile client cannot stretch.

uvicorn bounds a request head's size (h11's incomplete-event cap) but not
its time: a client that sends a header byte every few seconds (slowloris)
holds its connection, and a file descriptor, for as long as it likes, and so
does one that connects and sends nothing. :func:`guarded_protocol` is
uvicorn's own h11 protocol with one addition: each request head must be
complete within ``head_timeout_seconds`` of the connection opening or of the
previous response, else the connection is closed (nothing can be answered to
half a request line). Bodies are bounded in the app (:mod:`.limits`).

Both ``edgeota serve`` and the in-process server build their uvicorn config
with :func:`uvicorn_config`, so tests meet the limits production has.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from edgeota.server.config import HttpLimits

__all__ = ["guarded_protocol", "uvicorn_config"]

logger = logging.getLogger(__name__)


class _HeadDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request head does not arrive in time.

    Reads two attributes uvicorn's protocol has always had: ``conn`` (the
    ``h11.Connection``, whose ``their_state`` is h11's public API) and
    ``transport``. ``tests/test_hostile_http.py`` drives it with real sockets.
    """

    head_timeout: float = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is in (or the request refused)
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()  # the next request's head, on a kept-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            logger.debug("closing %s: no complete request head within %g s",
                         self.client, self.head_timeout)
            self.transport.close()


def guarded_protocol(limits: HttpLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol class with the head deadline of ``limits``."""
    return type("GuardedH11Protocol", (_HeadDeadlineProtocol,),
                {"head_timeout": limits.head_timeout_seconds})


def uvicorn_config(app: Any, limits: HttpLimits, **options: Any) -> uvicorn.Config:
    """A uvicorn config for ``app`` with every connection limit of ``limits``.

    ``options`` are passed through (host, port, log_level, lifespan, ...).
    """
    return uvicorn.Config(
        app,
        http=guarded_protocol(limits),
        h11_max_incomplete_event_size=limits.max_head_bytes,
        limit_concurrency=limits.max_connections,
        timeout_keep_alive=limits.keep_alive_seconds,
        **options,
    )

