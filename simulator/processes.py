"""A simulated fleet stepped in a few device processes, seen from the simulation.

With ``Simulation(..., device_processes=P)`` the simulation's process keeps
the server, the enrolment, the timeline, the faults and the recorder, and
hands the devices' work to P child processes (:mod:`edgeota.simulator.worker`,
started with the "spawn" method: no forked locks or threads). The fleet is
split round-robin, so each process gets a mix of hardware classes.

:class:`DeviceProcessPool` starts them, waits (bounded) until every device
in every process is connected, runs and halts their fleet runners, and stops
them. Each device is mirrored here by a :class:`RemoteDevice`, with the read
and action API of a :class:`~edgeota.simulator.device.SimulatedDevice` that
the run, recorder, faults and demo use
(:class:`~edgeota.simulator.device.FleetDevice`):

* reads (``snapshot()``, ``serving()``, ``journal_state()``) come from the
  last :class:`~edgeota.simulator.snapshot.StatusSnapshot` its process sent
  (at most ``snapshot_seconds`` old; a reader thread per process takes them
  in as they come, so a child never waits on the simulation);
* actions (``drop_connection``, ``arm_power_loss``, ``set_free_bytes``,
  ``skew_clock``, ``predict_rows``) are requests to its process, each
  answered within a timeout or failing with :class:`DeviceProcessError`.

A process that dies (killed, crashed, failed to start) is never a hang:
its reader sees the pipe close or the process end, every pending request
fails at once, its devices read as offline, and :meth:`DeviceProcessPool.problems`
says which process ended, with its exit code and the tail of its log.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import wait as wait_for_any
from pathlib import Path
from typing import Any

import numpy as np

from edgeota.agent.runner import AgentSettings
from edgeota.protocol.errors import EdgeotaError
from edgeota.simulator.device import POWER_LOSS_STATES, DeviceSpec, DeviceTiming
from edgeota.simulator.snapshot import StatusSnapshot
from edgeota.simulator.worker import (
    Failed,
    Ready,
    Reply,
    Request,
    Statuses,
    WorkerSpec,
    serve,
)

__all__ = ["DeviceProcess", "DeviceProcessError", "DeviceProcessPool", "RemoteDevice"]

logger = logging.getLogger(__name__)

START_SECONDS = 180.0  # spawn, imports, every device started and connected
REQUEST_SECONDS = 10.0  # a fault's action on one device
PREDICT_SECONDS = 120.0  # a model run over a test split
STOP_SECONDS = 20.0  # a process to close its devices and exit, before it is killed
_READ_SECONDS = 1.0  # how often a reader looks up from a quiet pipe
_TAIL_BYTES = 4096  # of a dead process's log, read back
_TAIL_LINES = 12
_JOIN_SECONDS = 5.0  # for a process that has ended (or was killed) to be reaped


class DeviceProcessError(EdgeotaError):
    """A device process failed to start, died, or did not answer in time."""


@dataclass
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    reply: Reply | None = None


class DeviceProcess:
    """One child process stepping a share of the fleet, and its devices' last statuses."""

    def __init__(self, spec: WorkerSpec, context: Any) -> None:
        self.spec = spec
        self.index = spec.index
        child_requests, self._requests = context.Pipe(duplex=False)
        self._messages, child_messages = context.Pipe(duplex=False)
        self._child_ends = (child_requests, child_messages)
        self._process = context.Process(
            target=serve, args=(spec, child_requests, child_messages),
            name=f"edgeota-sim-devices-{spec.index}", daemon=True)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._statuses: dict[str, StatusSnapshot] = {}
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._ready = threading.Event()
        self._ended = threading.Event()
        self._stopping = False
        self._failure: str | None = None  # what the child said when its start failed
        self._problem: str | None = None
        self._reader: threading.Thread | None = None
        self.pid: int | None = None

    # -- life ------------------------------------------------------------------------

    def start(self) -> None:
        self._process.start()
        self.pid = self._process.pid
        for end in self._child_ends:
            end.close()  # the child holds them: its death closes the pipe for the reader
        self._reader = threading.Thread(target=self._read, name=f"sim-devices-{self.index}",
                                        daemon=True)
        self._reader.start()
        logger.info("device process started", extra={"worker": self.index, "pid": self.pid,
                                                     "devices": len(self.spec.devices)})

    def wait_ready(self, timeout: float) -> None:
        """Wait until every device of the process is connected; raise if it cannot be."""
        deadline = time.monotonic() + timeout
        while not self._ready.is_set():
            if self._ended.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
                if self._ready.is_set():
                    return
                raise DeviceProcessError(self.problem() or self._describe("ended"))
            if time.monotonic() > deadline:
                raise DeviceProcessError(self._describe(
                    f"did not start its devices within {timeout:g} s"))

    @property
    def alive(self) -> bool:
        return not self._ended.is_set()

    def problem(self) -> str | None:
        """What went wrong with the process (it died, or failed to start); None if nothing."""
        with self._lock:
            return self._problem

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """Ask the process to stop; terminate, then kill it if it does not within ``timeout``."""
        self._stopping = True
        if self.alive and self._process.pid is not None:
            with contextlib.suppress(DeviceProcessError):  # already gone: joined below
                self._send(Request(next(self._ids), "stop"))
        if self._process.pid is not None:
            self._process.join(timeout)
            for end in (self._process.terminate, self._process.kill):
                if self._process.exitcode is not None:
                    break
                logger.warning("device process did not stop: %s", end.__name__,
                               extra={"worker": self.index, "pid": self.pid})
                end()
                self._process.join(_JOIN_SECONDS)
        if self._reader is not None:
            self._reader.join(_JOIN_SECONDS)
        else:
            for end in (*self._child_ends, self._messages):
                end.close()  # never started: no reader owns them
        self._requests.close()

    # -- statuses and requests -------------------------------------------------------

    def status(self, device_id: str, hardware: str = "unknown") -> StatusSnapshot:
        """The device's last status (offline once the process is gone, or before any)."""
        with self._lock:
            status = self._statuses.get(device_id)
        if status is None:  # its process could not look at it yet
            return StatusSnapshot(device_id, hardware, ready=False)
        return status if self.alive else status.offline()

    def update(self, statuses: Sequence[StatusSnapshot]) -> None:
        """Keep the newer of each device's statuses (a reply may cross a periodic message)."""
        with self._lock:
            for status in statuses:
                known = self._statuses.get(status.device_id)
                if known is None or status.taken_at >= known.taken_at:
                    self._statuses[status.device_id] = status

    def request(self, kind: str, device_id: str = "", value: Any = None, *,
                timeout: float = REQUEST_SECONDS) -> Any:
        """Ask the process to do ``kind``; its answer, or :class:`DeviceProcessError`."""
        request = Request(next(self._ids), kind, device_id, value)
        pending = _Pending()
        with self._lock:
            if self._ended.is_set():
                raise DeviceProcessError(self._describe("is not running"))
            self._pending[request.request_id] = pending
        try:
            self._send(request)
            if not pending.done.wait(timeout):
                raise DeviceProcessError(self._describe(
                    f"did not answer {kind} within {timeout:g} s"))
        finally:
            with self._lock:
                self._pending.pop(request.request_id, None)
        reply = pending.reply
        if reply is None:
            raise DeviceProcessError(self.problem() or self._describe("ended"))
        if reply.error is not None:
            raise DeviceProcessError(f"device process {self.index}: {kind} "
                                     f"{device_id or ''} failed: {reply.error}")
        return reply.value

    def _send(self, request: Request) -> None:
        with self._send_lock:
            try:
                self._requests.send(request)
            except (OSError, ValueError) as e:
                raise DeviceProcessError(self._describe(f"cannot be reached ({e})")) from e

    # -- the reader ------------------------------------------------------------------

    def _read(self) -> None:
        """Take in everything the process sends until its pipe closes or it ends."""
        sentinel = self._process.sentinel
        try:
            while True:
                ready = wait_for_any([self._messages, sentinel], _READ_SECONDS)
                if self._messages in ready:
                    try:
                        self._take(self._messages.recv())
                    except (EOFError, OSError):
                        break
                elif sentinel in ready:
                    while self._messages.poll(0):  # what it sent before it ended
                        self._take(self._messages.recv())
                    break
        except (EOFError, OSError):
            pass
        except Exception:
            logger.exception("reading from a device process failed",
                             extra={"worker": self.index})
        finally:
            self._end()

    def _take(self, message: Any) -> None:
        if isinstance(message, Statuses):
            self.update(message.statuses)
        elif isinstance(message, Reply):
            with self._lock:
                pending = self._pending.get(message.request_id)
            if pending is not None:
                pending.reply = message
                pending.done.set()
        elif isinstance(message, Ready):
            self.update(message.statuses)
            self._ready.set()
        elif isinstance(message, Failed):
            with self._lock:
                self._failure = message.error
        else:
            logger.error("unexpected message from a device process: %r", type(message),
                         extra={"worker": self.index})

    def _end(self) -> None:
        self._process.join(_JOIN_SECONDS)  # the pipe closes as the process exits
        code = self._process.exitcode
        with self._lock:
            if not self._stopping or self._failure is not None:
                what = (f"failed to start: {self._failure}" if self._failure is not None
                        else f"exited with {_exit_text(code)}")
                self._problem = self._describe(what, tail=True)
                logger.error("device process ended", extra={
                    "worker": self.index, "pid": self.pid, "exit_code": code})
            self._ended.set()
            pending, self._pending = list(self._pending.values()), {}
        for waiting in pending:
            waiting.done.set()  # no reply: the caller reads the problem

    def _describe(self, what: str, *, tail: bool = False) -> str:
        ids = [d.device_id for d in self.spec.devices]
        shown = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
        text = f"device process {self.index} (pid {self.pid}; {shown}) {what}"
        if tail:
            lines = _log_tail(self.spec.log_path)
            if lines:
                text += "; its log ends:\n    " + "\n    ".join(lines)
        return text


