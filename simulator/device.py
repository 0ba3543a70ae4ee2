"""One simulated device: the real agent, plus the traffic and hardware a real device would have.

A :class:`SimulatedDevice` wraps an unmodified :class:`edgeota.agent.runner.Agent`
(its own identity, journal folder and MQTT connection) and does, in
:meth:`~SimulatedDevice.step`, what ``edgeota-agent run``'s loop does
(:func:`edgeota.agent.runner.run_forever`): a cycle when the server notified a
change or the poll interval passed, the probation check, telemetry on its
interval. Besides, it sends inference traffic to the served models (the
manifest's validation inputs), because probation and the server's
model-aware gates judge a release by the requests it serves; and
:class:`~edgeota.agent.model_host.HardwareEmulation` lets a scenario make a
release slow or failing on this device's hardware.

``step`` never blocks without a bound and never raises for a bad update (the
agent reports it); it is driven by :class:`edgeota.simulator.fleet.FleetRunner`,
a few worker threads for a whole fleet rather than a thread per device.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edgeota.agent.config import AgentConfig
from edgeota.agent.model_host import HardwareEmulation, ModelHostError, warmup_feeds
from edgeota.agent.mqtt_fetcher import DownloadStats
from edgeota.agent.runner import Agent, AgentSettings
from edgeota.agent.update_cycle import UpdateClient

__all__ = ["DeviceTiming", "SimulatedDevice"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceTiming:
    """How often a simulated device checks, reports and serves (seconds, requests)."""

    poll_seconds: float = 60.0  # a notify over MQTT wakes it sooner
    telemetry_seconds: float = 1.0
    inferences_per_step: int = 2


@dataclass
class StepCounters:
    cycles: int = 0
    inferences: int = 0
    inference_errors: int = 0
    telemetry_sent: int = 0
    step_errors: int = 0
    states: dict[str, str] = field(default_factory=dict)  # last cycle outcome per model
    reasons: dict[str, str] = field(default_factory=dict)  # last failure reason per model


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
        update_client: UpdateClient | None = None,
        make_client: Callable[[], UpdateClient | None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device_id = config.device_id
        self.hardware = hardware
        self.emulation = emulation or HardwareEmulation()
        self.timing = timing or DeviceTiming()
        self.agent = Agent(config, settings, transport=transport, emulation=self.emulation,
                           update_client=update_client)
        self.counters = StepCounters()
        self._monotonic = monotonic
        self._next_poll = 0.0  # the first step checks at once
        self._next_telemetry = 0.0
        self._feeds: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        self._settings = settings
        self._transport = transport
        # A restart needs a fresh connection the way the first one was made.
        self._make_client = make_client or (lambda: None)
        self.crash_when: str | None = None  # a fault: die and restart in this state
        self.restarts = 0

    def start(self) -> None:
        """Recover the journal and serve what was committed (as a booting device does)."""
        self.agent.start()

    def close(self) -> None:
        self.agent.updates.close()

    def drop_connection(self) -> bool:
        """Cut the MQTT connection as a flaky link would; it reconnects by itself."""
        connection = self.agent.updates.connection
        return connection.drop() if connection is not None else False

    def download_stats(self) -> DownloadStats:
        """Resumes, full restarts and bytes of this device's resumable downloads."""
        return self.agent.updates.download_stats

    def journal_state(self, name: str) -> str:
        return str(self.agent.journal(name).current.state)

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
        """One slice of the device's life; exceptions are counted and logged, never raised."""
        try:
            self._step()
        except Exception:
            self.counters.step_errors += 1
            logger.exception("simulated device step failed", extra={"device_id": self.device_id})

    def restart(self) -> None:
        """Die and boot again from the same state folder: the journal decides what happens."""
        self.agent.updates.close()
        self.agent = Agent(self.agent.config, self._settings, transport=self._transport,
                           emulation=self.emulation, update_client=self._make_client())
        self.agent.start()
        self.restarts += 1
        self._next_poll = 0.0

    def _step(self) -> None:
        if self.crash_when is not None and any(
                self.crash_when in ("any", self.journal_state(name))
                for name in self.agent.host.models()):
            self.crash_when = None
            self.restart()
        now = self._monotonic()
        agent = self.agent
        if agent.wake.is_set() or now >= self._next_poll:
            agent.wake.clear()
            self._next_poll = now + self.timing.poll_seconds
            outcome = agent.run_cycle()
            self.counters.cycles += 1
            self.counters.states.update(outcome.states)
            self.counters.reasons.update(outcome.reasons)
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
