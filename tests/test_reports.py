"""Signed status reports: accepted in order from their device; forged, replayed and
wrong-device reports rejected, audited, and without effect. SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from edgeota.protocol.identity import DeviceIdentity
from edgeota.protocol.reports import MalformedReportError, SignedReport, StatusReport
from edgeota.server import audit
from edgeota.server.db.models import AuditEntry, Device, StatusEvent
from edgeota.server.services.reports import (
    SEQ_WINDOW,
    ReportRejection,
    check_seq,
    ingest_report,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


@pytest.fixture
def devices(db_session: Session) -> dict[str, DeviceIdentity]:
    identities = {name: DeviceIdentity.generate(name) for name in ("pi-a", "pi-b")}
    for name, identity in identities.items():
        db_session.add(Device(id=name, hardware="rpi4", tags={},
                              identity=identity.public().to_dict()))
    db_session.commit()
    return identities


def report(device: str, seq: int, state: str = "downloading") -> StatusReport:
    return StatusReport(device_id=device, seq=seq, state=state, release="digits@2.0.0",
                        progress=0.5)


def ingest(session: Session, sender: str, raw: bytes):
    outcome = ingest_report(session, sender, raw, clock=lambda: NOW)
    session.commit()
    return outcome


def last_audit(session: Session) -> AuditEntry:
    return session.scalars(select(AuditEntry).order_by(AuditEntry.id.desc())).first()


def test_reports_in_order_are_stored(db_session: Session, devices: dict) -> None:
    for seq, state in ((1, "downloading"), (2, "verifying"), (5, "committed")):
        raw = SignedReport.sign(report("pi-a", seq, state), devices["pi-a"]).to_bytes()
        assert ingest(db_session, "pi-a", raw).accepted
    device = db_session.get(Device, "pi-a")
    assert device.report_seq == 5
    assert device.reported_state["state"] == "committed"
    assert device.last_seen == NOW
    assert db_session.scalars(select(StatusEvent.seq)).all() == [1, 2, 5]


@pytest.mark.parametrize("attack", ["forged", "tampered", "replayed", "older", "wrong-device",
                                    "unknown", "malformed"])
def test_attacks_are_rejected_audited_and_change_nothing(
    db_session: Session, devices: dict, attack: str
) -> None:
    first = SignedReport.sign(report("pi-a", 1), devices["pi-a"])
    assert ingest(db_session, "pi-a", first.to_bytes()).accepted
    good = SignedReport.sign(report("pi-a", 3), devices["pi-a"])
    assert ingest(db_session, "pi-a", good.to_bytes()).accepted
    before = dict(db_session.get(Device, "pi-a").reported_state)
    sender, expected = "pi-a", None
    if attack == "forged":  # pi-b's key signs a report claiming to be pi-a
        body = report("pi-a", 4).to_bytes()
        raw = SignedReport(body, devices["pi-b"].sign_report(body)).to_bytes()
        expected = ReportRejection.BAD_SIGNATURE
    elif attack == "tampered":
        signed = SignedReport.sign(report("pi-a", 4), devices["pi-a"])
        raw = SignedReport(signed.report_bytes.replace(b"downloading", b"committed__"),
                           signed.signature).to_bytes()
        expected = ReportRejection.BAD_SIGNATURE
    elif attack == "replayed":
        raw = good.to_bytes()
        expected = ReportRejection.REPLAYED
    elif attack == "older":  # an accepted report again, after a newer one
        raw = first.to_bytes()
        expected = ReportRejection.REPLAYED
    elif attack == "wrong-device":  # pi-a's genuine report published on pi-b's topic
        raw = SignedReport.sign(report("pi-a", 4), devices["pi-a"]).to_bytes()
        sender, expected = "pi-b", ReportRejection.WRONG_DEVICE
    elif attack == "unknown":
        stranger = DeviceIdentity.generate("pi-z")
        raw = SignedReport.sign(report("pi-z", 1), stranger).to_bytes()
        sender, expected = "pi-z", ReportRejection.UNKNOWN_DEVICE
    else:
        raw, expected = b'{"v": 1, "report": "!!", "sig": ""}', ReportRejection.MALFORMED
    outcome = ingest(db_session, sender, raw)
    assert not outcome.accepted
    assert outcome.reason is expected
    entry = last_audit(db_session)
    assert entry.action == "report.rejected" and str(expected) in entry.detail
    assert db_session.get(Device, "pi-a").reported_state == before
    assert db_session.get(Device, "pi-a").report_seq == 3
    assert audit.verify(db_session).ok


def test_a_late_report_is_taken_once_into_history_without_undoing_the_newer_state(
    db_session: Session, devices: dict
) -> None:
    # Two replicas (or MQTT and HTTP) stored seq 3 before seq 2: 2 is late, not a replay.
    newer = SignedReport.sign(report("pi-a", 3, "committed"), devices["pi-a"]).to_bytes()
    late = SignedReport.sign(report("pi-a", 2, "verifying"), devices["pi-a"]).to_bytes()
    assert ingest(db_session, "pi-a", newer).accepted
    outcome = ingest(db_session, "pi-a", late)
    assert outcome.accepted and outcome.reason is None
    device = db_session.get(Device, "pi-a")
    assert (device.report_seq, device.reported_state["state"]) == (3, "committed")
    assert sorted(db_session.scalars(select(StatusEvent.seq)).all()) == [2, 3]
    again = ingest(db_session, "pi-a", late)  # a copy of the late one is a replay
    assert again.reason is ReportRejection.REPLAYED
    assert last_audit(db_session).action == "report.rejected"


def test_the_sequence_window_accepts_each_number_once_and_nothing_too_old() -> None:
    state = check_seq(0, 0, 5)
    assert (state.fresh, state.last, state.window) == (True, 5, 0)
    seen = {5}
    for seq in (9, 7, 6, 8, 9, 5, 4, 3, 8, 9 + SEQ_WINDOW, 9, 10):
        verdict = check_seq(state.last, state.window, seq)
        expected = seq not in seen and seq > max(seen) - SEQ_WINDOW - 1 and seq > 0
        assert verdict.accepted == expected, (seq, seen)
        if verdict.accepted:
            seen.add(seq)
            state = verdict
    assert state.last == 9 + SEQ_WINDOW
    assert not check_seq(state.last, state.window, 0).accepted
    assert not check_seq(state.last, state.window, -1).accepted
    far = check_seq(state.last, state.window, state.last + SEQ_WINDOW + 5)
    assert far.fresh and far.window == 0  # every earlier number is now out of the window


def test_envelope_bounds() -> None:
    with pytest.raises(MalformedReportError):
        SignedReport.from_bytes(b"x" * 20_000)
    with pytest.raises(MalformedReportError):
        StatusReport.from_bytes(b'{"device_id": "pi-a"}')
    with pytest.raises(ValueError, match="own reports"):
        SignedReport.sign(report("pi-b", 1), DeviceIdentity.generate("pi-a"))
