"""The attack suite against a real server, the embedded TLS broker and three real agents.

Every TUF/Uptane attack of ``edgeota.simulator.attacks`` -- a malicious server
holding the online keys and the storage, and a man-in-the-middle on the
broker -- is played against three unmodified agents (their own identities,
journals, MQTT connections, ngclient caches) that serve a committed
digits 1.0.0. Every attack must be refused by every device with the reason it
is meant to meet, and no device may change what it serves or has committed.
Afterwards an honest deployment, judged the same way, goes through: the
attacks left the devices able to update, and the verdicts are not vacuous.
The same suite also runs as the simulator's ``attacks`` scenario, on a fleet
its runner keeps stepping.

The suite runs on SQLite and PostgreSQL (``db_url``): about 6 s each, the
database only serving publishing and enrolment. The scenario test uses the
simulator's own embedded SQLite.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console
from server_support import running_mqtt_server

from edgeota.agent.config import AgentConfig
from edgeota.agent.runner import AgentSettings
from edgeota.agent.update_cycle import TransferLimits
from edgeota.server.client import OperatorClient
from edgeota.simulator.attacks import (
    BROKER_MITM,
    MALICIOUS_SERVER,
    Attack,
    AttackLab,
    default_attacks,
    release_publisher,
    run_suite,
    verdict_table,
)
from edgeota.simulator.device import SimulatedDevice

DEVICES = ("pi-a", "pi-b", "pi-c")
SETTINGS = AgentSettings(probation_seconds=0, probation_min_inferences=1)
# Short transfer limits keep slow retrieval at a few seconds; honest transfers on
# loopback are thousands of times faster than the floor.
LIMITS = TransferLimits(frame_timeout=2.0, min_rate=16 * 1024, grace=1.0, max_retries=2)
SUITE_BUDGET = 90.0  # seconds for all ten attacks (they take about 15 s)

EXPECTED = {
    "arbitrary software": (MALICIOUS_SERVER, "bundle_mismatch"),
    "rollback": (MALICIOUS_SERVER, "below_floor"),
    "freeze": (BROKER_MITM, "expired_metadata"),
    "mix-and-match": (BROKER_MITM, "metadata_rollback"),
    "endless data": (BROKER_MITM, "bundle_too_large"),
    "slow retrieval": (BROKER_MITM, "bundle_too_slow"),
    "wrong hardware": (MALICIOUS_SERVER, "hardware_not_in_release"),
    "replayed director metadata": (BROKER_MITM, "metadata_rollback"),
    "another device's key": (MALICIOUS_SERVER, "key_unwrap_failed"),
    "unsigned model (compromised director key)": (MALICIOUS_SERVER, "not_in_image_repository"),
}


@pytest.fixture
def lab(tmp_path: Path, db_url: str) -> Iterator[AttackLab]:
    """Three agents over MQTT serving a committed digits 1.0.0 (release counter 1)."""
    with running_mqtt_server(tmp_path, db_url) as (server, transport):
        assert server.publish("digits_v1", "1.0.0").code == 0
        devices = []
        for device_id in DEVICES:
            config = AgentConfig.load(server.enroll(device_id, "rpi4") / "agent.toml")
            devices.append(SimulatedDevice(
                config, SETTINGS, hardware="rpi4",
                limits=LIMITS))
        client = OperatorClient(server.url, server.operator.token())
        try:
            for device in devices:
                device.start()
                assert device.agent.session.wait_ready(20)
            assert server.cli("deploy", "digits@1.0.0", "--devices", ",".join(DEVICES)).code == 0
            for device in devices:
                assert device.agent.run_cycle().states == {"digits": "probation"}
                assert device.agent.check_probation(force=True) == {"digits": "committed"}
            yield AttackLab(server.ctx, transport, devices,
                            publish=release_publisher(server.operator, client))
        finally:
            client.close()
            for device in devices:
                device.close()


def test_every_attack_is_refused_by_every_device_and_nothing_changes(lab: AttackLab) -> None:
    started = time.monotonic()
    verdicts = run_suite(lab)
    took = time.monotonic() - started
    Console(width=160).print(verdict_table(verdicts))  # shown with -s, and on failure
    assert [v.name for v in verdicts] == [a.name for a in default_attacks()]
    assert set(EXPECTED) == {v.name for v in verdicts}
    for verdict in verdicts:
        attacker, reason = EXPECTED[verdict.name]
        assert verdict.attacker == attacker
        assert verdict.error is None, verdict.to_dict()
        assert verdict.unchanged, verdict.to_dict()
        assert verdict.passed, verdict.to_dict()
        assert [(d.state, d.reason) for d in verdict.devices] == \
            [("failed", reason)] * len(DEVICES), verdict.to_dict()
        assert verdict.as_expected
    assert took < SUITE_BUDGET, f"the suite took {took:.1f}s"

    # The honest state is back and the devices are not wedged: they still serve
    # 1.0.0 and see nothing to do ...
    for device in lab.devices:
        assert device.serving() == {"digits": "1.0.0"}
        assert device.agent.run_cycle().states == {"digits": "current"}
    # ... and the verdicts are not vacuous: an honest deployment, judged the same
    # way, is installed by every device and the lab says so.
    (control,) = run_suite(lab, [HonestDeployment()])
    assert not control.passed and not control.unchanged, control.to_dict()
    assert [(d.state, d.refused) for d in control.devices] == [("probation", False)] * 3
    assert all(any(c.startswith("served") for c in d.changes) for d in control.devices)
    assert {d.serving()["digits"] for d in lab.devices} == {lab.releases.next}


class HonestDeployment(Attack):
    """Control: the server assigns the lab's next release honestly (no attacker)."""

    name = "control: honest deployment"
    attacker = "nobody"
    description = "assigns the lab's next release as a deployment would"
    expected_reason = "-"

    @contextlib.contextmanager
    def staged(self, lab: AttackLab) -> Iterator[None]:
        with lab.honest_director():
            for device in lab.devices:
                lab.assign(device.device_id, lab.release("next"))
            yield


def test_the_attacks_scenario_runs_the_suite_on_a_simulated_fleet(tmp_path: Path) -> None:
    """``edgeota sim run attacks``: the suite against a fleet its runner keeps stepping
    (the lab takes the devices off the runner while it drives them)."""
    from edgeota.simulator.run import Simulation
    from edgeota.simulator.scenario import load_scenario

    with Simulation(load_scenario(Path("attacks")), tmp_path / "sim") as simulation:
        result = simulation.run()
    assert result.ok, result.problems
    assert [v.name for v in result.attacks] == [a.name for a in default_attacks()]
    assert all(v.as_expected for v in result.attacks), [v.to_dict() for v in result.attacks]
    assert {device: serving["digits"] for device, serving in result.serving.items()} == \
        dict.fromkeys(result.serving, "1.0.0")
