"""What the simulation reads of a device, in one small picklable value.

The recorder (:mod:`edgeota.simulator.report`), the fault injector
(:mod:`edgeota.simulator.faults`) and the run (:mod:`edgeota.simulator.run`)
look at a device only through a :class:`StatusSnapshot`: its connection,
what it serves, its journals, its counters and download figures. A device
stepped in this process takes one on demand
(:meth:`~edgeota.simulator.device.SimulatedDevice.snapshot`, i.e.
:func:`read_status`); a device stepped in a device process
(:mod:`edgeota.simulator.processes`) has the last one its process sent.
So there is one way to read a device's state, wherever it runs, and the
agent's internals are read in one place (here).

A snapshot is plain data (dicts, frozen dataclasses of the agent's journal
records), small (a journal's history is bounded by the agent) and taken
without blocking on the device's work.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any

from edgeota.agent.journal import JournalRecord
from edgeota.agent.resumable import DownloadStats

__all__ = ["StatusSnapshot", "read_status", "status_of"]


@dataclass(frozen=True)
class StatusSnapshot:
    """One look at a device, as the recorder, faults and run need it.

    ``journals`` holds only the journals the agent has opened (a model it
    never touched has nothing to report); ``connection`` the fields of its
    MQTT connection's counters (``None``: no connection, the HTTP transport);
    ``download`` the resumable downloads' figures (``None``: not tracked).
    ``pid`` and ``taken_at`` (``time.monotonic()`` there) say where and when
    it was taken; they are not part of equality, so "did the device change"
    is a plain ``==``.
    """

    device_id: str
    hardware: str
    ready: bool
    serving: dict[str, str] = field(default_factory=dict)
    journals: dict[str, JournalRecord] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)  # last failure reason per model
    check_failures: dict[str, int] = field(default_factory=dict)
    cycles: int = 0
    inferences: int = 0
    inference_errors: int = 0
    step_errors: int = 0
    power_losses: int = 0
    restarts: int = 0
    download: DownloadStats | None = None
    connection: dict[str, int] | None = None
    pid: int = field(default=0, compare=False)
    taken_at: float = field(default=0.0, compare=False)

    def journal(self, name: str) -> JournalRecord | None:
        """The model's journal record, or ``None`` when the agent never opened it."""
        return self.journals.get(name)

    def journal_state(self, name: str) -> str:
        """The model's journal state (``idle`` when the agent never opened that journal)."""
        record = self.journals.get(name)
        return "idle" if record is None else str(record.state)

    def offline(self) -> StatusSnapshot:
        """This snapshot with the connection down (its process is gone)."""
        return dataclasses.replace(self, ready=False)


def status_of(device: Any) -> StatusSnapshot:
    """``device``'s status: a snapshot as is, the device's own :meth:`snapshot`, or a read.

    The last case is for duck-typed stand-ins (the report's unit tests) that
    offer what :func:`read_status` reads.
    """
    if isinstance(device, StatusSnapshot):
        return device
    snapshot = getattr(device, "snapshot", None)
    if callable(snapshot):
        taken: StatusSnapshot = snapshot()  # a device's snapshot() returns one
        return taken
    return read_status(device)


def read_status(device: Any) -> StatusSnapshot:
    """Read a device stepped in this process (any thread), duck-typed.

    It reads ``device.agent.session`` (``ready``, ``counters()``;
    ``None`` for the HTTP transport: never offline then), ``device.serving()``,
    the agent's opened journals (``agent.journal_records()``: opening one
    from here while the device's worker opens it too would leave the agent
    with a stale second journal, so unopened ones are not read), and, when the
    device has them, ``device.counters`` (reasons, check failures, step
    tallies), ``device.restarts`` and ``device.download_stats()``.
    """
    agent = device.agent
    connection = agent.session
    ready = True
    counts: dict[str, int] | None = None
    if connection is not None:
        value = connection.ready  # a property on DeviceConnection
        ready = bool(value() if callable(value) else value)
        counters_of = getattr(connection, "counters", None)
        if callable(counters_of):
            counts = _fields(counters_of())
    journals = {str(name): record for name, record in agent.journal_records().items()}
    counters = getattr(device, "counters", None)
    reasons = getattr(counters, "reasons", None)
    check_failures = getattr(counters, "check_failures", None)
    stats_of = getattr(device, "download_stats", None)
    stats = stats_of() if callable(stats_of) else None
    return StatusSnapshot(
        device_id=str(device.device_id),
        hardware=str(getattr(device, "hardware", "unknown")),
        ready=ready,
        serving=dict(device.serving()),
        journals=journals,
        reasons={str(k): str(v) for k, v in dict(reasons or {}).items() if v},
        check_failures=dict(check_failures or {}),
        cycles=int(getattr(counters, "cycles", 0)),
        inferences=int(getattr(counters, "inferences", 0)),
        inference_errors=int(getattr(counters, "inference_errors", 0)),
        step_errors=int(getattr(counters, "step_errors", 0)),
        power_losses=int(getattr(counters, "power_losses", 0)),
        restarts=int(getattr(device, "restarts", 0)),
        download=dataclasses.replace(stats) if isinstance(stats, DownloadStats) else None,
        connection=counts,
        pid=os.getpid(),
        taken_at=time.monotonic(),
    )


def _fields(counters: Any) -> dict[str, int]:
    """The integer fields of a counters object (a dataclass or a namespace)."""
    if dataclasses.is_dataclass(counters) and not isinstance(counters, type):
        items = dataclasses.asdict(counters).items()
    else:
        items = vars(counters).items()
    return {str(k): int(v) for k, v in items if isinstance(v, int | float)}
