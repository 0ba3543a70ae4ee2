"""A device process: one share of a simulated fleet, stepped in its own process.

A simulation with ``device_processes=P`` (:mod:`edgeota.simulator.processes`)
starts P of these with the "spawn" start method. Each gets a
:class:`WorkerSpec` -- plain data: the enrolled device folders, agent
settings, timing, hardware emulation -- and builds the very same
:class:`~edgeota.simulator.device.SimulatedDevice` s a simulation builds in
its own process (:meth:`~edgeota.simulator.device.SimulatedDevice.from_spec`),
with one :class:`~edgeota.simulator.mqtt_loop.SharedNetworkLoop` for all their
MQTT connections and one :class:`~edgeota.simulator.fleet.FleetRunner` (a few
threads) stepping them: no thread per device, no second copy of the agent.

It talks to the parent over two one-way pipes:

* **requests** (parent to child, :class:`Request`): ``run`` and ``halt`` the
  fleet runner, a fault's action on one device (``drop``, ``arm``, ``free``,
  ``skew``), ``predict`` on one device's served model, a fresh ``snapshot``,
  ``stop``. Each is answered by a :class:`Reply` with the same id.
* **messages** (child to parent): :class:`Ready` once every device serves
  what it committed and is connected, then :class:`Statuses` every
  ``snapshot_seconds``: one message with the
  :class:`~edgeota.simulator.snapshot.StatusSnapshot` of every device that
  changed since the last one sent. Statuses are never queued: a look taken
  while the parent is slow to read replaces the unsent one (the newest state
  wins, memory stays O(devices)). :class:`Failed` if the start failed.

The process logs to ``spec.log_path`` (bounded, rotated) and sends its
``stderr`` (tracebacks, a fatal signal's dump) to ``spec.log_path`` with the
suffix ``.stderr``, so a parent that sees it die can show why. It stops on
``stop`` or when the parent's end of the requests pipe closes (the parent
died): it never outlives its simulation.
"""

from __future__ import annotations

import faulthandler
import logging
import logging.handlers
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from edgeota.agent.runner import AgentSettings
from edgeota.protocol.errors import EdgeotaError
from edgeota.simulator.device import DeviceSpec, DeviceTiming, SimulatedDevice
from edgeota.simulator.fleet import FleetRunner
from edgeota.simulator.snapshot import StatusSnapshot

__all__ = [
    "REQUEST_KINDS",
    "Failed",
    "Ready",
    "Reply",
    "Request",
    "Statuses",
    "WorkerError",
    "WorkerSpec",
    "serve",
]

logger = logging.getLogger(__name__)

REQUEST_KINDS = frozenset({"run", "halt", "drop", "arm", "free", "skew", "predict", "snapshot",
                           "stop"})
_POLL_SECONDS = 0.5  # how often the request loop looks up from a quiet pipe
_LOG_BYTES = 4 * 1024 * 1024  # per log file; one rotated file is kept
_JOIN_SECONDS = 5.0


class WorkerError(EdgeotaError):
    """The device process could not start its share of the fleet (the message says why)."""


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a device process needs, as plain picklable data."""

    index: int
    devices: tuple[DeviceSpec, ...]
    settings: AgentSettings
    timing: DeviceTiming
    log_path: Path
    workers: int = 4  # threads stepping this process's devices
    snapshot_seconds: float = 0.2
    connect_timeout: float = 60.0  # for every device's first MQTT connection
    halt_timeout: float = 60.0  # for a step in progress to finish on halt
    log_level: int = logging.INFO


@dataclass(frozen=True)
class Request:
    """Parent to child: do ``kind`` (on ``device_id``, with ``value``); answered by a Reply."""

    request_id: int
    kind: str
    device_id: str = ""
    value: Any = None


@dataclass(frozen=True)
class Reply:
    """Child to parent: the answer to request ``request_id``; ``error`` if it failed."""

    request_id: int
    value: Any = None
    error: str | None = None


@dataclass(frozen=True)
class Ready:
    """Child to parent: every device started and connected; their first statuses."""

    pid: int
    statuses: tuple[StatusSnapshot, ...]


@dataclass(frozen=True)
class Statuses:
    """Child to parent: the devices whose status changed since the last message."""

    pid: int
    statuses: tuple[StatusSnapshot, ...]


@dataclass(frozen=True)
class Failed:
    """Child to parent: the start failed (then the process exits with code 1)."""

    pid: int
    error: str


def serve(spec: WorkerSpec, requests: Connection, messages: Connection) -> None:
    """The device process's main: start the share, answer requests until ``stop``.

    The target of the parent's ``multiprocessing`` (spawn) process.
    """
    _log_to(spec)
    worker = Worker(spec, messages)
    try:
        worker.start()
    except BaseException as e:  # whatever it was, the parent must hear it
        logger.exception("device process failed to start", extra={"worker": spec.index})
        worker.send(Failed(os.getpid(), "".join(traceback.format_exception_only(e)).strip()))
        worker.close()
        sys.exit(1)
    try:
        worker.answer(requests)
    finally:
        worker.close()


def _log_to(spec: WorkerSpec) -> None:
    """This process's log: a bounded rotated file; stderr and fatal-signal dumps beside it."""
    spec.log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(spec.log_path, maxBytes=_LOG_BYTES,
                                                   backupCount=1)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(process)d %(threadName)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(spec.log_level)
    # A traceback the interpreter prints, or faulthandler's dump on SIGSEGV/SIGABRT; open
    # for the process's life (fd 2 is a copy of it).
    stderr = spec.log_path.with_suffix(".stderr").open("ab", buffering=0)
    os.dup2(stderr.fileno(), 2)
    faulthandler.enable(file=stderr)


