"""Run the update server inside this process, on a loopback socket.

What ``edgeota demo``, the simulator and the tests use instead of a separate
``edgeota serve`` process: the same FastAPI app and context, served by uvicorn
on a thread, on a socket bound before the home is created so its URL is known.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime

import uvicorn

from edgeota.protocol.errors import EdgeotaError
from edgeota.server.api.app import create_app
from edgeota.server.api.serving import uvicorn_config
from edgeota.server.config import ServerConfig
from edgeota.server.context import ServerContext

__all__ = ["EmbeddedServer", "bind_loopback"]

START_TIMEOUT = 20.0  # seconds


class EmbeddedServerError(EdgeotaError):
    """The in-process server did not start or stop in time."""


def bind_loopback(port: int = 0) -> socket.socket:
    """A TCP socket bound on 127.0.0.1 (port 0: the kernel picks a free one)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


class EmbeddedServer:
    """Start and stop the server app on a thread; restartable on the same port."""

    def __init__(
        self,
        config: ServerConfig,
        sock: socket.socket,
        *,
        clock: Callable[[], datetime] | None = None,
        background_refresh: bool = False,
        rollout_engine: bool = True,
    ) -> None:
        self.config = config
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self.clock = clock
        self.background_refresh = background_refresh
        # Tests that drive rollouts.advance() themselves turn the periodic engine off.
        self.rollout_engine = rollout_engine
        self.ctx: ServerContext | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.sock.fileno() == -1:  # uvicorn closes its socket on shutdown
            self.sock = bind_loopback(self.port)
        self.ctx = ServerContext.open(self.config, clock=self.clock)
        app = create_app(self.ctx, background_refresh=self.background_refresh,
                         rollout_engine=self.rollout_engine)
        self._server = uvicorn.Server(uvicorn_config(app, self.config.http_limits,
                                                     log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self.sock]}, daemon=True,
                                        name="edgeota-server")
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise EmbeddedServerError(f"server did not start within {START_TIMEOUT}s")
            time.sleep(0.01)

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(START_TIMEOUT)
            if self._thread.is_alive():
                raise EmbeddedServerError(f"server did not stop within {START_TIMEOUT}s")
        if self.ctx is not None:
            self.ctx.close()
        self._server = self._thread = self.ctx = None

    def __enter__(self) -> EmbeddedServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
        self.sock.close()
