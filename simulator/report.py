"""What a simulated run looked like: devices per state over time, time to update, costs.

A :class:`FleetRecorder` looks at the fleet when the runner asks it to
(:meth:`~FleetRecorder.sample`, O(devices), a few lock-protected reads per
device) and keeps only what changed: per device the transitions between the
states of :data:`DEVICE_STATES` (with timestamps), the fleet's counts per state
when they changed, failures by reason, and timeline events (publish, deploy,
faults, attack verdicts). Every list is capped and what did not fit is counted,
so an hour-long run of a thousand flapping devices cannot exhaust memory.

An *update wave* starts when the scenario says what it wants
(:meth:`~FleetRecorder.set_targets`, e.g. on a deploy); it is time zero for the
time-to-update figures and the start of the byte and CPU deltas. The figures
come out as a JSON-able dict (:meth:`~FleetRecorder.summary`) and, with
:meth:`~FleetRecorder.write_report`, as files: ``summary.json``, a CSV timeline
per device, the fleet's counts and the events as CSV, and two PNG plots.
:func:`live_view` renders the current counts for ``rich.live.Live``.

The states are read from the real agent, through one
:class:`~edgeota.simulator.snapshot.StatusSnapshot` per device and sample
(taken here for a device stepped in this process, the last one its process
sent for a device in a device process): its MQTT connection (offline), the
model host (what is served) and each model's journal (what the update cycle is
doing). The agent reports an outcome and returns its journal to ``idle`` in the
same call, so ``failed`` and ``rolled_back`` are mostly read from the journal's
history (the last outcome since the wave started), not from its current state.
"""

from __future__ import annotations

import csv
import json
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeota.agent.journal import JournalRecord, State
from edgeota.simulator.snapshot import StatusSnapshot, status_of

__all__ = [
    "DEVICE_STATES",
    "DOWNLOADING",
    "FAILED",
    "OFFLINE",
    "PROBATION",
    "ROLLED_BACK",
    "UPDATED",
    "WAITING",
    "DeviceStatus",
    "FleetRecorder",
    "classify",
    "device_status",
    "live_view",
    "time_to_fraction",
]

OFFLINE = "offline"
WAITING = "waiting"
DOWNLOADING = "downloading"
PROBATION = "probation"
UPDATED = "updated"
FAILED = "failed"
ROLLED_BACK = "rolled_back"
# The closed set a device is shown in, in display order.
DEVICE_STATES: tuple[str, ...] = (
    OFFLINE, WAITING, DOWNLOADING, PROBATION, UPDATED, FAILED, ROLLED_BACK,
)
FAILURE_STATES = frozenset({FAILED, ROLLED_BACK})

# Journal states during which an update is being fetched, checked or installed.
_IN_PROGRESS = frozenset({
    State.DOWNLOADING, State.VERIFYING, State.VALIDATING, State.SWAPPING,
})
_OUTCOMES: Mapping[State, str] = {State.FAILED: FAILED, State.ROLLED_BACK: ROLLED_BACK}
# A device with several models shows the most telling of their states.
_SEVERITY: tuple[str, ...] = (FAILED, ROLLED_BACK, DOWNLOADING, PROBATION, WAITING, UPDATED)
# Colours of the plots and the live view, one per state.
_COLOURS: Mapping[str, str] = {
    OFFLINE: "#9e9e9e", WAITING: "#90caf9", DOWNLOADING: "#ffa726", PROBATION: "#fdd835",
    UPDATED: "#43a047", FAILED: "#e53935", ROLLED_BACK: "#8e24aa",
}
_RICH_STYLES: Mapping[str, str] = {
    OFFLINE: "bright_black", WAITING: "cyan", DOWNLOADING: "yellow", PROBATION: "bright_yellow",
    UPDATED: "green", FAILED: "red", ROLLED_BACK: "magenta",
}
# An event kind seen more often than this is drawn as ticks, not as labelled lines.
_MAX_EVENT_LINES = 20
_MAX_DETAIL_CHARS = 500  # of one event's detail, as JSON
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
# Resume figures a device connection's counters may carry (besides DownloadStats).
_RESUME_FIELDS = ("resumed_downloads", "full_redownloads")

# Earlier update waves whose devices still count when they reach that wave's target.
_TRACKED_WAVES = 4

HistoryEntry = tuple[State, str]