class RemoteDevice:
    """A device stepped in a device process, as the run, recorder, faults and demo see it."""

    def __init__(self, spec: DeviceSpec, process: DeviceProcess) -> None:
        self.device_id = spec.device_id
        self.hardware = spec.hardware
        self.process = process

    def __repr__(self) -> str:
        return f"RemoteDevice({self.device_id!r}, process={self.process.index})"

    # -- reads: the last status the process sent ---------------------------------------

    def snapshot(self) -> StatusSnapshot:
        return self.process.status(self.device_id, self.hardware)

    def serving(self) -> dict[str, str]:
        return dict(self.snapshot().serving)

    def journal_state(self, name: str) -> str:
        return self.snapshot().journal_state(name)

    # -- actions: requests to the process ------------------------------------------------

    def drop_connection(self) -> bool:
        """Cut the device's MQTT connection; False if there was none (or no process)."""
        if not self.process.alive:
            return False
        return bool(self.process.request("drop", self.device_id))

    def arm_power_loss(self, state: str) -> None:
        if state not in POWER_LOSS_STATES:
            raise ValueError(f"no such state {state!r} (one of {POWER_LOSS_STATES})")
        self._act("arm", state)

    def set_free_bytes(self, free: int | None) -> None:
        if free is not None and free < 0:
            raise ValueError("free bytes cannot be negative")
        self._act("free", free)

    def skew_clock(self, offset: timedelta | None) -> None:
        self._act("skew", None if offset is None else offset.total_seconds())

    def predict_rows(self, name: str,
                     rows: np.ndarray) -> tuple[str, dict[str, np.ndarray]] | None:
        """Run the device's served ``name`` on ``rows`` in its process (see SimulatedDevice)."""
        answer = self.process.request("predict", self.device_id, (name, np.asarray(rows)),
                                      timeout=PREDICT_SECONDS)
        return None if answer is None else (answer[0], dict(answer[1]))

    def _act(self, kind: str, value: Any) -> None:
        if not self.process.alive:
            # Its death is the run's problem already; undoing a fault on it is moot.
            logger.info("device process gone: %s not applied", kind,
                        extra={"device_id": self.device_id})
            return
        self.process.request(kind, self.device_id, value)


