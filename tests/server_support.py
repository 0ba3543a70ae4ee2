"""A real edgeota server for tests: an initialised home, uvicorn on a loopback socket.

The server runs in a thread of the test process on a socket bound to port 0,
so tests never race for ports. Operator commands run through the real CLI
entry point (in-process, output captured), exactly as a person would type them.
"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
import uvicorn

from edgeota.server.api.app import create_app
from edgeota.server.cli import main as cli_main
from edgeota.server.config import (
    OperatorConfig,
    ServerConfig,
    load_operator_config,
    load_server_config,
)
from edgeota.server.context import ServerContext
from edgeota.server.home import HomeOptions, init_home
from edgeota.server.tokens import Role, issue_token

SAMPLES = Path(__file__).resolve().parent.parent / "firmware_samples"
START_TIMEOUT = 20.0  # seconds


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(*args: str) -> CliResult:
    """Run ``edgeota ARGS`` in-process and capture what it prints."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(args))
    return CliResult(code, out.getvalue(), err.getvalue())


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


@dataclass
class RunningServer:
    home: Path
    sock: socket.socket
    clock: Callable[[], datetime] | None = None
    ctx: ServerContext | None = None
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None
    enrolled: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sock_port: int = self.sock.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock_port}"

    @property
    def config(self) -> ServerConfig:
        return load_server_config(self.home)

    @property
    def operator(self) -> OperatorConfig:
        return load_operator_config(self.home)

    def start(self) -> None:
        if self.sock.fileno() == -1:  # uvicorn closes its socket on shutdown: bind the port again
            self.sock = _bound_socket(self.sock_port)
        self.ctx = ServerContext.open(self.config, clock=self.clock)
        app = create_app(self.ctx, background_refresh=False)
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self._thread.start()
        server = self._server
        wait_for(lambda: server.started, START_TIMEOUT, "uvicorn to start")

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(START_TIMEOUT)
            assert not self._thread.is_alive(), "server thread did not stop"
        if self.ctx is not None:
            self.ctx.close()
        self._server = self._thread = self.ctx = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def cli(self, *args: str) -> CliResult:
        return run_cli(*args, "--home", str(self.home))

    def token(self, role: Role, name: str | None = None) -> str:
        assert self.ctx is not None
        with self.ctx.sessions() as session, session.begin():
            _, token = issue_token(session, name=name or f"test-{role}", role=role)
        return token

    def enroll(self, device_id: str, hardware: str = "rpi4", *tags: str) -> Path:
        out = self.home.parent / f"device-{device_id}"
        args = ["device", "enroll", device_id, "--hardware", hardware, "--out", str(out)]
        for tag in tags:
            args += ["--tag", tag]
        result = self.cli(*args)
        assert result.code == 0, result.err
        self.enrolled[device_id] = out
        return out

    def publish(self, sample: str, version: str, *extra: str) -> CliResult:
        return self.cli(
            "release", "publish", str(SAMPLES / f"{sample}.onnx"), "--name", "digits",
            "--version", version, "--hardware", "rpi4,rpi5",
            "--vectors", str(SAMPLES / f"{sample}.vectors.json"), "--json", *extra,
        )


def _bound_socket(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


@contextlib.contextmanager
def running_server(
    tmp_path: Path,
    db_url: str,
    options: HomeOptions | None = None,
    clock: Callable[[], datetime] | None = None,
) -> Iterator[RunningServer]:
    sock = _bound_socket()
    host, port = sock.getsockname()[:2]
    base = options or HomeOptions(bin_bits=4)
    init_home(
        tmp_path / "home",
        HomeOptions(**{**base.__dict__, "database_url": db_url, "http": f"{host}:{port}"}),
        clock=clock,
    )
    server = RunningServer(home=(tmp_path / "home").resolve(), sock=sock, clock=clock)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        server.sock.close()


@pytest.fixture
def server(tmp_path: Path, db_url: str) -> Iterator[RunningServer]:
    """A fresh server (home, database, repositories) on SQLite and on PostgreSQL."""
    with running_server(tmp_path, db_url) as running:
        yield running