@dataclass(frozen=True)
class DeviceStatus:
    """One look at a device: its state, what it serves, why it failed.

    ``outcome`` identifies the journal entry a ``failed``/``rolled_back`` state
    was read from, so a second failure of the same device (a retry that failed
    again between two samples) is told apart from the first.
    """

    state: str
    version: str = ""
    reason: str | None = None
    outcome: HistoryEntry | None = None


def classify(
    device: Any,
    targets: Mapping[str, str],
    *,
    since: Mapping[str, HistoryEntry | None] | None = None,
) -> str:
    """The device's state in :data:`DEVICE_STATES` with respect to ``targets``.

    ``targets`` maps model name to the version the scenario wants; ``since``
    maps model name to the last journal history entry when the wave started,
    so an outcome of an earlier wave does not count (see :func:`device_status`).
    """
    return device_status(device, targets, since=since).state


def device_status(
    device: Any,
    targets: Mapping[str, str],
    *,
    since: Mapping[str, HistoryEntry | None] | None = None,
) -> DeviceStatus:
    """Classify ``device`` (a device, or a :class:`~edgeota.simulator.snapshot.StatusSnapshot`).

    * ``offline``: its MQTT connection is not ready (no request could be answered)
      and it is not yet ``updated``;
    * ``downloading``: a model's journal is checking .. swapping;
    * ``probation``: a model's journal is in probation;
    * ``updated``: it serves the target version of every model in ``targets``;
    * ``failed`` / ``rolled_back``: the last outcome of a model not on its target,
      since the wave started, was that (the journal's state or history says so);
    * ``waiting``: none of these (idle, not yet on the target). With no targets
      there is nothing to be updated to: every online device is ``waiting``.

    It reads the device's :func:`~edgeota.simulator.snapshot.status_of`:
    the connection's readiness, what it serves, the journals the agent opened
    and, for a failure's reason once the journal is back to idle, the
    device's last reason per model.
    """
    status = status_of(device)
    serving = status.serving
    names = sorted(targets) if targets else sorted(serving)
    version = ";".join(f"{name}@{serving.get(name, '-')}" for name in names)
    if not targets:
        return DeviceStatus(WAITING if status.ready else OFFLINE, version)
    since = since or {}
    statuses = [
        _model_status(status, name, targets[name], serving.get(name), since.get(name))
        for name in names
    ]
    worst = min(statuses, key=lambda s: _SEVERITY.index(s.state))
    if not status.ready and worst.state != UPDATED:
        # A device that already serves its targets is updated whatever its link does
        # now; any other is offline (nothing more can happen to it until it is back).
        return DeviceStatus(OFFLINE, version)
    return DeviceStatus(worst.state, version, worst.reason, worst.outcome)


def _last_entry(record: JournalRecord | None) -> HistoryEntry | None:
    if record is None or not record.history:
        return None
    return record.history[-1]


def _outcome_after(record: JournalRecord, since: HistoryEntry | None) -> HistoryEntry | None:
    """The last update's outcome entry if it is failed/rolled_back and newer than ``since``."""
    history = record.history
    start = 0
    if since is not None:
        for index in range(len(history) - 1, -1, -1):
            if history[index] == since:
                start = index + 1
                break
        # Not found: ``since`` fell out of the bounded history, so all of it is newer.
    for entry in reversed(history[start:]):
        if entry[0] is State.IDLE:
            continue
        return entry if entry[0] in _OUTCOMES else None
    return None


def _model_status(status: StatusSnapshot, name: str, wanted: str, served: str | None,
                  since: HistoryEntry | None) -> DeviceStatus:
    record = status.journal(name)
    state = record.state if record is not None else State.IDLE
    if state in _IN_PROGRESS:
        return DeviceStatus(DOWNLOADING)
    if state is State.PROBATION:
        return DeviceStatus(PROBATION)
    if served == wanted:
        return DeviceStatus(UPDATED)
    if record is None:
        return DeviceStatus(WAITING)
    if state in _OUTCOMES:  # an outcome not yet reported (e.g. right after a restart)
        entry = (state, record.entered_at)
        if entry != since:
            return DeviceStatus(_OUTCOMES[state], reason=record.reason, outcome=entry)
        return DeviceStatus(WAITING)
    later = _outcome_after(record, since)
    if later is not None:
        return DeviceStatus(_OUTCOMES[later[0]], reason=status.reasons.get(name),
                            outcome=later)
    return DeviceStatus(WAITING)


