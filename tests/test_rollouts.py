"""Phased rollouts against a real server and database, devices played by signed reports.

The devices here are their enrolled identities sending real signed status
reports over HTTP (the path a device without MQTT uses); the rollout engine
runs as the server runs it (:func:`rollouts.advance`). The fleet test with
real agents over MQTT is ``test_rollout_fleet.py``.
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass, field

import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_support import RunningServer
from sqlalchemy import event

from edgeota.agent.config import AgentConfig
from edgeota.protocol.identity import DeviceIdentity
from edgeota.protocol.reports import SignedReport, StatusReport
from edgeota.protocol.telemetry import ModelTelemetry, Telemetry
from edgeota.protocol.topics import DeviceTopic
from edgeota.server.db.models import Deployment, Device
from edgeota.server.mqtt_ingest import MAX_VERSIONS_PER_MODEL, DeviceMessageSink
from edgeota.server.services import rollouts
from edgeota.server.services.deployments import phase_of_ranks, rank_devices
from edgeota.server.tokens import Role

PHASES = "10,25,50,100"


@dataclass
class ReportingDevices:
    """Enrolled devices that send signed reports the way an agent does."""

    server: RunningServer
    seq: dict[str, int] = field(default_factory=dict)

    def enroll(self, count: int, hardware: str = "rpi4", prefix: str = "pi", *tags: str,
               start: int = 0) -> list[str]:
        ids = [f"{prefix}-{i:02d}" for i in range(start, start + count)]
        for device_id in ids:
            self.server.enroll(device_id, hardware, "fleet=lab", *tags)
        return ids

    def signed(self, device_id: str, state: str, release: str,
               error: str | None = None) -> bytes:
        """The next signed report of ``device_id``, as its agent would send it."""
        config = AgentConfig.load(self.server.enrolled[device_id] / "agent.toml")
        identity = DeviceIdentity.load(config.identity_dir)
        self.seq[device_id] = self.seq.get(device_id, 0) + 1
        return SignedReport.sign(StatusReport(device_id=device_id, seq=self.seq[device_id],
                                              state=state, release=release, error=error),
                                 identity).to_bytes()

    def report(self, device_id: str, state: str, release: str, error: str | None = None) -> None:
        config = AgentConfig.load(self.server.enrolled[device_id] / "agent.toml")
        body = self.signed(device_id, state, release, error)
        request = urllib.request.Request(
            f"{self.server.url}/api/v1/devices/{device_id}/reports", data=body, method="POST",
            headers={"Authorization": f"Bearer {config.token()}",
                     "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 202


@pytest.fixture
def fleet(server: RunningServer) -> ReportingDevices:
    return ReportingDevices(server)


def deploy(server: RunningServer, release: str, *args: str) -> dict:
    result = server.cli("deploy", release, "--tag", "fleet=lab", "--json", *args)
    assert result.code == 0, result.err
    return json.loads(result.out)


def status(server: RunningServer, deployment_id: int) -> dict:
    result = server.cli("rollout", "status", str(deployment_id), "--json")
    assert result.code == 0, result.err
    return json.loads(result.out)


def phase_map(detail: dict) -> dict[str, int]:
    return {a["device_id"]: a["phase"] for p in detail["phase_detail"] for a in p["devices"]}


def states(detail: dict) -> dict[str, str]:
    return {a["device_id"]: a["state"] for p in detail["phase_detail"] for a in p["devices"]}


def director_path(server: RunningServer, device_id: str) -> list[str]:
    return sorted(server.ctx.director.current_targets(device_id).signed.targets)


def test_phases_are_cumulative_shares_that_round_up() -> None:
    assert [phase_of_ranks(20, [10, 25, 50, 100]).count(k) for k in range(4)] == [2, 3, 5, 10]
    assert phase_of_ranks(20, [1, 100]).count(0) == 1  # a 1 % canary is one device, not none
    assert phase_of_ranks(3, [50, 100]) == [0, 0, 1]
    ids = [f"pi-{i}" for i in range(50)]
    assert rank_devices(7, ids) == rank_devices(7, list(reversed(ids)))  # order-independent
    assert rank_devices(7, ids) != rank_devices(8, ids)  # another deployment, another canary


@pytest.mark.parametrize(("phases", "why"), [
    ("10,50", "must end at 100"), ("50,10,100", "strictly increase"), ("0,100", "between 1"),
    ("a,100", "not a list of percentages"),
])
def test_bad_phases_are_refused_with_the_reason(server: RunningServer, fleet: ReportingDevices,
                                                phases: str, why: str) -> None:
    fleet.enroll(2)
    assert server.publish("digits_v1", "1.0.0").code == 0
    result = server.cli("deploy", "digits@1.0.0", "--tag", "fleet=lab", "--phases", phases)
    assert result.code != 0
    assert why in result.err
    with server.ctx.sessions() as session:
        assert session.query(Deployment).count() == 0


def test_a_four_phase_rollout_advances_on_success_and_keeps_its_phases_across_a_restart(
        server: RunningServer, fleet: ReportingDevices) -> None:
    ids = fleet.enroll(20)
    assert server.publish("digits_v1", "1.0.0").code == 0
    created = deploy(server, "digits@1.0.0", "--phases", PHASES, "--min-success-ratio", "1")
    deployment_id = created["deployment_id"]
    assert sorted(created["scheduled"]) == ids
    first = created["assigned"]
    assert len(first) == 2 and all(created["scheduled"][d] == 0 for d in first)
    before = phase_map(status(server, deployment_id))
    # Only the first phase is in the director; the rest wait.
    for device_id in ids:
        assert bool(director_path(server, device_id)) == (device_id in first)

    server.restart()
    detail = status(server, deployment_id)
    assert phase_map(detail) == before  # the same devices in each phase after a restart
    assert rollouts.advance(server.ctx) == []  # nobody installed yet: no advance

    for phase in range(4):
        members = [d for d, p in before.items() if p == phase]
        assert all(states(status(server, deployment_id))[d] == "pending" for d in members)
        for device_id in members[:-1]:
            fleet.report(device_id, "downloading", "digits@1.0.0")
            fleet.report(device_id, "committed", "digits@1.0.0")
        assert rollouts.advance(server.ctx) == []  # one device of the phase still missing
        fleet.report(members[-1], "committed", "digits@1.0.0")
        changes = rollouts.advance(server.ctx)
        expected = (f"deployment {deployment_id} phase {phase + 1}" if phase < 3
                    else f"deployment {deployment_id} completed")
        assert changes == [expected]
    detail = status(server, deployment_id)
    assert detail["status"] == "completed"
    assert set(states(detail).values()) == {"installed"}
    kinds = [(e["kind"], e["detail"].get("phase")) for e in detail["events"]]
    assert kinds == [("created", None), ("phase_started", 0), ("phase_started", 1),
                     ("phase_started", 2), ("phase_started", 3), ("completed", None)]
    assert server.cli("audit", "verify").code == 0


def test_failures_pause_at_the_threshold_and_resume_accepts_them(
        server: RunningServer, fleet: ReportingDevices) -> None:
    fleet.enroll(10)
    assert server.publish("digits_v1", "1.0.0").code == 0
    created = deploy(server, "digits@1.0.0", "--phases", "40,100", "--max-failure-ratio",
                     "0.25", "--min-success-ratio", "0.5")
    deployment_id = created["deployment_id"]
    first = created["assigned"]
    assert len(first) == 4
    fleet.report(first[0], "failed", "digits@1.0.0", "HashMismatch")
    assert rollouts.advance(server.ctx) == []  # 1/4 = 0.25 is not above 0.25
    fleet.report(first[1], "rolled_back", "digits@1.0.0", "latency_regression")
    assert rollouts.advance(server.ctx) == [f"deployment {deployment_id} paused by failures"]
    detail = status(server, deployment_id)
    assert detail["status"] == "paused"
    assert "failure ratio 2/4 = 0.50 exceeds 0.25" in detail["status_reason"]
    assert f"{first[0]} (HashMismatch)" in detail["status_reason"]
    assert f"{first[1]} (latency_regression)" in detail["status_reason"]
    # A paused deployment starts nothing: the second phase still waits.
    fleet.report(first[2], "committed", "digits@1.0.0")
    fleet.report(first[3], "committed", "digits@1.0.0")
    assert rollouts.advance(server.ctx) == []
    assert {s for d, s in states(status(server, deployment_id)).items()
            if d not in first} == {"waiting"}

    viewer = server.token(Role.VIEWER)
    request = urllib.request.Request(f"{server.url}/api/v1/deployments/{deployment_id}/resume",
                                     data=b"{}", method="POST",
                                     headers={"Authorization": f"Bearer {viewer}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403

    assert server.cli("rollout", "resume", str(deployment_id)).code == 0
    # The two failures are accepted by resuming: 2 of 4 installed = 0.5 is enough here.
    assert rollouts.advance(server.ctx) == [f"deployment {deployment_id} phase 1"]
    again = server.cli("rollout", "resume", str(deployment_id))
    assert again.code != 0 and "is active, not paused" in again.err


def test_cancel_leaves_waiting_devices_alone_and_rollback_restores_the_previous_release(
        server: RunningServer, fleet: ReportingDevices) -> None:
    ids = fleet.enroll(6)
    v1 = json.loads(server.publish("digits_v1", "1.0.0").out)["target_path"]
    deploy(server, "digits@1.0.0")
    for device_id in ids:
        fleet.report(device_id, "committed", "digits@1.0.0")
    assert server.publish("digits_v2", "2.0.0").code == 0
    created = deploy(server, "digits@2.0.0", "--phases", "50,100")
    deployment_id = created["deployment_id"]
    first = created["assigned"]
    waiting = sorted(set(ids) - set(first))
    fleet.report(first[0], "committed", "digits@2.0.0")

    rolled = json.loads(server.cli("rollout", "rollback", str(deployment_id), "--json").out)
    assert rolled["status"] == "cancelled"
    assert sorted(rolled["devices"]) == sorted(first)
    for device_id in first:
        assert director_path(server, device_id) == [v1]
    for device_id in waiting:
        assert director_path(server, device_id) == [v1]  # never moved
    detail = status(server, deployment_id)
    assert {states(detail)[d] for d in first} == {"rolled_back"}
    assert {states(detail)[d] for d in waiting} == {"waiting"}
    assert rollouts.advance(server.ctx) == []
    assert server.cli("rollout", "cancel", str(deployment_id)).code != 0

    created = deploy(server, "digits@2.0.0", "--phases", "50,100")
    assert server.cli("rollout", "cancel", str(created["deployment_id"])).code == 0
    for device_id in ids:
        assert (director_path(server, device_id) == [v1]) == \
            (device_id not in created["assigned"])
    assert rollouts.advance(server.ctx) == []


def test_rollback_respects_the_release_counter_floor(server: RunningServer,
                                                     fleet: ReportingDevices) -> None:
    a, b = fleet.enroll(2)
    assert server.publish("digits_v1", "1.0.0").code == 0
    deploy(server, "digits@1.0.0")
    fleet.report(a, "committed", "digits@1.0.0")
    fleet.report(b, "committed", "digits@1.0.0")
    assert server.publish("digits_v2", "2.0.0", "--bump-counter").code == 0
    deployment_id = deploy(server, "digits@2.0.0")["deployment_id"]
    fleet.report(a, "committed", "digits@2.0.0")  # a's floor is now 2; b has not installed
    rolled = json.loads(server.cli("rollout", "rollback", str(deployment_id), "--json").out)
    assert rolled["devices"] == [b]
    assert "floor forbids 1.0.0" in rolled["skipped"][a]
    text = server.cli("rollout", "status", str(deployment_id))
    assert text.code == 0 and "rolled_back" in text.out


def test_devices_enrolled_later_join_the_current_phase(server: RunningServer,
                                                       fleet: ReportingDevices) -> None:
    fleet.enroll(4)
    assert server.publish("digits_v1", "1.0.0").code == 0
    created = deploy(server, "digits@1.0.0", "--phases", "50,100")
    server.enroll("late-1", "rpi5", "fleet=lab")
    server.enroll("other-1", "rpi5", "fleet=elsewhere")
    assert rollouts.advance(server.ctx) == [f"deployment {created['deployment_id']}: 1 joined"]
    detail = status(server, created["deployment_id"])
    assert states(detail)["late-1"] == "pending" and phase_map(detail)["late-1"] == 0
    assert "other-1" not in states(detail)
    assert director_path(server, "late-1") != []


def test_a_newer_deployment_supersedes_the_older_and_says_so(server: RunningServer,
                                                             fleet: ReportingDevices) -> None:
    fleet.enroll(3)
    assert server.publish("digits_v1", "1.0.0").code == 0
    first = deploy(server, "digits@1.0.0", "--phases", "50,100")["deployment_id"]
    assert server.publish("digits_v2", "2.0.0").code == 0
    result = server.cli("deploy", "digits@2.0.0", "--tag", "fleet=lab")
    assert result.code == 0 and f"supersedes deployment(s) {first}" in result.out
    assert status(server, first)["status"] == "superseded"
    assert rollouts.advance(server.ctx) == []


def _telemetry(version: str, inferences: int, errors: int, p95: float) -> Telemetry:
    return Telemetry({"digits": ModelTelemetry(version=version, inferences=inferences,
                                               errors=errors, p50_ms=p95 / 2, p95_ms=p95,
                                               p99_ms=p95 * 1.2)})


def test_gates_compare_each_hardware_class_with_itself_and_roll_back_exactly_those_devices(
        server: RunningServer, fleet: ReportingDevices) -> None:
    pi4 = fleet.enroll(3, "rpi4", "pi4")
    pi5 = fleet.enroll(3, "rpi5", "pi5")
    v1 = json.loads(server.publish("digits_v1", "1.0.0").out)["target_path"]
    v2 = json.loads(server.publish("digits_v2", "2.0.0").out)["target_path"]
    deploy(server, "digits@1.0.0")
    sink = DeviceMessageSink(server.ctx.sessions, clock=server.ctx.clock, flush_interval=0)

    with sink:
        for device_id in pi4 + pi5:
            fleet.report(device_id, "committed", "digits@1.0.0")
            # pi5 is a slower chip: its own baseline is higher; that is not a regression.
            p95 = 2.0 if device_id in pi4 else 6.0
            sink.submit(device_id, DeviceTopic.TELEMETRY,
                        _telemetry("1.0.0", 100, 0, p95).to_bytes())
        sink.flush()
        deployment_id = deploy(server, "digits@2.0.0", "--soak", "1h", "--latency-factor",
                               "2", "--auto-rollback")["deployment_id"]
        for device_id in pi4 + pi5:
            fleet.report(device_id, "committed", "digits@2.0.0")
            p95 = 2.5 if device_id in pi4 else 30.0  # 2.0.0 is slow on rpi5 only
            sink.submit(device_id, DeviceTopic.TELEMETRY,
                        _telemetry("2.0.0", 100, 0, p95).to_bytes())
        sink.flush()

    with server.ctx.sessions() as session:
        versions = session.get(Device, pi5[0]).reported_state["versions"]["digits"]
        assert set(versions) == {"1.0.0", "2.0.0"}
    changes = rollouts.advance(server.ctx)
    assert changes == [f"deployment {deployment_id} paused by gate"]
    detail = status(server, deployment_id)
    reason = detail["status_reason"]
    assert reason.startswith("model-aware gate: latency_p95_ms on rpi5: 30 on 2.0.0 vs 6 "
                             "before (x5.00 > x2)")
    assert all(d in reason for d in pi5) and not any(d in reason for d in pi4)
    assert {d for d, s in states(detail).items() if s == "rolled_back"} == set(pi5)
    for device_id in pi5:
        assert director_path(server, device_id) == [v1]
    for device_id in pi4:
        assert director_path(server, device_id) == [v2]
    paused = next(e for e in detail["events"] if e["kind"] == "paused")
    assert paused["detail"]["gates"][0]["devices"] == pi5
    assert paused["detail"]["rolled_back"] == pi5


def test_a_batch_of_reports_moves_assignments_with_one_assignment_query(
        server: RunningServer, fleet: ReportingDevices) -> None:
    """The MQTT sink loads the assignments a batch's reports move in one query; the
    outcome is what one query per report gave, in order, within and across devices."""
    ids = fleet.enroll(4)
    assert server.publish("digits_v1", "1.0.0").code == 0
    deployment_id = deploy(server, "digits@1.0.0")["deployment_id"]
    batch = [
        (ids[0], fleet.signed(ids[0], "downloading", "digits@1.0.0")),
        (ids[0], fleet.signed(ids[0], "committed", "digits@1.0.0")),
        (ids[1], fleet.signed(ids[1], "failed", "digits@1.0.0", "validation")),
        (ids[1], fleet.signed(ids[1], "committed", "digits@1.0.0")),  # a retry that worked
        (ids[2], fleet.signed(ids[2], "downloading", "digits@1.0.0")),
        (ids[3], fleet.signed(ids[3], "committed", "digits@9.9.9")),  # no such assignment
    ]
    selects: list[str] = []

    def on_execute(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "assignments" in statement:
            selects.append(statement)

    event.listen(server.ctx.engine, "before_cursor_execute", on_execute)
    try:
        with DeviceMessageSink(server.ctx.sessions, clock=server.ctx.clock,
                               flush_interval=60.0, batch_size=len(batch)) as sink:
            for device_id, body in batch:
                sink.submit(device_id, DeviceTopic.STATUS, body)
            sink.flush()
            assert sink.counters().batches == 1
            assert sink.counters().accepted == len(batch)
    finally:
        event.remove(server.ctx.engine, "before_cursor_execute", on_execute)
    assert len(selects) == 1, selects
    assert states(status(server, deployment_id)) == {
        ids[0]: "installed", ids[1]: "installed", ids[2]: "downloading", ids[3]: "pending"}


def test_the_error_rate_gate_names_the_devices_and_resume_excuses_them(
        server: RunningServer, fleet: ReportingDevices) -> None:
    ids = fleet.enroll(4)
    assert server.publish("digits_v1", "1.0.0").code == 0
    assert server.publish("digits_v2", "2.0.0").code == 0
    deploy(server, "digits@1.0.0")
    with DeviceMessageSink(server.ctx.sessions, clock=server.ctx.clock) as sink:
        for device_id in ids:
            fleet.report(device_id, "committed", "digits@1.0.0")
            sink.submit(device_id, DeviceTopic.TELEMETRY,
                        _telemetry("1.0.0", 200, 1, 2.0).to_bytes())
        sink.flush()
        deployment_id = deploy(server, "digits@2.0.0", "--soak", "1h")["deployment_id"]
        for device_id in ids:
            fleet.report(device_id, "committed", "digits@2.0.0")
            errors = 40 if device_id == ids[0] else 0
            sink.submit(device_id, DeviceTopic.TELEMETRY,
                        _telemetry("2.0.0", 200, errors, 2.0).to_bytes())
        sink.flush()
    assert rollouts.advance(server.ctx) == [f"deployment {deployment_id} paused by gate"]
    reason = status(server, deployment_id)["status_reason"]
    assert "error_rate on rpi4" in reason and f"1 device(s): {ids[0]}" in reason
    assert server.cli("rollout", "resume", str(deployment_id)).code == 0
    assert rollouts.advance(server.ctx) == []  # accepted by the operator: no second pause
    assert status(server, deployment_id)["options"]["excused_devices"] == [ids[0]]


def test_telemetry_is_kept_per_version_and_bounded(server: RunningServer,
                                                   fleet: ReportingDevices) -> None:
    (device_id,) = fleet.enroll(1)
    with DeviceMessageSink(server.ctx.sessions, clock=server.ctx.clock) as sink:
        for major in range(1, 6):
            sink.submit(device_id, DeviceTopic.TELEMETRY,
                        _telemetry(f"{major}.0.0", major, 0, 1.0).to_bytes())
        sink.flush()
        fleet.report(device_id, "committed", "digits@5.0.0")  # a report keeps the history
    with server.ctx.sessions() as session:
        state = session.get(Device, device_id).reported_state
    kept = state["versions"]["digits"]
    assert list(kept) == ["3.0.0", "4.0.0", "5.0.0"][-MAX_VERSIONS_PER_MODEL:]
    assert kept["5.0.0"]["inferences"] == 5 and state["state"] == "committed"


def test_metrics_show_rollout_phases(server: RunningServer, fleet: ReportingDevices) -> None:
    fleet.enroll(4)
    assert server.publish("digits_v1", "1.0.0").code == 0
    deployment_id = deploy(server, "digits@1.0.0", "--phases", "50,100")["deployment_id"]
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("edgeota_rollout_phase", (("deployment", str(deployment_id)),
                                              ("release", "digits@1.0.0"),
                                              ("status", "active")))] == 1
    assert samples[("edgeota_rollout_devices", (("deployment", str(deployment_id)),
                                                ("state", "waiting")))] == 2
    assert samples[("edgeota_rollout_devices", (("deployment", str(deployment_id)),
                                                ("state", "pending")))] == 2


def test_rollout_commands_refuse_unknown_ids(server: RunningServer) -> None:
    for action in ("status", "pause", "resume", "cancel", "rollback"):
        result = server.cli("rollout", action, "999")
        assert result.code != 0 and "no deployment 999" in result.err


def test_an_outcome_stored_before_the_assignment_was_visible_is_caught_up(
        server: RunningServer, fleet: ReportingDevices) -> None:
    # A device is notified before the deploy commits; on PostgreSQL its (fast) failure
    # report may not see the assignment row. The report is in its history all the same.
    from sqlalchemy import select

    from edgeota.server.db.models import Assignment, AssignmentState

    devices = fleet.enroll(2)
    assert server.publish("digits_v1", "1.0.0").code == 0
    deployment_id = deploy(server, "digits@1.0.0", "--phases", "100",
                           "--max-failure-ratio", "1")["deployment_id"]
    fleet.report(devices[0], "failed", "digits@1.0.0", "WrongHardware")
    fleet.report(devices[1], "committed", "digits@1.0.0")
    with server.ctx.sessions() as session, session.begin():
        for assignment in session.scalars(select(Assignment).where(
                Assignment.deployment_id == deployment_id)):
            assignment.state = AssignmentState.PENDING  # as if no report had found it
            assignment.detail = None
    rollouts.advance(server.ctx)
    detail = status(server, deployment_id)
    assert states(detail) == {devices[0]: "failed", devices[1]: "installed"}
    failed = {a["device_id"]: a["detail"] for p in detail["phase_detail"] for a in p["devices"]}
    assert failed[devices[0]] == "WrongHardware"
