"""Run a scenario: a server and broker, a fleet of real agents, the timeline, a report.

:class:`Simulation` gets its server from :mod:`edgeota.simulator.server`:
by default (the tests) the embedded server and TLS broker in this process on
a fresh home (SQLite, loopback ports); ``edgeota sim run`` starts ``edgeota
serve`` in a child process instead, so the report has the server's own CPU
per update, or joins a running server (``--server``). It enrols the devices
through the operator API as ``edgeota device enroll`` does, and runs one
unmodified agent per device (:class:`~edgeota.simulator.device.SimulatedDevice`)
on a few worker threads, their MQTT connections on one shared network loop.

Where the agents run: by default (``device_processes=0``) in this process.
With ``device_processes=P`` (``edgeota sim run --device-processes P``) they
run in P child processes (:mod:`edgeota.simulator.processes`), each with its
own network loop and worker threads, so a large fleet uses more than one
core; this process keeps the server, the enrolment (the device folders on
disk), the timeline, the faults and the recorder, and sees each device
through a :class:`~edgeota.simulator.processes.RemoteDevice`: the same
status snapshot (:mod:`edgeota.simulator.snapshot`) and the same actions as
a device here, so the recorder, faults and demo have one code path. A device
process that dies is a problem in the result (exit code, the tail of its
log) and ends the timeline; it never hangs the run. The attack suite drives
each agent's cycles itself, so it needs the devices here.

The timeline's steps publish releases through the
release manager's code path and deploy them through the operator API to the
run's own devices (selected by their ``sim`` tag); the server's own rollout
engine advances phases and gates. Every wait is bounded by its step's
timeout; a step that times out is a problem in the result, and the run goes
on to write its report.

``edgeota sim run`` and ``edgeota demo`` both use this class, and the tests
drive it the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgeota.agent.config import AgentConfig
from edgeota.agent.runner import AgentSettings
from edgeota.protocol.errors import EdgeotaError
from edgeota.simulator.device import (
    DeviceSpec,
    DeviceTiming,
    FleetDevice,
    HardwareEmulation,
    SimulatedDevice,
)
from edgeota.simulator.faults import FaultInjector
from edgeota.simulator.fleet import FleetRunner
from edgeota.simulator.link import LinkEmulator, LinkShape
from edgeota.simulator.models import padded_model
from edgeota.simulator.processes import DeviceProcessError, DeviceProcessPool
from edgeota.simulator.scenario import Scenario, Step
from edgeota.simulator.server import ServerChoice, SimServer, SimServerError, open_server
from edgeota.simulator.snapshot import status_of

__all__ = ["Simulation", "SimulationError", "SimulationResult"]

logger = logging.getLogger(__name__)

SAMPLE_INTERVAL = 0.25  # seconds between two looks at the fleet
MAX_DEVICE_PROCESSES = 64


class SimulationError(EdgeotaError):
    """The simulation could not be set up (the message says what failed)."""


@dataclass
class SimulationResult:
    """What a run ended with: per device, what it serves; problems found on the way."""

    scenario: str
    serving: dict[str, dict[str, str]]  # device -> model -> version
    hardware: dict[str, str]
    deployments: list[dict[str, Any]] = field(default_factory=list)
    attacks: list[Any] = field(default_factory=list)  # AttackVerdict
    problems: list[str] = field(default_factory=list)
    report_dir: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def needs_devices_in_process(scenario: Scenario) -> bool:
    """Whether the scenario drives the agents itself: the attack suite (it steps their cycles)."""
    return any(step.action == "attacks" for step in scenario.timeline)


def needs_server_in_process(scenario: Scenario) -> bool:
    """Whether the scenario acts inside the server: attacks, corrupted chunks in transit."""
    return (any(step.action == "attacks" for step in scenario.timeline)
            or any(fault.kind == "corrupt_chunks" for fault in scenario.faults))


class Simulation:
    """One scenario run in ``workdir``; use as a context manager, then :meth:`run`.

    ``workers`` threads step the agents (in each device process when
    ``device_processes`` > 0; 0 runs them in this process).
    """

    def __init__(
        self,
        scenario: Scenario,
        workdir: Path,
        *,
        workers: int = 4,
        device_processes: int = 0,
        server: ServerChoice | None = None,
        on_progress: Callable[[Simulation], None] | None = None,
        say: Callable[[str], None] = lambda _text: None,
    ) -> None:
        self.scenario = scenario
        self.server_choice = server or ServerChoice()
        if self.server_choice.mode != "in-process" and needs_server_in_process(scenario):
            raise SimulationError(
                "the attack suite and corrupt_chunks faults act inside the server (its keys, "
                "storage and fetch bridge), so they need it in this process (--in-process)")
        if not 0 <= device_processes <= MAX_DEVICE_PROCESSES:
            raise SimulationError(f"device_processes must be in [0, {MAX_DEVICE_PROCESSES}], "
                                  f"not {device_processes}")
        if device_processes and needs_devices_in_process(scenario):
            raise SimulationError(
                "the attack suite steps each agent's update cycles itself, so it needs the "
                "devices in this process (device_processes=0, no --device-processes)")
        self.workdir = workdir
        self.workers = workers
        self.device_processes = device_processes
        self.devices: list[FleetDevice] = []
        # The device processes when device_processes > 0 (started by the enrolment).
        self.pool: DeviceProcessPool | None = None
        self.recorder: Any = None
        self._on_progress = on_progress
        self._say = say
        self._rng = random.Random(scenario.seed)  # noqa: S311 - fault draws, not secrets
        self._stack: list[Callable[[], None]] = []
        self._released: dict[str, dict[str, Any]] = {}  # NAME@VERSION -> release JSON
        self.server: SimServer = open_server(self.server_choice)
        self.client: Any = None
        self.operator: Any = None
        self.network: Any = None
        # Tag and device ids of this run's devices: a deploy selects only them.
        self.fleet_tag = {"sim": "fleet" if self.server.device_id_prefix == "sim"
                          else self.server.device_id_prefix}
        # The shaping proxy of the scenario's link profiles, started with the first shaped device.
        self.link_emulator: LinkEmulator | None = None
        self.faults: FaultInjector | None = None  # set when the run starts
        self._stop_faults = threading.Event()

    # -- set-up and tear-down --------------------------------------------------------

    def __enter__(self) -> Simulation:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop_faults.set()
        while self._stack:
            undo = self._stack.pop()
            try:
                undo()
            except Exception:
                logger.exception("simulation tear-down step failed")

    @property
    def transport(self) -> Any:
        """The server's MQTT transport (in-process servers only)."""
        return self.server.transport

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._stack.append(self.server.stop)
        try:
            self.server.start(self.workdir)
        except SimServerError as e:
            raise SimulationError(str(e)) from e
        self.operator = self.server.operator
        self.client = self.server.client
        if not self.device_processes:
            self.network = _shared_network_loop()
            if self.network is not None:
                self.network.start()
                self._stack.append(self.network.stop)
        self._enrol()

    def _enrol(self) -> None:
        from edgeota.server.enrollment import enroll_device

        scenario = self.scenario
        classes = scenario.hardware_of()
        settings = AgentSettings(
            probation_seconds=scenario.agent.probation_seconds,
            probation_min_inferences=scenario.agent.probation_min_inferences,
            max_latency_factor=scenario.agent.max_latency_factor,
            latency_floor_ms=scenario.agent.latency_floor_ms)
        timing = DeviceTiming(poll_seconds=scenario.agent.poll_seconds,
                              telemetry_seconds=scenario.agent.telemetry_seconds,
                              inferences_per_step=scenario.agent.inferences_per_step)
        self._say(f"enrolling {scenario.devices} devices")
        specs = []
        for index, cls in enumerate(classes):
            device_id = f"{self.server.device_id_prefix}-{index + 1:04d}"
            config = enroll_device(self.operator, self.client, device_id, hardware=cls.hardware,
                                   tags={**cls.tags, **self.fleet_tag},
                                   out=self.workdir / "devices" / device_id)
            if self.server.broker_override:
                config = dataclasses.replace(config, mqtt_url=self.server.broker_override)
                config.save()
            specs.append(self._device_spec(config, cls.hardware, cls.link))
        if self.device_processes:
            self._start_processes(specs, settings, timing)
        else:
            self._start_here(specs, settings, timing)
        self._say(f"{len(self.devices)} agents connected")

    def _start_here(self, specs: list[DeviceSpec], settings: AgentSettings,
                    timing: DeviceTiming) -> None:
        devices = [SimulatedDevice.from_spec(spec, settings, timing, self.network)
                   for spec in specs]
        self.devices = list(devices)
        self._stack.append(self._close_devices)
        for device in devices:
            device.start()
        deadline = time.monotonic() + 60
        for device in devices:
            connection = device.agent.session
            if connection is None:  # simulated devices always run over MQTT
                raise SimulationError(f"{device.device_id} has no MQTT session")
            if not connection.wait_ready(max(0.1, deadline - time.monotonic())):
                raise SimulationError(f"{device.device_id} did not connect to the broker "
                                      "within 60 s")

    def _start_processes(self, specs: list[DeviceSpec], settings: AgentSettings,
                         timing: DeviceTiming) -> None:
        pool = DeviceProcessPool(specs, processes=self.device_processes, settings=settings,
                                 timing=timing, workers=self.workers,
                                 log_dir=self.workdir / "device-processes")
        self.pool = pool
        self._stack.append(pool.stop)
        self._say(f"starting {len(pool.processes)} device processes")
        try:
            pool.start()
        except DeviceProcessError as e:
            raise SimulationError(str(e)) from e
        self.devices = list(pool.devices)

    def _device_spec(self, config: AgentConfig, hardware: str, link: str) -> DeviceSpec:
        address = self._link_address(link, config)
        if address is not None:
            config = dataclasses.replace(config, mqtt_url=f"mqtts://{address[0]}:{address[1]}")
        emulation = HardwareEmulation()
        for behaviour in self.scenario.behaviour:
            if behaviour.hardware in (None, hardware):
                if behaviour.extra_latency_ms:
                    emulation.extra_latency_s[behaviour.release] = \
                        behaviour.extra_latency_ms / 1000
                if behaviour.fail:
                    emulation.failing.add(behaviour.release)
        return DeviceSpec(config, hardware, emulation)

    def _link_address(self, link: str, config: AgentConfig) -> tuple[str, int] | None:
        """Where a device on ``link`` connects: the link emulator, or ``None`` (the broker)."""
        profile = self.scenario.links[link]
        if not profile.shaped or not config.mqtt_url:
            return None
        if self.link_emulator is None:
            broker = urlsplit(config.mqtt_url)
            if not broker.hostname:
                raise SimulationError(f"cannot shape links: no broker in {config.mqtt_url!r}")
            shapes = {name: LinkShape(p.bandwidth_kbps, p.latency_ms)
                      for name, p in self.scenario.links.items()}
            # The proxy listens on the broker's host name, which the broker's certificate
            # names: TLS passes through the proxy untouched.
            self.link_emulator = LinkEmulator((broker.hostname, broker.port or 8883),
                                              shapes, host=broker.hostname).start()
            self._stack.append(self.link_emulator.stop)
        return self.link_emulator.address(link)

    def _close_devices(self) -> None:
        for device in self.devices:
            if not isinstance(device, SimulatedDevice):
                continue  # a device process closes its own
            try:
                device.close()
            except Exception:
                logger.exception("closing %s failed", device.device_id)

    # -- the run ---------------------------------------------------------------------

    def run(self, report_dir: Path | None = None) -> SimulationResult:
        from edgeota.simulator.report import FleetRecorder

        self.recorder = FleetRecorder(
            self.devices,
            bridge_counters=self.server.bridge.counters if self.server.bridge else None,
            server_cpu_seconds=self.server.cpu_seconds)
        result = SimulationResult(scenario=self.scenario.name, serving={},
                                  hardware={d.device_id: d.hardware for d in self.devices})
        runner = None
        if self.pool is None:
            runner = FleetRunner([d for d in self.devices if isinstance(d, SimulatedDevice)],
                                 workers=self.workers).start()
        else:
            result.problems.extend(self.pool.run())
        self._start_faults()
        try:
            for index, step in enumerate(self.scenario.timeline):
                problem = self._do(step, result)
                if problem:
                    result.problems.append(f"step {index + 1} ({step.action}"
                                           f"{' ' + step.release if step.release else ''}): "
                                           f"{problem}")
                if self.pool is not None and self.pool.failed():
                    skipped = len(self.scenario.timeline) - index - 1
                    result.problems.extend(self.pool.problems())
                    if skipped:
                        result.problems.append(f"{skipped} later step(s) skipped: a device "
                                               "process ended")
                    break
        finally:
            self._stop_faults.set()
            if runner is not None:
                runner.stop()
            elif self.pool is not None:
                result.problems.extend(self.pool.halt())
        if self.pool is not None and self.pool.failed():
            result.problems.extend(p for p in self.pool.problems() if p not in result.problems)
        self.recorder.sample()
        result.serving = {d.device_id: d.serving() for d in self.devices}
        result.deployments = self.client.get("/api/v1/deployments")
        step_errors = sum(status_of(d).step_errors for d in self.devices)
        if step_errors:
            result.problems.append(f"{step_errors} device step(s) raised (see the log)")
        result.summary = self.recorder.summary()
        if report_dir is not None:
            self.recorder.write_report(report_dir)
            result.report_dir = report_dir
        return result

    def _progress(self) -> None:
        self.recorder.sample()
        if self._on_progress is not None:
            self._on_progress(self)

    def _wait(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Until ``condition``, ``timeout`` or a device process ending (False for both)."""
        deadline = time.monotonic() + timeout
        while True:
            self._progress()
            if condition():
                return True
            if time.monotonic() > deadline or (self.pool is not None and self.pool.failed()):
                return False
            time.sleep(SAMPLE_INTERVAL)  # pacing the display, not synchronising

    def _do(self, step: Step, result: SimulationResult) -> str | None:
        if step.action == "publish":
            return self._publish(step)
        if step.action == "deploy":
            return self._deploy(step)
        if step.action == "wait":
            self.recorder.event("wait", label=step.label, seconds=step.soak_seconds)
            self._wait(lambda: False, step.soak_seconds)
            return None
        if step.action == "attacks":
            return self._attacks(result)
        return f"unknown action {step.action}"

    def _publish(self, step: Step) -> str | None:
        from edgeota.samples import load_catalog, sample_path
        from edgeota.server.publisher import PublishRequest, publish_release

        assert step.release is not None and step.sample is not None
        name, version = step.release.split("@")
        catalog = load_catalog()
        if step.sample not in catalog:
            return f"no sample model {step.sample!r} (known: {', '.join(sorted(catalog))})"
        sample = catalog[step.sample]
        hardware = tuple(sorted({c.hardware for c in self.scenario.fleet}))
        model = sample.path
        if step.pad_mb:
            model = padded_model(sample.path, self.workdir / "models" / f"{step.release}.onnx",
                                 step.pad_mb)
        self._say(f"publishing {step.release} ({step.sample}"
                  + (f", padded by {step.pad_mb:g} MiB" if step.pad_mb else "") + ")")
        release = publish_release(self.operator, self.client, PublishRequest(
            model=model, name=name, version=version, hardware=hardware,
            vectors=sample.vectors_path, golden=sample_path("digits_golden.json")
            if name == "digits" else None,
            min_accuracy=sample.recommended_min_accuracy if name == "digits" else None))
        self._released[step.release] = release
        self.recorder.event("publish", release=step.release, status=release["status"])
        return None if release["status"] == "published" else f"release is {release['status']}"

    def _deploy(self, step: Step) -> str | None:
        assert step.release is not None
        name, version = step.release.split("@")
        answer = self.client.post("/api/v1/deployments", {
            "name": name, "version": version, "tags": self.fleet_tag, "devices": [],
            "phases": list(step.phases),
            "options": {"soak_seconds": step.soak_seconds,
                        "min_success_ratio": step.min_success_ratio,
                        "max_failure_ratio": step.max_failure_ratio,
                        "latency_factor": step.latency_factor,
                        "error_rate_factor": step.error_rate_factor,
                        "auto_rollback": step.auto_rollback}})
        deployment_id = answer["deployment_id"]
        self._say(f"deployment {deployment_id}: {step.release} to "
                  f"{len(answer['scheduled'])} devices in phases "
                  f"{', '.join(map(str, answer['phases']))} %"
                  + (f" ({step.label})" if step.label else ""))
        self.recorder.set_targets({name: version}, step.label or step.release,
                                  devices=answer["scheduled"])
        self.recorder.event("deploy", release=step.release, deployment=deployment_id,
                            phases=list(step.phases))
        eligible = set(answer["scheduled"])

        def status() -> str:
            state: str = self.client.get(f"/api/v1/deployments/{deployment_id}")["status"]
            return state

        if step.wait == "none":
            return None
        if step.wait == "updated":
            def condition() -> bool:
                if all(d.serving().get(name) == version
                       for d in self.devices if d.device_id in eligible):
                    # Served is not yet committed and reported: the rollout says when.
                    return status() == "completed"
                # A stopped rollout will not update the rest: say so now, not at the timeout.
                return status() in ("paused", "cancelled")
        else:
            def condition() -> bool:
                return status() == step.wait
        if not self._wait(condition, step.timeout_seconds):
            detail = self.client.get(f"/api/v1/deployments/{deployment_id}")
            waited = (f"stopped waiting for {step.wait}: a device process ended"
                      if self.pool is not None and self.pool.failed()
                      else f"not {step.wait} within {step.timeout_seconds:g} s")
            return (f"{waited} (deployment "
                    f"{detail['status']}: {detail['counts']}"
                    + (f"; {detail['status_reason']}" if detail["status_reason"] else "") + ")")
        detail = self.client.get(f"/api/v1/deployments/{deployment_id}")
        self.recorder.event("deployment", deployment=deployment_id, status=detail["status"],
                            reason=detail["status_reason"])
        if step.wait == "updated" and detail["status"] in ("paused", "cancelled"):
            return f"deployment {deployment_id} {detail['status']}: {detail['status_reason']}"
        if detail["status_reason"]:
            self._say(f"  deployment {deployment_id} {detail['status']}: "
                      f"{detail['status_reason']}")
        return None

    def _attacks(self, result: SimulationResult) -> str | None:
        from edgeota.simulator.attacks import AttackLab, run_suite

        self._say("running the attack suite")
        lab = AttackLab.from_simulation(self)
        verdicts = run_suite(lab)
        result.attacks = verdicts
        for verdict in verdicts:
            self.recorder.event("attack", name=verdict.name, passed=verdict.passed)
        failed = [v.name for v in verdicts if not v.passed]
        if failed:
            return f"attack(s) not refused cleanly: {', '.join(failed)}"
        unexpected = [v.name for v in verdicts if not v.as_expected]
        return (f"attack(s) refused for another reason than expected: {', '.join(unexpected)}"
                if unexpected else None)

    # -- faults ----------------------------------------------------------------------

    def _start_faults(self) -> None:
        """The scenario's faults and link drops (:mod:`edgeota.simulator.faults`), seeded."""
        injector = FaultInjector(self.scenario, self.devices, rng=self._rng,
                                 recorder=self.recorder,
                                 bridge=self.server.bridge,
                                 stop=self._stop_faults)
        injector.start()
        self.faults = injector
        self._stack.append(injector.stop)


def _shared_network_loop() -> Any:
    """One selectors loop for every device's MQTT connection, when the agent has it."""
    try:
        from edgeota.simulator.mqtt_loop import SharedNetworkLoop
    except ImportError:  # pragma: no cover - the loop ships with the agent
        return None
    return SharedNetworkLoop()
