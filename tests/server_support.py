"""A real edgeota server for tests: an initialised home, uvicorn on a loopback socket.

The server runs in a thread of the test process on a socket bound to port 0,
so tests never race for ports. Operator commands run through the real CLI
entry point (in-process, output captured), exactly as a person would type them.
"""

from __future__ import annotations

import contextlib
import io
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

from edgeota.cli import main as cli_main
from edgeota.server.config import (
    OperatorConfig,
    ServerConfig,
    load_operator_config,
    load_server_config,
)
from edgeota.server.context import ServerContext
from edgeota.server.embedded import EmbeddedServer, bind_loopback
from edgeota.server.home import HomeOptions, init_home
from edgeota.server.tokens import Role, issue_token
from edgeota.server.transport import MqttTransport

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
    enrolled: dict[str, Path] = field(default_factory=dict)
    # Off: tests call rollouts.advance() when they want the engine to act.
    rollout_engine: bool = False

    def __post_init__(self) -> None:
        self._embedded = EmbeddedServer(load_server_config(self.home), self.sock,
                                        clock=self.clock, rollout_engine=self.rollout_engine)
        self.sock_port: int = self._embedded.port

    @property
    def url(self) -> str:
        return self._embedded.url

    @property
    def ctx(self) -> ServerContext:
        assert self._embedded.ctx is not None, "server is not running"
        return self._embedded.ctx

    @property
    def config(self) -> ServerConfig:
        return load_server_config(self.home)

    @property
    def operator(self) -> OperatorConfig:
        return load_operator_config(self.home)

    def start(self) -> None:
        # Re-read server.toml: a key rotation may have changed it while stopped.
        self._embedded.config = load_server_config(self.home)
        self._embedded.start()
        self.sock = self._embedded.sock

    def stop(self) -> None:
        self._embedded.stop()

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
    return bind_loopback(port)


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


@contextlib.contextmanager
def running_mqtt_server(tmp_path: Path, db_url: str,
                        **home: object) -> Iterator[tuple[RunningServer, MqttTransport]]:
    """A server plus its MQTT side: embedded TLS broker with the device ACL, bridge, sink."""
    probe = bind_loopback()
    port = probe.getsockname()[1]
    probe.close()  # the embedded broker binds it next
    options = HomeOptions(**{"bin_bits": 4, **home, "mqtt": f"127.0.0.1:{port}"})
    with running_server(tmp_path, db_url, options) as server:
        transport = MqttTransport(server.config.ca_dir, server.ctx.store, embedded_port=port,
                                  sessions=server.ctx.sessions, clock=server.ctx.clock)
        transport.start()
        server.ctx.notify = transport.notify
        try:
            yield server, transport
        finally:
            transport.stop()


@pytest.fixture
def mqtt_server(tmp_path: Path, db_url: str) -> Iterator[tuple[RunningServer, MqttTransport]]:
    """A fresh server reachable over MQTT (embedded broker), on SQLite and on PostgreSQL."""
    with running_mqtt_server(tmp_path, db_url) as pair:
        yield pair
