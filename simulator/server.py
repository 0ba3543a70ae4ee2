"""The server a simulated fleet talks to: in this process, a child process, or one that runs.

A simulation needs three things from its server: an HTTP URL for the
operator API (enrolment, publish, deploy), an operator configuration
(release keys, trusted roots, an admin token: ``operator.toml``) and, for
the report, the server's CPU time. Where the server runs decides what else
is available:

* :class:`InProcessServer` (``edgeota sim run --in-process``, the tests):
  :class:`~edgeota.server.embedded.EmbeddedServer` plus the MQTT transport
  with the embedded broker, in this process. Fast to start, and the only
  mode where the attack suite can play a malicious server (it uses the
  server's online keys and storage directly). Its CPU time cannot be told
  apart from the devices', so the report leaves it out.
* :class:`ServerProcess` (the default of ``edgeota sim run``): a fresh home
  and ``edgeota serve`` in a child process (embedded broker), so the
  server's CPU per device update is its own, as in production.
* :class:`JoinedServer` (``--server URL --home DIR``): an ``edgeota serve``
  that already runs, with its broker (``--broker`` overrides the address
  devices connect to). The simulator only adds devices of its own (ids and a
  ``sim`` tag unique to the run), so it never deploys to real devices.

In the last two, the server's CPU time comes from its ``/metrics``
(``process_cpu_seconds_total``), the figure a Prometheus scraper sees.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from edgeota.protocol.errors import EdgeotaError

__all__ = [
    "START_TIMEOUT",
    "InProcessServer",
    "JoinedServer",
    "ServerChoice",
    "ServerProcess",
    "SimServer",
    "SimServerError",
    "open_server",
]

logger = logging.getLogger(__name__)

START_TIMEOUT = 60.0  # seconds for a server to answer /healthz
STOP_TIMEOUT = 30.0
ENGINE_INTERVAL = 0.5  # seconds: the rollout engine's period on a server the simulation owns
METRICS_TIMEOUT = 5.0


class SimServerError(EdgeotaError):
    """The simulation's server could not be started or reached (the message says why)."""


@dataclass(frozen=True)
class ServerChoice:
    """Where the fleet's server comes from (see the module docstring)."""

    mode: Literal["in-process", "process", "join"] = "in-process"
    url: str | None = None  # join: the server's base URL
    home: Path | None = None  # join: the operator home holding operator.toml
    broker: str | None = None  # join: mqtts://HOST:PORT devices use instead of the advertised one

    def __post_init__(self) -> None:
        if self.mode == "join" and (self.url is None or self.home is None):
            raise SimServerError("joining a server needs its URL (--server) and an operator "
                                 "home with operator.toml (--home)")
        if self.mode != "join" and (self.url or self.home or self.broker):
            raise SimServerError("--home and --broker only apply with --server URL")


class SimServer:
    """What the simulation uses of a server; subclasses say where it runs."""

    url: str = ""
    operator: Any = None  # OperatorConfig
    client: Any = None  # OperatorClient with the operator's admin token
    device_id_prefix: str = "sim"
    broker_override: str | None = None

    def start(self, workdir: Path) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    @property
    def in_process(self) -> bool:
        return False

    @property
    def ctx(self) -> Any:
        """The server's context (in-process only: the attack suite and tests need it)."""
        raise SimServerError("the server runs in another process: its internals are out of "
                             "reach (run with --in-process)")

    @property
    def transport(self) -> Any:
        raise SimServerError("the server runs in another process: its MQTT transport is out "
                             "of reach (run with --in-process)")

    @property
    def bridge(self) -> Any:
        """The server's running fetch bridge, or None when it is not in this process."""
        return None

    def cpu_seconds(self) -> float | None:
        """The server's cumulative CPU seconds, or None when they cannot be told apart."""
        return _scrape_cpu_seconds(self.url)

    def _connect_client(self) -> None:
        from edgeota.server.client import OperatorClient

        self.client = OperatorClient(self.url, self.operator.token())


