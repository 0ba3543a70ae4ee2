"""One simulated device: the real agent, plus the traffic and hardware a real device would have.

A :class:`SimulatedDevice` wraps an unmodified :class:`edgeota.agent.runner.Agent`
(its own identity, journal folder and MQTT connection) and does, in
:meth:`~SimulatedDevice.step`, what ``edgeota-agent run``'s loop does
(:func:`edgeota.agent.runner.run_forever`): a cycle when the server notified a
change or the poll interval passed, the probation check, telemetry on its
interval. Besides, it sends inference traffic to the served models (the
manifest's validation inputs), because probation and the server's
model-aware gates judge a release by the requests it serves; and
:class:`HardwareEmulation` (the model host's run hook) lets a scenario make a
release slow or failing on this device's hardware.

``step`` never blocks without a bound and never raises for a bad update (the
agent reports it); it is driven by :class:`edgeota.simulator.fleet.FleetRunner`,
a few worker threads for a whole fleet rather than a thread per device -- in
the simulation's process, or in a device process
(:mod:`edgeota.simulator.worker`).

What the simulation reads of a device is one small picklable value,
:meth:`~SimulatedDevice.snapshot` (a
:class:`~edgeota.simulator.snapshot.StatusSnapshot`); what it does to one is
a handful of methods (the faults below, :meth:`~SimulatedDevice.drop_connection`,
:meth:`~SimulatedDevice.predict_rows`). A device in a device process is
mirrored in the parent by :class:`edgeota.simulator.processes.RemoteDevice`,
which offers the same ones.

Faults act on the real agent through small hooks it offers
(:mod:`edgeota.simulator.faults` arms them):

* **power loss** (:meth:`~SimulatedDevice.arm_power_loss`): right after the
  journal saved the chosen state -- or, for ``downloading``, half-way through
  the bundle -- :class:`SimulatedPowerLoss` unwinds the update cycle past the
  agent's ``except Exception`` handlers, and the device boots a new agent from
  the same folder (:meth:`~SimulatedDevice.restart`), as after a power cut:
  only what the agent made durable is left.
* **disk full** (:meth:`~SimulatedDevice.set_free_bytes`): the free space the
  agent's pre-download check sees.
* **clock skew** (:meth:`~SimulatedDevice.skew_clock`): the device's one clock
  (journal, time floor, and the time ngclient judges metadata expiry by) runs
  ahead or behind.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

import numpy as np

from edgeota.agent.clock import EPOCH
from edgeota.agent.config import AgentConfig
from edgeota.agent.journal import JournalRecord, State
from edgeota.agent.model_host import ModelHostError, warmup_feeds
from edgeota.agent.mqtt_session import NetworkLoop
from edgeota.agent.resumable import DownloadStats
from edgeota.agent.runner import Agent, AgentSettings
from edgeota.agent.update_cycle import TransferLimits
from edgeota.simulator.snapshot import StatusSnapshot, read_status

__all__ = [
    "POWER_LOSS_STATES",
    "DeviceSpec",
    "DeviceTiming",
    "FleetDevice",
    "HardwareEmulation",
    "SimulatedDevice",
    "SimulatedPowerLoss",
]

_MAX_REBOOTS = 3  # a power cut is one-shot, so a second one in a row is already odd

# The journal states an update passes through, in order: where a power cut can land.
POWER_LOSS_STATES: tuple[str, ...] = tuple(str(s) for s in (
    State.DOWNLOADING, State.VERIFYING, State.VALIDATING, State.SWAPPING, State.PROBATION))

logger = logging.getLogger(__name__)


@dataclass
class HardwareEmulation:
    """How emulated hardware treats a model version (the model host's run hook).

    Keys are ``"name@version"``. ``extra_latency_s`` is really waited inside
    the measured run (the host's latency figures, probation and telemetry
    see it as they would a slower chip); a version in ``failing`` raises as a
    model that is wrong on this hardware would. Mutable on purpose, so a
    scenario can change behaviour mid-run.
    """

    extra_latency_s: dict[str, float] = field(default_factory=dict)
    failing: set[str] = field(default_factory=set)

    def __call__(self, name: str, version: str) -> None:
        key = f"{name}@{version}"
        delay = self.extra_latency_s.get(key, 0.0)
        if delay > 0:
            time.sleep(delay)  # a slower chip: the measured run really takes longer
        if key in self.failing:
            raise RuntimeError(f"emulated hardware fault for {key}")


@dataclass(frozen=True)
class DeviceTiming:
    """How often a simulated device checks, reports and serves (seconds, requests)."""

    poll_seconds: float = 60.0  # a notify over MQTT wakes it sooner
    telemetry_seconds: float = 1.0
    inferences_per_step: int = 2


@dataclass(frozen=True)
class DeviceSpec:
    """What it takes to build one simulated device: plain, picklable data.

    ``config`` is the device's enrolled folder (its ``mqtt_url`` already
    pointing at its link's shaping proxy when the link is shaped);
    ``emulation`` how its hardware treats the scenario's releases. The
    simulation builds its devices from these in its own process or hands
    them to a device process (:mod:`edgeota.simulator.worker`), which builds
    the same :class:`SimulatedDevice` s there (:meth:`SimulatedDevice.from_spec`).
    """

    config: AgentConfig
    hardware: str
    emulation: HardwareEmulation = field(default_factory=HardwareEmulation)

    @property
    def device_id(self) -> str:
        return self.config.device_id


class FleetDevice(Protocol):
    """What the run, its recorder and its faults use of a device, wherever it is stepped.

    :class:`SimulatedDevice` (stepped in this process) and
    :class:`edgeota.simulator.processes.RemoteDevice` (stepped in a device
    process) both are one.
    """

    device_id: str
    hardware: str

    def snapshot(self) -> StatusSnapshot: ...

    def serving(self) -> dict[str, str]: ...

    def drop_connection(self) -> bool: ...

    def arm_power_loss(self, state: str) -> None: ...

    def set_free_bytes(self, free: int | None) -> None: ...

    def skew_clock(self, offset: timedelta | None) -> None: ...

    def predict_rows(self, name: str,
                     rows: np.ndarray) -> tuple[str, dict[str, np.ndarray]] | None: ...


class SimulatedPowerLoss(BaseException):
    """The power was cut at a chosen point of the agent's work.

    A ``BaseException`` on purpose: the agent's ``except Exception`` handlers
    (a failed install, a refused check) must not turn a power cut into a tidy
    failure report. It unwinds the cycle the way a stopping process does, and
    :meth:`SimulatedDevice.step` boots the agent again from its folder.
    """

    def __init__(self, device_id: str, state: str) -> None:
        super().__init__(f"{device_id}: power lost in {state}")
        self.device_id = device_id
        self.state = state


@dataclass
class StepCounters:
    cycles: int = 0
    inferences: int = 0
    inference_errors: int = 0
    telemetry_sent: int = 0
    step_errors: int = 0
    power_losses: int = 0
    states: dict[str, str] = field(default_factory=dict)  # last cycle outcome per model
    reasons: dict[str, str] = field(default_factory=dict)  # last failure reason per model
    # Checks that ended before any model was looked at, by reason (clock_untrusted,
    # ExpiredMetadataError, ...): the journal never sees these, so they are counted here.
    check_failures: Counter[str] = field(default_factory=Counter)


class SimulatedDevice:
    """A real agent with emulated hardware and traffic; ``step()`` advances it."""

    def __init__(
        self,
        config: AgentConfig,
        settings: AgentSettings,
        *,
        hardware: str,
        emulation: HardwareEmulation | None = None,
        timing: DeviceTiming | None = None,
        transport: str = "mqtt",
        network: NetworkLoop | None = None,
        limits: TransferLimits | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``network`` drives the device's MQTT session when many share a process
        (without one, the session has its own network thread); ``limits`` bound
        its transfers. A restart opens a new session the same way."""
        self.device_id = config.device_id
        self.hardware = hardware
        self.emulation = emulation or HardwareEmulation()
        self.timing = timing or DeviceTiming()
        self.config = config
        self._settings = settings
        self._transport = transport
        self.clock_offset = timedelta(0)  # a fault: this device's clock runs ahead (+) or behind
        self._skew_wanted: timedelta | None = None
        self.free_bytes: int | None = None  # a fault: the free space the agent sees (None: real)
        self._power_loss_at: str | None = None
        self.counters = StepCounters()
        self._network = network
        self._limits = limits
        self.agent = self._new_agent()
        self._monotonic = monotonic
        self._next_poll = 0.0  # the first step checks at once
        self._next_telemetry = 0.0
        self._feeds: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        self.restarts = 0

    @classmethod
    def from_spec(cls, spec: DeviceSpec, settings: AgentSettings, timing: DeviceTiming,
                  network: NetworkLoop | None = None) -> SimulatedDevice:
        """The device ``spec`` describes; its MQTT session on ``network`` when given.

        ``network`` is a :class:`~edgeota.simulator.mqtt_loop.SharedNetworkLoop`
        (one per process for every device's session); without one the agent's
        session has its own network thread.
        """
        return cls(spec.config, settings, hardware=spec.hardware, emulation=spec.emulation,
                   timing=timing, network=network)

    def _new_agent(self) -> Agent:
        """An agent on this device's folder, with the simulator's hooks installed."""
        agent = Agent(self.config, self._settings, transport=self._transport,
                      network=self._network, limits=self._limits,
                      run_hook=self.emulation, clock=self.now)
        agent.on_journal_saved = self._journal_saved
        agent.updates.on_download_progress = self._download_progress
        agent.updates.disk_free = self._disk_free
        self._metadata_clock(agent)
        return agent

    def _metadata_clock(self, agent: Agent) -> None:
        """ngclient judges expiry by this device's clock only while it is skewed.

        Otherwise ngclient keeps its own (the process clock), which is what the
        attack suite's freeze moves for every device at once.
        """
        agent.updates.clock = self.now if self.clock_offset else None

    # -- faults ------------------------------------------------------------------------

    def now(self) -> datetime:
        """This device's clock: the host's, moved by :attr:`clock_offset`."""
        return datetime.now(UTC) + self.clock_offset

    def skew_clock(self, offset: timedelta | None) -> None:
        """Move this device's clock by ``offset`` (``None``: set it right again, as NTP does).

        The skew takes effect once the agent has a time floor (a verified cycle
        raised it above the epoch): a device with no floor yet trusts any
        clock, which would test nothing. Called from any thread.
        """
        if offset is None:
            self._skew_wanted = None
            self.clock_offset = timedelta(0)
            self._metadata_clock(self.agent)
        else:
            self._skew_wanted = offset

    def arm_power_loss(self, state: str) -> None:
        """Cut the power once, the next time the agent's update reaches ``state``.

        ``downloading`` cuts half-way through the bundle (after at least one
        durable window when the bundle is larger than one), so the restarted
        agent resumes rather than starts over; every other state cuts right
        after the journal saved it, before its work begins.
        """
        if state not in POWER_LOSS_STATES:
            raise ValueError(f"no such state {state!r} (one of {POWER_LOSS_STATES})")
        self._power_loss_at = state

    def set_free_bytes(self, free: int | None) -> None:
        """The free space the agent's pre-download check sees (``None``: the real figure)."""
        if free is not None and free < 0:
            raise ValueError("free bytes cannot be negative")
        self.free_bytes = free

    def _cut_power(self, state: str) -> None:
        self._power_loss_at = None  # once: the restarted agent must be able to finish
        raise SimulatedPowerLoss(self.device_id, state)

    def _journal_saved(self, name: str, record: JournalRecord) -> None:
        if record.state in (State.FAILED, State.ROLLED_BACK) and record.reason:
            # Outcomes reached outside a cycle (the recovery after a reboot) have a
            # reason too; the report reads it from here once the journal is idle again.
            self.counters.reasons[name] = record.reason
        state = str(record.state)
        if state == self._power_loss_at and state != State.DOWNLOADING:
            self._cut_power(state)

    def _download_progress(self, offset: int, length: int) -> None:
        if self._power_loss_at == State.DOWNLOADING and 2 * offset >= length:
            self._cut_power(State.DOWNLOADING)

    def _disk_free(self, folder: Path) -> int:
        free = self.free_bytes
        return shutil.disk_usage(folder).free if free is None else free

    def _apply_skew(self) -> None:
        wanted = self._skew_wanted
        if wanted is not None and self.agent.floor.floor > EPOCH:
            self.clock_offset = wanted
            self._skew_wanted = None
            self._metadata_clock(self.agent)
            logger.info("clock skewed", extra={"device_id": self.device_id,
                                               "offset_seconds": wanted.total_seconds()})

    def start(self) -> None:
        """Recover the journal and serve what was committed (as a booting device does)."""
        self.agent.start()

    def close(self) -> None:
        self.agent.close()

    def drop_connection(self) -> bool:
        """Cut the MQTT connection as a flaky link would; it reconnects by itself."""
        connection = self.agent.session
        return connection.drop() if connection is not None else False

    def download_stats(self) -> DownloadStats:
        """Resumes, full restarts and bytes of this device's resumable downloads."""
        return self.agent.updates.download_stats

    def journal_state(self, name: str) -> str:
        return str(self.agent.journal(name).current.state)

    def snapshot(self) -> StatusSnapshot:
        """What the recorder, faults and run read of this device, now (any thread)."""
        return read_status(self)

    def predict_rows(self, name: str, rows: np.ndarray) -> tuple[str, dict[str, np.ndarray]] | None:
        """Run the served ``name`` on every row of ``rows`` (its first input); ``None``: not served.

        One batch when the model takes a batch, else row by row. Returns the
        version that answered and each output, one entry per row.
        """
        host = self.agent.host
        if name not in host.models():
            return None
        model = host.model(name)
        version, spec = model.version, model.inputs[0]
        del model  # holding it would keep its session alive after a swap
        if spec.shape and spec.shape[0] is None:
            answer = host.predict(name, {spec.name: rows})
            return answer.version, dict(answer.outputs)
        answers = [host.predict(name, {spec.name: rows[i:i + 1]}).outputs
                   for i in range(len(rows))]
        return version, {key: np.concatenate([np.asarray(a[key]) for a in answers])
                         for key in (answers[0] if answers else {})}

    def serving(self) -> dict[str, str]:
        """Model name -> version served now (a model between unload and load is left out)."""
        served = {}
        for name in self.agent.host.models():
            try:
                served[name] = self.agent.host.current_version(name)
            except ModelHostError:
                continue  # an unload-then-load swap's gap: nothing serves it this instant
        return served

    def step(self) -> None:
        """One slice of the device's life; exceptions are counted and logged, never raised.

        A :class:`SimulatedPowerLoss` from the slice boots the agent again.
        """
        try:
            try:
                self._step()
            except SimulatedPowerLoss as cut:
                self._reboot(cut)
        except Exception:
            self.counters.step_errors += 1
            logger.exception("simulated device step failed", extra={"device_id": self.device_id})

    def _reboot(self, cut: SimulatedPowerLoss) -> None:
        """Boot again after ``cut``; a cut armed for the reboot's own recovery boots again."""
        for _ in range(_MAX_REBOOTS):
            self.counters.power_losses += 1
            logger.info("simulated power loss; restarting the agent",
                        extra={"device_id": self.device_id, "state": cut.state})
            try:
                self.restart()
            except SimulatedPowerLoss as again:
                cut = again
            else:
                return
        raise RuntimeError(f"{self.device_id}: still losing power after {_MAX_REBOOTS} "
                           "reboots")

    def restart(self) -> None:
        """Die and boot again from the same state folder: the journal decides what happens.

        Only the simulator's own tallies (download statistics) carry over; the
        agent itself starts from its files, as after a reboot.
        """
        stats = self.agent.updates.download_stats
        self.agent.close()
        self.agent = self._new_agent()
        self.agent.updates.download_stats = stats
        self.agent.start()
        self.restarts += 1
        self._next_poll = 0.0

    def _step(self) -> None:
        self._apply_skew()
        now = self._monotonic()
        agent = self.agent
        if agent.wake.is_set() or now >= self._next_poll:
            agent.wake.clear()
            self._next_poll = now + self.timing.poll_seconds
            outcome = agent.run_cycle()
            retry = agent.retry_delay()  # a transfer that failed is retried before the poll
            if retry is not None:
                self._next_poll = min(self._next_poll, self._monotonic() + retry)
            self.counters.cycles += 1
            self.counters.states.update(outcome.states)
            self.counters.reasons.update(outcome.reasons)
            if "*" in outcome.reasons:
                self.counters.check_failures[outcome.reasons["*"]] += 1
            self._apply_skew()
        self._serve_traffic()
        for name, state in agent.check_probation().items():
            self.counters.states[name] = state
            if state == "rolled_back":
                self.counters.reasons[name] = str(agent.journal(name).current.reason
                                                  or "probation")
        if now >= self._next_telemetry:
            self._next_telemetry = now + self.timing.telemetry_seconds
            if agent.publish_telemetry():
                self.counters.telemetry_sent += 1

    def _serve_traffic(self) -> None:
        host = self.agent.host
        for name in host.models():
            for _ in range(self.timing.inferences_per_step):
                try:
                    model = host.model(name)
                    key = (name, model.version)
                    if key not in self._feeds:
                        self._feeds = {k: v for k, v in self._feeds.items() if k[0] != name}
                        self._feeds[key] = warmup_feeds(model.manifest)
                    del model  # holding it would keep its session alive after a swap
                    host.predict(name, self._feeds[key])
                    self.counters.inferences += 1
                except ModelHostError:
                    self.counters.inference_errors += 1
