"""Accepting device status reports: verified, each once, from the device that sent them.

Called by the MQTT bridge for every message on ``devices/{id}/status`` (the
topic names the sender: the broker ACL lets only that device's certificate
publish there) and usable from HTTP alike. A rejected report changes nothing
about the device and is recorded in the audit log with the reason, so a
forging or replaying client leaves a trace.

Replays are refused with a sliding window (as IPsec's anti-replay window,
RFC 4303 3.4.3) rather than "above the last accepted": server replicas
sharing the MQTT subscription, or MQTT and the HTTP fallback at once, can
store two reports of one device out of order. A report older than the
newest one accepted but within :data:`SEQ_WINDOW` and never seen is *late*:
it enters the device's history and moves its rollout assignment forward
only (it never undoes a newer outcome), and leaves the device's current
state to the newer report. A second copy of any accepted report, or one
older than the window, is a replay.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from edgeota.protocol.errors import ProtocolError
from edgeota.protocol.identity import DevicePublicIdentity, verify_report
from edgeota.protocol.reports import SignedReport, StatusReport
from edgeota.server import audit
from edgeota.server.db.models import Device, StatusEvent
from edgeota.server.services.rollouts import ReportableAssignments, record_report

__all__ = [
    "KEPT_ACROSS_REPORTS",
    "SEQ_WINDOW",
    "ReportOutcome",
    "ReportRejection",
    "SeqCheck",
    "check_seq",
    "ingest_report",
    "reject_report",
]

# What a status report leaves in Device.reported_state (it replaces the rest).
KEPT_ACROSS_REPORTS = ("telemetry", "versions")


SEQ_WINDOW = 62  # reports behind the newest that may still arrive late (fits a signed BIGINT)


@dataclass(frozen=True)
class SeqCheck:
    """The verdict on a report's sequence number, and the device's counters after it."""

    fresh: bool  # newer than every accepted report
    late: bool  # older, inside the window, not seen before
    last: int
    window: int

    @property
    def accepted(self) -> bool:
        return self.fresh or self.late


def check_seq(last: int, window: int, seq: int) -> SeqCheck:
    """Where ``seq`` stands against the newest accepted ``last`` and the ``window`` bits."""
    if seq > last:
        shift = seq - last
        moved = (window << shift) | (1 << (shift - 1)) if last > 0 else 0
        if shift > SEQ_WINDOW:
            moved = 0
        return SeqCheck(True, False, seq, moved & ((1 << SEQ_WINDOW) - 1))
    behind = last - 1 - seq
    if seq <= 0 or seq == last or behind >= SEQ_WINDOW or window & (1 << behind):
        return SeqCheck(False, False, last, window)
    return SeqCheck(False, True, last, window | (1 << behind))


class ReportRejection(enum.StrEnum):
    """Why a report was refused: the ``reason`` of its ``report.rejected`` audit entry."""

    MALFORMED = "malformed"  # does not parse, or breaks a bound (deep JSON, NaN, ...)
    TOO_LARGE = "too_large"  # over MAX_REPORT_SIZE: refused before it was read whole
    UNKNOWN_DEVICE = "unknown_device"
    WRONG_DEVICE = "wrong_device"
    BAD_SIGNATURE = "bad_signature"
    REPLAYED = "replayed"


@dataclass(frozen=True)
class ReportOutcome:
    accepted: bool
    reason: ReportRejection | None = None
    report: StatusReport | None = None


def reject_report(session: Session, sender: str, reason: ReportRejection, detail: str, *,
                  may_audit: Callable[[], bool] | None = None) -> ReportOutcome:
    """Audit a report from ``sender`` as rejected (``report.rejected``); nothing else changes.

    Also for refusals made before a report reaches :func:`ingest_report`:
    one too large to be read whole, by the MQTT bridge or the embedded
    broker. ``may_audit``, if given, is asked first (a per-device budget: a
    device sending rejected reports without end must not grow the audit
    log without end); ``False`` leaves the rejection to the caller's count.
    """
    if may_audit is None or may_audit():
        audit.append(session, actor=f"device:{sender}", action="report.rejected",
                     subject=sender, detail={"reason": str(reason), "detail": detail[:300]})
    return ReportOutcome(False, reason)


def ingest_report(
    session: Session,
    sender: str,
    raw: bytes,
    *,
    clock: Callable[[], datetime],
    device_locked: bool = False,
    parsed: SignedReport | None = None,
    assignments: ReportableAssignments | None = None,
    may_audit: Callable[[], bool] | None = None,
) -> ReportOutcome:
    """Verify and store one report that arrived from ``sender`` (the topic's device id).

    The sender's row is read ``FOR UPDATE`` (two replicas storing reports of
    one device serialise on it), unless the caller says it already holds that
    lock with the row in this session (``device_locked``): the MQTT sink locks
    a whole batch's devices in one query instead of one per report, and loads
    their ``assignments`` in one more (see :func:`record_report`). ``parsed``
    is ``raw`` already parsed by the caller (it is verified here all the same).
    ``may_audit`` is asked before a rejection is audited (see :func:`reject_report`).
    """

    def _reject(session: Session, sender: str, reason: ReportRejection,
                detail: str) -> ReportOutcome:
        return reject_report(session, sender, reason, detail, may_audit=may_audit)

    try:
        signed = parsed if parsed is not None else SignedReport.from_bytes(raw)
        report = signed.report
    except ProtocolError as e:
        return _reject(session, sender, ReportRejection.MALFORMED, str(e))
    if report.device_id != sender:
        return _reject(session, sender, ReportRejection.WRONG_DEVICE,
                       f"report names {report.device_id!r} but came from {sender!r}")
    device = session.get(Device, sender, with_for_update=not device_locked)
    if device is None:
        return _reject(session, sender, ReportRejection.UNKNOWN_DEVICE, "not enrolled")
    try:
        verify_report(DevicePublicIdentity.from_dict(device.identity), signed.report_bytes,
                      signed.signature)
    except ProtocolError as e:
        return _reject(session, sender, ReportRejection.BAD_SIGNATURE, str(e))
    seq = check_seq(device.report_seq, device.report_seq_window, report.seq)
    if not seq.accepted:
        return _reject(session, sender, ReportRejection.REPLAYED,
                       f"seq {report.seq} was accepted before or is older than the "
                       f"{SEQ_WINDOW} before the last accepted {device.report_seq}")
    now = clock()
    device.report_seq, device.report_seq_window = seq.last, seq.window
    device.last_seen = now
    if seq.late:
        session.add(_history(report, now))
        record_report(session, device, report, now, late=True, assignments=assignments)
        return ReportOutcome(True, None, report)
    previous = device.reported_state or {}
    # Telemetry arrives on its own channel and outlives any one report.
    kept = {key: previous[key] for key in KEPT_ACROSS_REPORTS if key in previous}
    device.reported_state = {"state": report.state, "release": report.release,
                             "progress": report.progress, "error": report.error,
                             "seq": report.seq, **kept}
    session.add(_history(report, now))
    record_report(session, device, report, now, assignments=assignments)
    return ReportOutcome(True, None, report)


def _history(report: StatusReport, now: datetime) -> StatusEvent:
    # The error travels with the event: the rollout engine reads outcomes back from here.
    detail = dict(report.detail)
    if report.error:
        detail["error"] = report.error
    return StatusEvent(device_id=report.device_id, received_at=now, seq=report.seq,
                       state=report.state, release=report.release, detail=detail)