def _updated_for(status: StatusSnapshot, targets: Mapping[str, str]) -> bool:
    """Whether the device serves every target, committed (not swapping or on probation)."""
    serving = status.serving
    for name, version in targets.items():
        if serving.get(name) != version:
            return False
        record = status.journal(name)
        if (record is not None and record.state in (State.SWAPPING, State.PROBATION)
                and record.target is not None and record.target.version == version):
            return False
    return bool(targets)


# -- the recorder ---------------------------------------------------------------------


@dataclass
class _Snapshot:
    """Cumulative counters at one instant (wave start or end)."""

    bytes_source: str | None = None  # "bridge" | "device" | None
    bytes_by_device: dict[str, int] = field(default_factory=dict)
    bytes_total: int | None = None
    connections: dict[str, int] = field(default_factory=dict)
    resume: dict[str, int] = field(default_factory=dict)  # field -> fleet total
    cpu_seconds: float | None = None


@dataclass
class _Wave:
    label: str
    targets: dict[str, str]
    start: float
    eligible: frozenset[str]
    since: dict[str, dict[str, HistoryEntry | None]]
    begin: _Snapshot
    first_updated: dict[str, float] = field(default_factory=dict)
    failures: Counter[str] = field(default_factory=Counter)
    failures_by_state: Counter[str] = field(default_factory=Counter)
    end: float | None = None
    finish: _Snapshot | None = None
    updated_at_end: int | None = None


@dataclass
class _Event:
    t: float
    kind: str
    detail: dict[str, Any]