class DeviceProcessPool:
    """``processes`` device processes for ``devices`` (split round-robin), and their mirrors."""

    def __init__(
        self,
        devices: Sequence[DeviceSpec],
        *,
        processes: int,
        settings: AgentSettings,
        timing: DeviceTiming,
        log_dir: Path,
        workers: int = 4,
        snapshot_seconds: float = 0.2,
    ) -> None:
        if processes < 1:
            raise ValueError("processes must be at least 1")
        if not devices:
            raise ValueError("no devices to run")
        if snapshot_seconds <= 0:
            raise ValueError("snapshot_seconds must be positive")
        count = min(processes, len(devices))
        context = multiprocessing.get_context("spawn")
        self.processes = [DeviceProcess(WorkerSpec(
            index=index + 1, devices=tuple(devices[index::count]), settings=settings,
            timing=timing, log_path=log_dir / f"device-process-{index + 1}.log",
            workers=workers, snapshot_seconds=snapshot_seconds), context)
            for index in range(count)]
        by_id = {d.device_id: RemoteDevice(d, p)
                 for p in self.processes for d in p.spec.devices}
        self.devices = [by_id[d.device_id] for d in devices]  # the scenario's order

    def start(self, timeout: float = START_SECONDS) -> None:
        """Start every process; wait until all their devices are connected (or raise)."""
        for process in self.processes:
            process.start()
        deadline = time.monotonic() + timeout
        for process in self.processes:
            process.wait_ready(max(0.0, deadline - time.monotonic()))

    def run(self) -> list[str]:
        """Start stepping the devices in every process. Returns what went wrong."""
        problems = []
        for process in self.processes:
            try:
                process.request("run")
            except DeviceProcessError as e:
                if process.alive:  # a dead one is reported by problems()
                    problems.append(str(e))
        return problems

    def halt(self, timeout: float | None = None) -> list[str]:
        """Stop stepping; take every device's final status. Returns what went wrong."""
        problems = []
        for process in self.processes:
            if not process.alive:
                continue
            wait = timeout if timeout is not None else process.spec.halt_timeout + REQUEST_SECONDS
            try:
                process.update(process.request("halt", timeout=wait))
            except DeviceProcessError as e:
                if process.alive:  # a dead one is reported by problems()
                    problems.append(str(e))
        return problems

    def failed(self) -> bool:
        """Whether a process has ended while it was not asked to."""
        return any(p.problem() is not None for p in self.processes)

    def problems(self) -> list[str]:
        return [problem for p in self.processes if (problem := p.problem()) is not None]

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """Stop every process (bounded: each is terminated, then killed, if it lingers)."""
        for process in self.processes:
            try:
                process.stop(timeout)
            except Exception:
                logger.exception("stopping a device process failed",
                                 extra={"worker": process.index})


def _exit_text(code: int | None) -> str:
    if code is None:
        return "no exit code (still running, or not reaped in time)"
    if code < 0:
        try:
            return f"code {code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"code {code}"
    return f"code {code}"


def _log_tail(log_path: Path) -> list[str]:
    """The last lines of a device process's log and, after them, of its stderr."""
    lines: list[str] = []
    for path in (log_path, log_path.with_suffix(".stderr")):
        try:
            with path.open("rb") as f:
                f.seek(0, 2)
                size = f.tell()
                f.seek(max(0, size - _TAIL_BYTES))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        chunk = text.splitlines()
        if size > _TAIL_BYTES and chunk:
            chunk = chunk[1:]  # the first line is likely cut
        lines += [line for line in chunk if line.strip()]
    return [line[:300] for line in lines[-_TAIL_LINES:]]
