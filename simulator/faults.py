"""A scenario's faults, injected into a running simulation: real agents, real bytes.

:class:`FaultInjector` draws each ``[[faults]]`` entry's devices from the
scenario's seeded generator and acts on them (see the scenario reference in
:mod:`edgeota.simulator.scenario` for the keys):

* ``disconnect`` and a link profile's ``disconnects_per_minute`` -- the
  device's MQTT connection is cut (:meth:`SimulatedDevice.drop_connection`);
  the agent reconnects and resumes by itself.
* ``crash`` -- a power cut armed on the device
  (:meth:`SimulatedDevice.arm_power_loss`): the agent's update cycle is
  unwound right after its journal saved the chosen state (mid-bundle for
  ``downloading``) and a new agent boots from the device's folder.
* ``disk_full`` -- the free space the agent's pre-download check sees is 0
  (:meth:`SimulatedDevice.set_free_bytes`) for the fault's duration.
* ``corrupt_chunks`` -- a man-in-the-middle on the broker side
  (:class:`ChunkCorrupter`) flips a byte in that share of the bundle chunk
  frames sent to these devices; the frames' CRC no longer matches, the
  agent's fetcher refuses them and fetches again.
* ``clock_skew`` -- the device's clock is moved (:meth:`SimulatedDevice.skew_clock`)
  for the fault's duration.

The devices are :class:`~edgeota.simulator.device.FleetDevice` s: stepped in
this process, or in a device process (:mod:`edgeota.simulator.processes`),
where each action is a command to that process and each look is the last
status it sent -- one code path for both. Timed parts (random link drops,
drops at a state, the end of a timed fault) run on one thread that looks at
the fleet (:func:`~edgeota.simulator.snapshot.status_of`) every
:data:`TICK_SECONDS`; every
fault is undone by :meth:`FaultInjector.stop`. Each injection is a ``fault``
event in the run's recorder, so the report shows when and where it happened.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from edgeota.server.mqtt_bridge import FetchBridge, FrameFilter
from edgeota.simulator.device import POWER_LOSS_STATES, FleetDevice
from edgeota.simulator.scenario import Scenario
from edgeota.simulator.snapshot import status_of

__all__ = ["TICK_SECONDS", "ChunkCorrupter", "FaultInjector", "TimedFault"]

logger = logging.getLogger(__name__)

TICK_SECONDS = 0.1  # how often the fault thread looks at the fleet
TARGETS_PREFIX = "image/targets/"  # bundles: the resumable downloads


class ChunkCorrupter(FrameFilter):
    """Damages a share of the bundle chunk frames the fetch bridge sends to chosen devices.

    A :class:`~edgeota.server.mqtt_bridge.FrameFilter` on the running
    :class:`~edgeota.server.mqtt_bridge.FetchBridge` (installed by
    :meth:`install`, removed by :meth:`remove`), the seam the attack suite's
    man-in-the-middle uses too. Its ``on_chunk`` holds each data frame already
    encoded: one payload bit is flipped and the frame goes on through the real
    broker with a CRC that no longer matches. Metadata frames pass untouched
    (a damaged metadata fetch fails the whole check until the next poll;
    bundle downloads are what resume chunk by chunk).
    """

    def __init__(self, bridge: FetchBridge, devices: dict[str, float], *, seed: int) -> None:
        self._bridge = bridge
        self._ratio = dict(devices)  # device id -> share of its chunk frames damaged
        self._rng = random.Random(seed)  # noqa: S311 - fault draws, not secrets
        self._lock = threading.Lock()
        self.damaged: Counter[str] = Counter()  # device id -> frames damaged
        self._installed = False

    def install(self) -> None:
        if self._installed:
            raise RuntimeError("already installed")
        self._bridge.add_filter(self)
        self._installed = True

    def remove(self) -> None:
        if self._installed:
            self._bridge.remove_filter(self)
            self._installed = False

    def on_chunk(self, device_id: str, path: str, frame: bytearray, payload: int) -> bool:
        """Flip one payload bit of the frame, for the chosen devices' bundles, at their ratio."""
        ratio = self._ratio.get(device_id)
        if ratio is not None and payload > 0 and path.startswith(TARGETS_PREFIX):
            with self._lock:
                hit = self._rng.random() < ratio
                position = self._rng.randrange(payload)
                bit = self._rng.randrange(8)
                if hit:
                    self.damaged[device_id] += 1
            if hit:
                frame[len(frame) - payload + position] ^= 1 << bit
        return True