class Worker:
    """The devices of one :class:`WorkerSpec`, their network loop, runner and publisher."""

    def __init__(self, spec: WorkerSpec, messages: Connection) -> None:
        from edgeota.simulator.mqtt_loop import SharedNetworkLoop

        self.spec = spec
        self._messages = messages
        self._send_lock = threading.Lock()
        self._network = SharedNetworkLoop()
        self.devices: dict[str, SimulatedDevice] = {}
        self._runner: FleetRunner | None = None
        self._stop = threading.Event()
        self._publisher: threading.Thread | None = None
        self._sent: dict[str, StatusSnapshot] = {}  # the last status sent, per device

    # -- life ------------------------------------------------------------------------

    def start(self) -> None:
        """Build, start and connect every device; say Ready; start publishing statuses."""
        self._network.start()
        for device_spec in self.spec.devices:
            device = SimulatedDevice.from_spec(device_spec, self.spec.settings,
                                               self.spec.timing, self._network)
            self.devices[device.device_id] = device
        for device in self.devices.values():
            device.start()
        deadline = time.monotonic() + self.spec.connect_timeout
        for device in self.devices.values():
            connection = device.agent.session
            if connection is not None and not connection.wait_ready(
                    max(0.1, deadline - time.monotonic())):
                raise WorkerError(f"{device.device_id} did not connect to the broker within "
                                  f"{self.spec.connect_timeout:g} s")
        statuses = self._look(changed_only=False)
        if not self.send(Ready(os.getpid(), statuses)):
            raise WorkerError("the parent is gone")
        self._publisher = threading.Thread(target=self._publish, name="sim-statuses",
                                           daemon=True)
        self._publisher.start()
        logger.info("device process ready", extra={"worker": self.spec.index,
                                                   "devices": len(self.devices)})

    def close(self) -> None:
        """Stop publishing and stepping, close every device and the network loop (bounded)."""
        self._stop.set()
        if self._publisher is not None:
            self._publisher.join(_JOIN_SECONDS)
        if self._runner is not None:
            try:
                self._runner.stop(self.spec.halt_timeout)
            except Exception:
                logger.exception("stopping the fleet runner failed")
            self._runner = None
        for device in self.devices.values():
            try:
                device.close()
            except Exception:
                logger.exception("closing a device failed", extra={"device_id": device.device_id})
        self._network.stop()

    # -- messages to the parent ------------------------------------------------------

    def send(self, message: Any) -> bool:
        """Send one message; False if the parent is gone (then the process stops)."""
        with self._send_lock:
            try:
                self._messages.send(message)
            except (OSError, ValueError):
                self._stop.set()
                return False
        return True

    def _look(self, *, changed_only: bool) -> tuple[StatusSnapshot, ...]:
        found = []
        for device in self.devices.values():
            try:
                status = device.snapshot()
            except Exception:  # one device mid-swap must not stop the others
                logger.exception("status of a device failed",
                                 extra={"device_id": device.device_id})
                continue
            if not changed_only or self._sent.get(device.device_id) != status:
                found.append(status)
        return tuple(found)

    def _publish(self) -> None:
        """Every ``snapshot_seconds``: one message with the statuses that changed."""
        while not self._stop.wait(self.spec.snapshot_seconds):
            changed = self._look(changed_only=True)
            if not changed:
                continue
            # A slow parent blocks this send; nothing piles up meanwhile: the next
            # look is taken after it, so the parent always gets the newest state.
            if not self.send(Statuses(os.getpid(), changed)):
                return
            for status in changed:
                self._sent[status.device_id] = status

    # -- requests from the parent ----------------------------------------------------

    def answer(self, requests: Connection) -> None:
        """Answer requests until ``stop``, or until the parent's end closes."""
        while not self._stop.is_set():
            try:
                if not requests.poll(_POLL_SECONDS):
                    continue
                request = requests.recv()
            except (EOFError, OSError):
                logger.warning("the simulation closed its end: stopping",
                               extra={"worker": self.spec.index})
                return
            if not isinstance(request, Request) or request.kind not in REQUEST_KINDS:
                logger.error("unknown request %r", request)
                continue
            try:
                value = self._do(request)
            except Exception as e:  # the parent gets the error; the process lives on
                logger.exception("request failed", extra={"request": request.kind,
                                                          "device_id": request.device_id})
                self.send(Reply(request.request_id, error=f"{type(e).__name__}: {e}"))
            else:
                self.send(Reply(request.request_id, value))
            if request.kind == "stop":
                return

    def _do(self, request: Request) -> Any:
        kind = request.kind
        if kind == "run":
            if self._runner is None:
                self._runner = FleetRunner(list(self.devices.values()),
                                           workers=self.spec.workers).start()
            return None
        if kind == "halt":
            runner, self._runner = self._runner, None
            if runner is not None:
                runner.stop(self.spec.halt_timeout)
            return self._look(changed_only=False)
        if kind == "snapshot":
            return self._look(changed_only=False)
        if kind == "stop":
            return None
        device = self.devices.get(request.device_id)
        if device is None:
            raise KeyError(f"no device {request.device_id!r} in this process")
        if kind == "drop":
            return device.drop_connection()
        if kind == "arm":
            device.arm_power_loss(str(request.value))
            return None
        if kind == "free":
            device.set_free_bytes(None if request.value is None else int(request.value))
            return None
        if kind == "skew":
            device.skew_clock(None if request.value is None
                              else timedelta(seconds=float(request.value)))
            return None
        name, rows = request.value  # predict
        return device.predict_rows(str(name), rows)
