"""Twenty real agents over MQTT through one phased rollout, a failure pause and a gate.

Real server (SQLite and PostgreSQL), embedded TLS broker with the device ACL,
the fetch bridge, and 20 unmodified agents (their own identities, journals and
MQTT connections) driven by the simulator's fleet runner, which also sends
them inference traffic. Hardware is emulated where the story needs it: a
release that fails on two devices, and one that is slow on the rpi5 class.
The rollout engine runs as the server runs it (``rollouts.advance``), called
from the waits here so each step is checked at the moment it happens.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_support import RunningServer, running_mqtt_server, wait_for

from edgeota.agent.config import AgentConfig
from edgeota.agent.runner import AgentSettings
from edgeota.server.api.schemas import DeploymentOut
from edgeota.server.db.models import Device
from edgeota.server.services import rollouts
from edgeota.server.services.deployments import phase_of_ranks, rank_devices
from edgeota.simulator.device import DeviceTiming, SimulatedDevice
from edgeota.simulator.fleet import FleetRunner

PI4 = [f"pi4-{i:02d}" for i in range(10)]
PI5 = [f"pi5-{i:02d}" for i in range(10)]
SETTINGS = AgentSettings(probation_seconds=0.3, probation_min_inferences=5,
                         max_latency_factor=1000.0)  # latency is the server's gate to judge
TIMING = DeviceTiming(poll_seconds=30.0, telemetry_seconds=0.3, inferences_per_step=2)
SLOW_ON_PI5 = 0.05  # seconds added per inference of the slow release on rpi5
WAIT = 90.0  # seconds: bound of every wait below


@pytest.fixture
def fleet(tmp_path: Path, db_url: str) -> Iterator[tuple[RunningServer, list[SimulatedDevice]]]:
    with running_mqtt_server(tmp_path, db_url) as (server, _transport):
        devices = []
        for device_id in PI4 + PI5:
            hardware = "rpi" + device_id[2]  # pi4-03 -> rpi4
            out = server.enroll(device_id, hardware, "fleet=lab")
            devices.append(SimulatedDevice(AgentConfig.load(out / "agent.toml"), SETTINGS,
                                           hardware=hardware, timing=TIMING))
        try:
            for device in devices:
                device.start()
            for device in devices:
                assert device.agent.session.wait_ready(20)
            with FleetRunner(devices, workers=4, tick_seconds=0.02):
                yield server, devices
        finally:
            for device in devices:
                device.close()


def deploy(server: RunningServer, release: str, *args: str) -> dict:
    result = server.cli("deploy", release, "--tag", "fleet=lab", "--json", *args)
    assert result.code == 0, result.err
    return json.loads(result.out)


def detail(server: RunningServer, deployment_id: int) -> dict:
    with server.ctx.sessions() as session:
        view = rollouts.get_deployment(session, deployment_id)
        return DeploymentOut.model_validate(view).model_dump(mode="json")


def serving(devices: list[SimulatedDevice]) -> dict[str, str | None]:
    return {d.device_id: d.serving().get("digits") for d in devices}


def advance_until(server: RunningServer, deployment_id: int, status: str,
                  what: str) -> dict:
    """Run the engine until the deployment reaches ``status``; return its detail."""
    def reached() -> bool:
        rollouts.advance(server.ctx)
        return detail(server, deployment_id)["status"] == status

    wait_for(reached, WAIT, what)
    return detail(server, deployment_id)


def test_phased_rollout_failure_pause_and_model_aware_gate_with_twenty_agents(fleet) -> None:
    server, devices = fleet
    by_id = {d.device_id: d for d in devices}
    for sample, version in (("digits_v1", "1.0.0"), ("digits_v2", "2.0.0"),
                            ("digits_v2", "3.0.0"), ("digits_v2", "4.0.0")):
        assert server.publish(sample, version).code == 0
    no_gates = ("--latency-factor", "0", "--error-rate-factor", "0")

    # v1 everywhere at once.
    first = deploy(server, "digits@1.0.0", *no_gates)["deployment_id"]
    advance_until(server, first, "completed", "every device on 1.0.0")
    wait_for(lambda: set(serving(devices).values()) == {"1.0.0"}, WAIT, "all serving 1.0.0")

    # v2 in four phases; each waits for every device of the phases before it.
    created = deploy(server, "digits@2.0.0", "--phases", "10,25,50,100",
                     "--min-success-ratio", "1", *no_gates)
    phased = created["deployment_id"]
    assert [list(created["scheduled"].values()).count(k) for k in range(4)] == [2, 3, 5, 10]
    done = advance_until(server, phased, "completed", "the four phases")
    starts = [e for e in done["events"] if e["kind"] == "phase_started"]
    assert [e["detail"]["phase"] for e in starts] == [0, 1, 2, 3]
    members = {p["index"]: p["devices"] for p in done["phase_detail"]}
    for phase in range(1, 4):
        began = min(a["assigned_at"] for a in members[phase])
        previous_done = max(a["finished_at"] for k in range(phase) for a in members[k])
        assert began >= previous_done, f"phase {phase} started before phase {phase - 1} ended"
    wait_for(lambda: set(serving(devices).values()) == {"2.0.0"}, WAIT, "all serving 2.0.0")

    # v3 fails on two of the four canaries: 2/4 crosses 0.25 and the rollout pauses.
    ranked = rank_devices(phased + 1, PI4 + PI5)
    canaries = [d for d, p in zip(ranked, phase_of_ranks(20, [20, 100]), strict=True) if p == 0]
    broken = canaries[:2]
    for device_id in broken:
        by_id[device_id].emulation.failing.add("digits@3.0.0")
    created = deploy(server, "digits@3.0.0", "--phases", "20,100", "--max-failure-ratio",
                     "0.25", *no_gates)
    failing = created["deployment_id"]
    assert failing == phased + 1 and sorted(created["assigned"]) == sorted(canaries)
    paused = advance_until(server, failing, "paused", "the failure pause")
    assert "failure ratio 2/4" in paused["status_reason"]
    assert all(f"{d} (error_rate)" in paused["status_reason"] for d in broken)
    later = [a for p in paused["phase_detail"][1:] for a in p["devices"]]
    assert {a["state"] for a in later} == {"waiting"}  # the second phase never started
    assert all(serving(devices)[d] == "2.0.0" for d in PI4 + PI5 if d not in canaries)
    # The broken devices reverted on their own; the operator rolls the canaries back.
    rolled = json.loads(server.cli("rollout", "rollback", str(failing), "--json").out)
    assert sorted(rolled["devices"]) == sorted(canaries)
    wait_for(lambda: set(serving(devices).values()) == {"2.0.0"}, WAIT, "all back on 2.0.0")

    # v4 is slow on rpi5 only: the gate compares each rpi5 with itself on 2.0.0.
    for device_id in PI5:
        by_id[device_id].emulation.extra_latency_s["digits@4.0.0"] = SLOW_ON_PI5

    def baselines_ready() -> bool:
        with server.ctx.sessions() as session:
            return all(((session.get(Device, d).reported_state or {}).get("versions", {})
                        .get("digits", {}).get("2.0.0", {}).get("inferences", 0)) >= 20
                       for d in PI4 + PI5)

    wait_for(baselines_ready, WAIT, "telemetry of every device on 2.0.0")
    gated = deploy(server, "digits@4.0.0", "--soak", "1h", "--latency-factor", "4",
                   "--gate-min-inferences", "20", "--auto-rollback")["deployment_id"]
    stopped = advance_until(server, gated, "paused", "the model-aware gate")
    reason = stopped["status_reason"]
    assert reason.startswith("model-aware gate: latency_p95_ms on rpi5:")
    assert not any(d in reason for d in PI4)
    states = {a["device_id"]: a["state"] for p in stopped["phase_detail"] for a in p["devices"]}
    assert {d for d, s in states.items() if s == "rolled_back"} == set(PI5)
    assert all(states[d] in ("pending", "downloading", "installed") for d in PI4)

    def settled() -> bool:
        now = serving(devices)
        return all(now[d] == "4.0.0" for d in PI4) and all(now[d] == "2.0.0" for d in PI5)

    wait_for(settled, WAIT, "rpi4 on 4.0.0 and rpi5 back on 2.0.0")
    assert all(d.counters.step_errors == 0 for d in devices)
    assert server.cli("audit", "verify").code == 0