@dataclass
class TimedFault:
    """A fault on one device from ``started`` for ``duration`` seconds (0: until stop).

    ``when`` is ``start`` (on at once) or ``serving``: on once the device
    serves a committed model, so the fault meets its *next* update with a
    known-good model in place.
    """

    kind: str  # disk_full or clock_skew
    device: FleetDevice
    duration: float
    when: str = "start"
    seconds: float = 0.0  # clock_skew: the offset
    started: float | None = None
    ended: bool = False

    def due(self, now: float) -> bool:
        return (self.started is not None and not self.ended and self.duration > 0
                and now - self.started >= self.duration)


class FaultInjector:
    """Injects ``scenario``'s faults into ``devices``; :meth:`start`, then :meth:`stop`.

    ``rng`` is the simulation's seeded generator (the draws of devices and
    crash states); ``recorder`` (a :class:`~edgeota.simulator.report.FleetRecorder`,
    or ``None``) gets an event per injection; ``bridge`` is the server's
    running fetch bridge (needed by ``corrupt_chunks`` only). The fleet is
    the scenario's, in its order (``devices[i]`` is of ``scenario.hardware_of()[i]``).
    """

    def __init__(self, scenario: Scenario, devices: Sequence[FleetDevice], *,
                 rng: random.Random, recorder: Any = None, bridge: FetchBridge | None = None,
                 stop: threading.Event | None = None) -> None:
        self.scenario = scenario
        self.devices = list(devices)
        self._rng = rng
        self._recorder = recorder
        self._bridge = bridge
        self._stop = stop or threading.Event()
        self._thread: threading.Thread | None = None
        self._timed: list[TimedFault] = []
        self.corrupter: ChunkCorrupter | None = None
        self._rates: dict[str, float] = {}  # device -> random drops per minute
        self._drop_at: dict[str, str] = {}  # device -> state in which its link drops
        self._dropped: set[tuple[str, str]] = set()  # (device, state) already hit once
        self._by_id = {d.device_id: d for d in self.devices}

    # -- set-up --------------------------------------------------------------------

    def start(self) -> FaultInjector:
        """Draw the devices, inject what is immediate, start the thread if needed."""
        if self._thread is not None:
            raise RuntimeError("fault injector already started")
        classes = self.scenario.hardware_of()
        self._rates = {d.device_id: self.scenario.links[c.link].disconnects_per_minute
                       for d, c in zip(self.devices, classes, strict=False)}
        corrupt: dict[str, float] = {}
        for fault in self.scenario.faults:
            chosen = self._rng.sample(self.devices, min(fault.devices, len(self.devices)))
            if not chosen:
                continue
            if fault.kind == "disconnect":
                for device in chosen:
                    self._drop_at[device.device_id] = fault.when
            elif fault.kind == "crash":
                for device in chosen:
                    state = (self._rng.choice(POWER_LOSS_STATES)
                             if fault.when in ("any", "random") else fault.when)
                    device.arm_power_loss(state)
                    self._event("crash", device, when=state)
            elif fault.kind in ("disk_full", "clock_skew"):
                for device in chosen:
                    timed = TimedFault(fault.kind, device, fault.duration, when=fault.when,
                                       seconds=fault.seconds)
                    self._timed.append(timed)
                    if timed.when == "start":
                        self._begin(timed)
            elif fault.kind == "corrupt_chunks":
                for device in chosen:
                    corrupt[device.device_id] = fault.ratio
                    self._event("corrupt_chunks", device, ratio=fault.ratio)
            else:  # pragma: no cover - the scenario parser refuses other kinds
                raise ValueError(f"unknown fault kind {fault.kind!r}")
        if corrupt:
            if self._bridge is None:
                raise ValueError("corrupt_chunks needs the server's fetch bridge")
            self.corrupter = ChunkCorrupter(self._bridge, corrupt, seed=self._rng.getrandbits(32))
            self.corrupter.install()
        if any(self._rates.values()) or self._drop_at or any(
                t.duration or t.started is None for t in self._timed):
            self._thread = threading.Thread(target=self._run, daemon=True, name="sim-faults")
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and undo every fault still on (disk, clock, the corrupter)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("fault thread still running after %ss", timeout)
        for timed in self._timed:
            try:
                self._end(timed)
            except Exception:  # one device's process not answering must not keep the rest on
                logger.exception("undoing a fault failed",
                                 extra={"fault": timed.kind, "device_id": timed.device.device_id})
        if self.corrupter is not None:
            self.corrupter.remove()

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        models = sorted({s.release.split("@")[0] for s in self.scenario.timeline
                         if s.release})
        while not self._stop.wait(TICK_SECONDS):
            try:
                self._tick(models)
            except Exception:
                logger.exception("fault injection tick failed")

    def _tick(self, models: list[str]) -> None:
        for device_id, rate in self._rates.items():
            if rate and self._rng.random() < rate * TICK_SECONDS / 60:
                self._drop(device_id, "link")
        for device_id, when in self._drop_at.items():
            status = status_of(self._by_id[device_id])
            for name in models:
                state = status.journal_state(name)
                if (when in ("any", state) and state != "idle"
                        and (device_id, state) not in self._dropped):
                    self._dropped.add((device_id, state))
                    self._drop(device_id, f"fault at {state}")
        now = time.monotonic()
        for timed in self._timed:
            if timed.started is None and _serves_committed(timed.device):
                self._begin(timed)
            elif timed.due(now):
                self._end(timed)

    def _drop(self, device_id: str, why: str) -> None:
        if self._by_id[device_id].drop_connection() and self._recorder is not None:
            self._recorder.event("disconnect", device=device_id, why=why)

    def _begin(self, timed: TimedFault) -> None:
        timed.started = time.monotonic()
        if timed.kind == "disk_full":
            timed.device.set_free_bytes(0)
            self._event("disk_full", timed.device, duration=timed.duration)
        else:
            timed.device.skew_clock(timedelta(seconds=timed.seconds))
            self._event("clock_skew", timed.device, seconds=timed.seconds,
                        duration=timed.duration)

    def _end(self, timed: TimedFault) -> None:
        if timed.ended or timed.started is None:
            return
        timed.ended = True
        if timed.kind == "disk_full":
            timed.device.set_free_bytes(None)
        else:
            timed.device.skew_clock(None)
        if not self._stop.is_set():
            self._event(f"{timed.kind}_end", timed.device)

    def active(self, kind: str) -> list[str]:
        """Devices a timed fault of ``kind`` is on for now (e.g. ``disk_full``)."""
        return [t.device.device_id for t in self._timed
                if t.kind == kind and t.started is not None and not t.ended]

    def _event(self, kind: str, device: FleetDevice, **detail: Any) -> None:
        logger.info("fault injected", extra={"fault": kind, "device_id": device.device_id,
                                             **{f"fault_{k}": v for k, v in detail.items()}})
        if self._recorder is not None:
            self._recorder.event("fault", fault=kind, device=device.device_id, **detail)


def _serves_committed(device: FleetDevice) -> bool:
    """Whether ``device`` serves a model and no update of it is under way."""
    status = status_of(device)
    return bool(status.serving) and all(status.journal_state(name) == "idle"
                                        for name in status.serving)