class InProcessServer(SimServer):
    """The embedded server and broker in this process (fast; the attack suite needs it)."""

    def __init__(self) -> None:
        self._server: Any = None
        self._transport: Any = None

    @property
    def in_process(self) -> bool:
        return True

    @property
    def ctx(self) -> Any:
        return self._server.ctx

    @property
    def transport(self) -> Any:
        return self._transport

    def start(self, workdir: Path) -> None:
        from edgeota.server.config import load_operator_config
        from edgeota.server.embedded import EmbeddedServer, bind_loopback
        from edgeota.server.transport import MqttTransport

        sock = bind_loopback()
        config, mqtt_port = _fresh_home(workdir / "home", http_port=sock.getsockname()[1])
        self.operator = load_operator_config(config.home)
        self._server = EmbeddedServer(config, sock)
        self._server.start()
        self.url = self._server.url
        self._transport = MqttTransport(config.ca_dir, self._server.ctx.store,
                                        embedded_port=mqtt_port,
                                        sessions=self._server.ctx.sessions,
                                        clock=self._server.ctx.clock)
        self._transport.start()
        self._server.ctx.notify = self._transport.notify
        self._connect_client()

    def stop(self) -> None:
        for close in (getattr(self.client, "close", None),
                      getattr(self._transport, "stop", None),
                      getattr(self._server, "stop", None)):
            if close is None:
                continue
            try:
                close()
            except Exception:
                logger.exception("stopping the in-process server failed")

    @property
    def bridge(self) -> Any:
        return self._transport.bridge

    def cpu_seconds(self) -> float | None:
        return None  # shares this process with the devices


class ServerProcess(SimServer):
    """A fresh home and ``edgeota serve`` (embedded broker) in a child process."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self.log: Path | None = None

    def start(self, workdir: Path) -> None:
        from edgeota.server.config import load_operator_config
        from edgeota.server.embedded import bind_loopback

        probe = bind_loopback()
        http_port = probe.getsockname()[1]
        probe.close()  # the child binds it next
        config, _mqtt_port = _fresh_home(workdir / "home", http_port=http_port)
        self.operator = load_operator_config(config.home)
        self.url = f"http://127.0.0.1:{http_port}"
        self.log = workdir / "server.log"
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "edgeota.cli", "serve", "--home", str(config.home)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not _healthy(self.url):
            if self._process.poll() is not None:
                raise SimServerError(f"edgeota serve exited with {self._process.returncode} "
                                     f"before answering; its log ({self.log}):\n{self._tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise SimServerError(f"edgeota serve did not answer {self.url}/healthz within "
                                     f"{START_TIMEOUT:g} s; its log ({self.log}):\n{self._tail()}")
            time.sleep(0.1)  # polling a child process's readiness, bounded by the deadline
        self._connect_client()

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The child ``edgeota serve`` (``None`` before :meth:`start` and after :meth:`stop`)."""
        return self._process

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)  # uvicorn shuts down cleanly on SIGINT
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            logger.warning("edgeota serve did not stop within %ss: killed", STOP_TIMEOUT)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(STOP_TIMEOUT)

    def _tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:] if self.log else ""
        except OSError:
            return ""


class JoinedServer(SimServer):
    """An ``edgeota serve`` that already runs, reached with an operator home's credentials."""

    def __init__(self, choice: ServerChoice) -> None:
        assert choice.url is not None and choice.home is not None
        self.url = choice.url.rstrip("/")
        self._home = choice.home
        self.broker_override = choice.broker
        # Devices of this run only: unique ids and tag, so a deploy never selects real ones.
        self.device_id_prefix = f"sim-{os.urandom(3).hex()}"

    def start(self, workdir: Path) -> None:
        from edgeota.server.config import load_operator_config

        self.operator = load_operator_config(self._home)
        if not _healthy(self.url):
            raise SimServerError(f"no edgeota server answers {self.url}/healthz")
        self._connect_client()

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()


def open_server(choice: ServerChoice) -> SimServer:
    if choice.mode == "join":
        return JoinedServer(choice)
    if choice.mode == "process":
        return ServerProcess()
    return InProcessServer()


def _fresh_home(home: Path, *, http_port: int) -> tuple[Any, int]:
    """``edgeota init`` for a simulation: loopback ports, 16 bins, a fast rollout engine."""
    from edgeota.server.config import load_server_config
    from edgeota.server.embedded import bind_loopback
    from edgeota.server.home import HomeOptions, init_home

    probe = bind_loopback()
    mqtt_port = probe.getsockname()[1]
    probe.close()  # the embedded broker binds it next
    init_home(home, HomeOptions(http=f"127.0.0.1:{http_port}", mqtt=f"127.0.0.1:{mqtt_port}",
                                bin_bits=4))
    config = dataclasses.replace(load_server_config(home),
                                 rollout_interval_seconds=ENGINE_INTERVAL)
    config.save()
    return config, mqtt_port


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _scrape_cpu_seconds(url: str) -> float | None:
    """``process_cpu_seconds_total`` from the server's /metrics (None if it has none)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        response = httpx.get(f"{url}/metrics", timeout=METRICS_TIMEOUT)
        response.raise_for_status()
    except httpx.HTTPError as e:
        logger.warning("could not read the server's CPU time from /metrics: %s", e)
        return None
    for family in text_string_to_metric_families(response.text):
        if family.name == "process_cpu_seconds":
            return float(family.samples[0].value)
    return None