class FleetRecorder:
    """Records a fleet's states over a run; thread-safe (sampler, fault thread, caller).

    ``clock`` gives monotonic seconds (times in the report are relative to the
    recorder's creation). ``bridge_counters`` returns the server bridge's
    counters (:class:`edgeota.server.mqtt_bridge.BridgeCounters`: ``served``
    maps (device, path) to file bytes sent); without it, bytes come from the
    device connections' counters if they count them. ``server_cpu_seconds``
    returns the server's cumulative CPU seconds.
    """

    def __init__(
        self,
        devices: Sequence[Any],
        *,
        clock: Callable[[], float] = time.monotonic,
        bridge_counters: Callable[[], Any] | None = None,
        server_cpu_seconds: Callable[[], float | None] | None = None,
        max_transitions: int = 100_000,
        max_count_rows: int = 20_000,
        max_events: int = 10_000,
        max_waves: int = 256,
    ) -> None:
        if min(max_transitions, max_count_rows, max_events, max_waves) < 1:
            raise ValueError("every bound must be at least 1")
        self.devices = list(devices)
        self._ids = [d.device_id for d in self.devices]
        self._hardware = {d.device_id: str(getattr(d, "hardware", "unknown"))
                          for d in self.devices}
        self._clock = clock
        self._t0 = clock()
        self._bridge_counters = bridge_counters
        self._server_cpu = server_cpu_seconds
        self._max_transitions = max_transitions
        self._max_count_rows = max(4, max_count_rows)  # thinning 4+ rows shrinks them
        self._max_events = max_events
        self._max_waves = max_waves
        # _sample_lock serialises looks at the fleet (sample, set_targets, summary);
        # _lock guards the recorded data and is never held while devices are read.
        self._sample_lock = threading.RLock()
        self._lock = threading.Lock()
        self._targets: dict[str, str] = {}
        self._last: dict[str, tuple[float, DeviceStatus]] = {}
        self._transitions: dict[str, list[tuple[float, DeviceStatus]]] = {
            i: [] for i in self._ids}
        self._transition_count = 0
        self._transitions_dropped = 0
        self._count_rows: list[tuple[float, tuple[int, ...]]] = []
        self._count_rows_thinned = 0
        self._events: list[_Event] = []
        self._events_dropped = 0
        self._event_kinds: Counter[str] = Counter()
        self._waves: list[_Wave] = []
        self._waves_dropped = 0
        self._failures: Counter[str] = Counter()
        self._sample_errors = 0
        self._samples = 0
        self._last_t = 0.0

    # -- recording -------------------------------------------------------------------

    def now(self) -> float:
        """Seconds since the recorder was created."""
        return self._clock() - self._t0

    def set_targets(self, targets: Mapping[str, str], label: str, *,
                    devices: Iterable[str] | None = None) -> None:
        """Start an update wave: the fleet should now serve ``targets`` (model -> version).

        ``devices`` (ids) are the ones the wave is for (all by default; unknown
        ids are ignored): the time-to-update percentages and per-device costs
        are over them. A wave's bytes and CPU deltas end when the next wave
        starts; its time to update does not: a device reaching the wave's
        target later (a rollout still finishing) still counts, for the last
        few waves.
        """
        targets = {str(k): str(v) for k, v in targets.items()}
        eligible = frozenset(self._ids if devices is None else devices) & set(self._ids)
        with self._sample_lock:
            self.sample()  # the closing wave ends on a fresh look, under its own targets
            since: dict[str, dict[str, HistoryEntry | None]] = {}
            for device in self.devices:
                try:
                    status = status_of(device)
                    since[device.device_id] = {
                        name: _last_entry(status.journal(name)) for name in targets}
                except Exception:  # noqa: BLE001 - a device mid-update must not stop the run
                    since[device.device_id] = {}
            snapshot = self._snapshot()
            t = self.now()
            with self._lock:
                self._close_wave_locked(t, snapshot)
                wave = _Wave(label=str(label), targets=targets, start=t, eligible=eligible,
                             since=since, begin=snapshot)
                if len(self._waves) >= self._max_waves:
                    self._waves.pop(0)  # the oldest wave goes; the counter says so
                    self._waves_dropped += 1
                self._waves.append(wave)
                self._targets = targets
            self.sample()

    def sample(self) -> None:
        """Look at every device once; record what changed. O(devices)."""
        with self._sample_lock:
            with self._lock:
                targets = self._targets
                wave = self._waves[-1] if self._waves else None
                # Earlier waves keep counting devices that reach their target late
                # (a rollout still finishing when the next one starts).
                behind = [(w, [i for i in w.eligible if i not in w.first_updated])
                          for w in self._waves[-1 - _TRACKED_WAVES:-1]
                          if len(w.first_updated) < len(w.eligible)]
            since = wave.since if wave is not None else {}
            statuses: dict[str, DeviceStatus] = {}
            late: list[tuple[_Wave, str]] = []
            errors = 0
            looks: dict[str, StatusSnapshot] = {}
            for device in self.devices:
                try:
                    look = looks[device.device_id] = status_of(device)
                    statuses[device.device_id] = device_status(
                        look, targets, since=since.get(device.device_id))
                except Exception:  # noqa: BLE001 - a device mid-swap must not stop the report
                    errors += 1
            for old, missing in behind:
                for device_id in missing:
                    seen = looks.get(device_id)
                    if seen is not None and _updated_for(seen, old.targets):
                        late.append((old, device_id))
            t = self.now()
            with self._lock:
                self._sample_errors += errors
                self._samples += 1
                self._last_t = max(self._last_t, t)
                for device_id, status in statuses.items():
                    self._apply_locked(device_id, status, t, wave)
                for old, device_id in late:
                    old.first_updated.setdefault(device_id, t)
                counts = self._counts_locked()
                row = tuple(counts[s] for s in DEVICE_STATES)
                if not self._count_rows or self._count_rows[-1][1] != row:
                    self._append_count_row_locked(t, row)

    def event(self, kind: str, **detail: Any) -> None:
        """A timeline event (publish, deploy, fault injected, attack verdict, ...)."""
        t = self.now()
        clean = {str(k): _jsonable(v) for k, v in detail.items()}
        if len(json.dumps(clean)) > _MAX_DETAIL_CHARS:
            clean = {"truncated": json.dumps(clean)[:_MAX_DETAIL_CHARS]}
        with self._lock:
            self._event_kinds[str(kind)] += 1
            if len(self._events) >= self._max_events:
                self._events_dropped += 1
                return
            self._events.append(_Event(t, str(kind), clean))

    def _apply_locked(self, device_id: str, status: DeviceStatus, t: float,
                      wave: _Wave | None) -> None:
        previous = self._last.get(device_id)
        if previous is None or previous[1] != status:
            self._last[device_id] = (t, status)
            if self._transition_count < self._max_transitions:
                self._transitions[device_id].append((t, status))
                self._transition_count += 1
            else:
                self._transitions_dropped += 1
            if status.state in FAILURE_STATES and (
                    previous is None or previous[1].outcome != status.outcome):
                reason = status.reason or "unknown"
                self._failures[reason] += 1
                if wave is not None:
                    wave.failures[reason] += 1
                    wave.failures_by_state[status.state] += 1
        if (wave is not None and status.state == UPDATED and device_id in wave.eligible
                and device_id not in wave.first_updated):
            wave.first_updated[device_id] = t

    def _append_count_row_locked(self, t: float, row: tuple[int, ...]) -> None:
        if len(self._count_rows) >= self._max_count_rows:
            # Thin rather than drop: every other row goes, the run's end stays drawn.
            last = self._count_rows[-1]
            self._count_rows = [*self._count_rows[:-1:2], last]
            self._count_rows_thinned += 1
        self._count_rows.append((t, row))

    def _counts_locked(self) -> Counter[str]:
        counts: Counter[str] = Counter({s: 0 for s in DEVICE_STATES})
        for _t, status in self._last.values():
            counts[status.state] += 1
        return counts

    def _close_wave_locked(self, t: float, snapshot: _Snapshot) -> None:
        if not self._waves or self._waves[-1].end is not None:
            return
        wave = self._waves[-1]
        wave.end = t
        wave.finish = snapshot
        wave.updated_at_end = self._updated_now_locked(wave)

    def _updated_now_locked(self, wave: _Wave) -> int:
        return sum(1 for device_id in wave.eligible
                   if (last := self._last.get(device_id)) is not None
                   and last[1].state == UPDATED)

    def _snapshot(self) -> _Snapshot:
        """Cumulative bytes, connections, resumes and CPU now (O(devices), at wave edges)."""
        snap = _Snapshot()
        known = set(self._ids)
        if self._bridge_counters is not None:
            counters = self._bridge_counters()
            by_device: Counter[str] = Counter()
            for (device_id, _path), sent in getattr(counters, "served", {}).items():
                if device_id in known:
                    by_device[device_id] += int(sent)
            snap.bytes_source = "bridge"
            snap.bytes_by_device = dict(by_device)
            total = getattr(counters, "bytes_sent", None)
            snap.bytes_total = int(total) if total is not None else None
        received: dict[str, int] = {}
        resume: Counter[str] = Counter()
        for device in self.devices:
            status = status_of(device)
            stats = status.download
            if stats is not None:
                resume["resumes"] += stats.resumes
                resume["full_restarts"] += stats.full_restarts
                resume["downloads"] += stats.completed
                resume["bytes_fetched"] += stats.bytes_fetched
            counters = status.connection
            if counters is None:
                continue
            connections = counters.get("connections")
            if connections is not None:
                snap.connections[device.device_id] = connections
            got = counters.get("bytes_received")
            if got is not None:
                received[device.device_id] = got
            for name in _RESUME_FIELDS:
                value = counters.get(name)
                if value is not None:
                    resume[name] += value
        if snap.bytes_source is None and received:
            snap.bytes_source = "device"
            snap.bytes_by_device = received
            snap.bytes_total = sum(received.values())
        snap.resume = dict(resume)
        if self._server_cpu is not None:
            cpu = self._server_cpu()  # None: the server could not say (logged where asked)
            snap.cpu_seconds = float(cpu) if cpu is not None else None
        return snap

    # -- reading ---------------------------------------------------------------------

    def _check_failures(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for device in self.devices:
            total.update(status_of(device).check_failures)
        return total

    @property
    def failures(self) -> dict[str, int]:
        """Failures (failed or rolled back) by reason over the whole run."""
        with self._lock:
            return dict(self._failures)

    @property
    def wave_label(self) -> str | None:
        with self._lock:
            return self._waves[-1].label if self._waves else None

    def counts(self) -> dict[str, int]:
        """Devices per state at the last sample (devices never sampled are not counted)."""
        with self._lock:
            return dict(self._counts_locked())

    def counts_by_hardware(self) -> dict[str, dict[str, int]]:
        with self._lock:
            table: dict[str, dict[str, int]] = {}
            for device_id, hardware in sorted(self._hardware.items()):
                row = table.setdefault(hardware, {s: 0 for s in DEVICE_STATES})
                last = self._last.get(device_id)
                if last is not None:
                    row[last[1].state] += 1
            return table

    def transitions(self, device_id: str) -> list[tuple[float, DeviceStatus]]:
        """The recorded (time, status) changes of one device, oldest first."""
        with self._lock:
            return list(self._transitions.get(device_id, ()))

    def count_rows(self) -> list[tuple[float, dict[str, int]]]:
        """The fleet's devices per state, at each change."""
        with self._lock:
            return [(t, dict(zip(DEVICE_STATES, row, strict=True)))
                    for t, row in self._count_rows]

    def events(self) -> list[tuple[float, str, dict[str, Any]]]:
        with self._lock:
            return [(e.t, e.kind, dict(e.detail)) for e in self._events]

    def summary(self) -> dict[str, Any]:
        """The run's figures as a JSON-able dict (see the module docstring)."""
        with self._sample_lock:
            snapshot = self._snapshot() if self._waves else None
            t = self.now()
            with self._lock:
                return self._summary_locked(t, snapshot)

    def _summary_locked(self, t: float, snapshot: _Snapshot | None) -> dict[str, Any]:
        waves = []
        for wave in self._waves:
            open_wave = wave.end is None
            end = t if open_wave else wave.end
            finish = snapshot if open_wave else wave.finish
            assert end is not None and finish is not None
            updated_at_end = (self._updated_now_locked(wave) if open_wave
                              else wave.updated_at_end)
            waves.append(_wave_summary(wave, end, finish, updated_at_end, ongoing=open_wave))
        return {
            "devices": len(self._ids),
            "hardware": dict(Counter(self._hardware.values())),
            "duration_seconds": _round(t),
            "samples": self._samples,
            "states": dict(self._counts_locked()),
            "failures": dict(self._failures),
            # Update checks refused before any install began (clock_untrusted, expired
            # metadata, ...): the journal never leaves idle for them, so they are counted
            # by the devices themselves.
            "check_failures": dict(self._check_failures()),
            "waves": waves,
            "events": dict(self._event_kinds),
            "bounds": {
                "transitions": self._transition_count,
                "transitions_dropped": self._transitions_dropped,
                "count_rows": len(self._count_rows),
                "count_rows_thinned": self._count_rows_thinned,
                "events_dropped": self._events_dropped,
                "waves_dropped": self._waves_dropped,
                "sample_errors": self._sample_errors,
            },
        }

    # -- files -----------------------------------------------------------------------

    def write_report(self, folder: Path | str) -> Path:
        """Write ``summary.json``, ``states.csv``, ``events.csv``, ``timeline/<device>.csv``,
        ``states.png`` and ``time_to_update.png`` into ``folder`` (created); return it."""
        folder = Path(folder)
        summary = self.summary()
        with self._lock:
            end = max(self._last_t, summary["duration_seconds"] or 0.0)
            rows = list(self._count_rows)
            events = [(e.t, e.kind, dict(e.detail)) for e in self._events]
            transitions = {i: list(v) for i, v in self._transitions.items()}
            last = dict(self._last)
            waves = [(w.label, w.start, len(w.eligible), sorted(
                v - w.start for v in w.first_updated.values())) for w in self._waves]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        _write_states_csv(folder / "states.csv", rows)
        _write_events_csv(folder / "events.csv", events)
        _write_timelines(folder / "timeline", transitions, last)
        _plot_states(folder / "states.png", rows, end, events,
                     [(label, start) for label, start, _n, _t in waves])
        _plot_time_to_update(folder / "time_to_update.png", waves)
        return folder


# -- summary helpers ------------------------------------------------------------------


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


def time_to_fraction(times: Sequence[float], population: int, percent: int) -> float | None:
    """Seconds until ``percent`` % of ``population`` devices were updated (None: not reached).

    ``times`` are the devices' times to update; the answer is the time of the
    ceil(percent x population / 100)-th device.
    """
    if population <= 0:
        return None
    needed = max(1, -(-percent * population // 100))
    ordered = sorted(times)
    return ordered[needed - 1] if len(ordered) >= needed else None


def _wave_summary(wave: _Wave, end: float, finish: _Snapshot, updated_at_end: int | None,
                  *, ongoing: bool) -> dict[str, Any]:
    times = sorted(t - wave.start for t in wave.first_updated.values())
    population = len(wave.eligible)
    updated = len(times)
    cpu_delta = None
    if wave.begin.cpu_seconds is not None and finish.cpu_seconds is not None:
        cpu_delta = max(0.0, finish.cpu_seconds - wave.begin.cpu_seconds)
    return {
        "label": wave.label,
        "targets": dict(wave.targets),
        "started_at_seconds": _round(wave.start),
        "duration_seconds": _round(end - wave.start),
        "ongoing": ongoing,
        "eligible_devices": population,
        "devices_updated": updated,
        "updated_at_end": updated_at_end,
        # Seconds from the wave's start until 50/95/100 % of its devices were updated.
        **{f"time_to_{p}": _round(time_to_fraction(times, population, p))
           for p in (50, 95, 100)},
        "time_to_update_seconds": None if not times else {
            "min": _round(times[0]), "mean": _round(sum(times) / updated),
            "max": _round(times[-1])},
        "failures": dict(wave.failures),
        "failures_by_state": dict(wave.failures_by_state),
        "bytes_sent_per_device": _bytes_summary(wave, finish),
        "reconnects": _delta_summary(wave.begin.connections, finish.connections, wave.eligible),
        "resume": ({k: finish.resume.get(k, 0) - wave.begin.resume.get(k, 0)
                    for k in finish.resume} or None),
        "server_cpu_seconds": _round(cpu_delta, 4),
        "server_cpu_seconds_per_update": (_round(cpu_delta / updated, 4)
                                          if cpu_delta is not None and updated else None),
    }


def _bytes_summary(wave: _Wave, finish: _Snapshot) -> dict[str, Any] | None:
    if finish.bytes_source is None:
        return None
    figures = _delta_summary(wave.begin.bytes_by_device, finish.bytes_by_device, wave.eligible)
    if figures is None:
        return None
    total = None
    if finish.bytes_total is not None and wave.begin.bytes_total is not None:
        total = finish.bytes_total - wave.begin.bytes_total
    return {**figures, "source": finish.bytes_source, "fleet_total": total}


def _delta_summary(begin: Mapping[str, int], end: Mapping[str, int],
                   devices: frozenset[str]) -> dict[str, Any] | None:
    if not end:
        return None
    # Clamped: the bridge forgets its least recent (device, path) keys past its bound.
    deltas = [max(0, end.get(d, 0) - begin.get(d, 0)) for d in devices]
    if not deltas:
        return None
    return {"mean": _round(sum(deltas) / len(deltas), 1), "max": max(deltas),
            "total": sum(deltas)}


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return str(value)


# -- file writers ---------------------------------------------------------------------


def _write_states_csv(path: Path, rows: Sequence[tuple[float, tuple[int, ...]]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["t_seconds", *DEVICE_STATES])
        for t, row in rows:
            writer.writerow([f"{t:.3f}", *row])


def _write_events_csv(path: Path, events: Sequence[tuple[float, str, dict[str, Any]]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["t_seconds", "kind", "detail"])
        for t, kind, detail in events:
            writer.writerow([f"{t:.3f}", kind, json.dumps(detail, sort_keys=True)])


def _write_timelines(folder: Path, transitions: Mapping[str, list[tuple[float, DeviceStatus]]],
                     last: Mapping[str, tuple[float, DeviceStatus]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for device_id, rows in transitions.items():
        name = _SAFE_NAME.sub("_", device_id) or "device"
        stem, n = name, 1
        while name.lower() in used:  # distinct ids may sanitise alike
            n += 1
            name = f"{stem}-{n}"
        used.add(name.lower())
        rows = list(rows)
        final = last.get(device_id)
        if final is not None and (not rows or rows[-1] != final):
            rows.append(final)  # the cap dropped later changes: keep where it ended
        with (folder / f"{name}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["t_seconds", "state", "version", "reason"])
            for t, status in rows:
                writer.writerow([f"{t:.3f}", status.state, status.version, status.reason or ""])


def _plot_states(path: Path, rows: Sequence[tuple[float, tuple[int, ...]]], end: float,
                 events: Sequence[tuple[float, str, dict[str, Any]]],
                 waves: Sequence[tuple[str, float]]) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global state, no display
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 5.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Devices per state over time")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("devices")
    if rows:
        times = [t for t, _row in rows]
        if end > times[-1]:
            times.append(end)
        series = {state: [row[i] for _t, row in rows] for i, state in enumerate(DEVICE_STATES)}
        if len(times) > len(rows):
            for values in series.values():
                values.append(values[-1])
        shown = [s for s in DEVICE_STATES if any(series[s])] or list(DEVICE_STATES)
        ax.stackplot(times, *(series[s] for s in shown), labels=shown,
                     colors=[_COLOURS[s] for s in shown], step="post", alpha=0.9)
        ax.set_xlim(0, max(times[-1], 1.0))
    else:
        ax.text(0.5, 0.5, "no samples recorded", ha="center", va="center",
                transform=ax.transAxes)
    for index, (label, start) in enumerate(waves):
        ax.axvline(start, color="black", linestyle="--", linewidth=1.2,
                   label="update wave" if index == 0 else None)
        ax.annotate(label[:40], (start, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(3, -12), textcoords="offset points", fontsize=8, rotation=0)
    kinds = Counter(kind for _t, kind, _d in events)
    lined = [(t, kind) for t, kind, _d in events if kinds[kind] <= _MAX_EVENT_LINES]
    ticked = [(t, kind) for t, kind, _d in events if kinds[kind] > _MAX_EVENT_LINES]
    for index, (t, kind) in enumerate(lined):
        ax.axvline(t, color="#455a64", linestyle=":", linewidth=0.9,
                   label="event" if index == 0 else None)
        ax.annotate(kind, (t, 0.0), xycoords=("data", "axes fraction"), xytext=(2, 4),
                    textcoords="offset points", fontsize=7, rotation=90, color="#455a64")
    for index, kind in enumerate(sorted({k for _t, k in ticked})):
        xs = [t for t, k in ticked if k == kind]
        ax.plot(xs, [0] * len(xs), linestyle="none", marker="|", markersize=10,
                color="#263238", label=f"{kind} ({kinds[kind]})", clip_on=False,
                alpha=0.6, zorder=5 + index)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8,
                  title="state / event")
    ax.margins(y=0.05)
    fig.savefig(path, format="png")


def _plot_time_to_update(path: Path,
                         waves: Sequence[tuple[str, float, int, Sequence[float]]]) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4.5), dpi=100, layout="constrained")
    hist, cdf = fig.subplots(1, 2)
    hist.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("Time to update, per update wave")
    hist.set_title("Distribution")
    hist.set_xlabel("seconds from wave start to updated")
    hist.set_ylabel("devices")
    cdf.set_title("Share of the wave's devices updated")
    cdf.set_xlabel("seconds from wave start")
    cdf.set_ylabel("devices updated (%)")
    drawn = False
    longest = max((times[-1] for *_x, times in waves if times), default=1.0) or 1.0
    bins = [longest * i / 30 for i in range(31)]
    for label, _start, population, times in waves:
        name = f"{label[:40]} ({len(times)}/{population})"
        if times:
            hist.hist(times, bins=bins, alpha=0.55, label=name)
            drawn = True
        if population:
            xs = [0.0, *times, longest]
            ys = [0.0, *(100.0 * (i + 1) / population for i in range(len(times)))]
            ys.append(ys[-1])
            cdf.step(xs, ys, where="post", label=name)
            drawn = True
    for level in (50, 95):
        cdf.axhline(level, color="grey", linestyle=":", linewidth=0.8)
        cdf.annotate(f"{level} %", (0.0, level), xycoords=("axes fraction", "data"),
                     xytext=(2, 2), textcoords="offset points", fontsize=7, color="grey")
    cdf.set_ylim(0, 102)
    if drawn:
        if hist.get_legend_handles_labels()[0]:
            hist.legend(fontsize=8)
        cdf.legend(fontsize=8)
    else:
        for ax in (hist, cdf):
            ax.text(0.5, 0.5, "no update wave", ha="center", va="center",
                    transform=ax.transAxes)
    fig.savefig(path, format="png")


# -- live view ------------------------------------------------------------------------


def live_view(recorder: FleetRecorder) -> Any:
    """A rich renderable of the fleet now: devices per state, and per hardware class.

    Reads only what the last :meth:`FleetRecorder.sample` recorded; the caller
    samples and refreshes (``rich.live.Live(..., get_renderable=...)`` or ``update``).
    """
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    counts = recorder.counts()
    by_hardware = recorder.counts_by_hardware()
    total = len(recorder.devices)
    wave = recorder.wave_label
    fleet = Table(title=f"Fleet: {total} devices"
                  + (f" | wave: {wave}" if wave else "")
                  + f" | t={recorder.now():.1f}s",
                  title_justify="left")
    fleet.add_column("state")
    fleet.add_column("devices", justify="right")
    fleet.add_column("share")
    width = 30
    for state in DEVICE_STATES:
        n = counts.get(state, 0)
        bar = "█" * (round(width * n / total) if total else 0)
        fleet.add_row(Text(state, style=_RICH_STYLES[state]), str(n),
                      Text(bar, style=_RICH_STYLES[state]))
    hardware = Table(title="By hardware", title_justify="left")
    hardware.add_column("hardware")
    for state in DEVICE_STATES:
        hardware.add_column(Text(state, style=_RICH_STYLES[state]), justify="right")
    for name, row in by_hardware.items():
        hardware.add_row(name, *(str(row[s]) for s in DEVICE_STATES))
    parts: list[Any] = [fleet, hardware]
    failures = recorder.failures
    if failures:
        parts.append(Text("failures: " + ", ".join(
            f"{reason} x{n}" for reason, n in sorted(failures.items(), key=lambda i: -i[1])),
            style="red"))
    return Group(*parts)
