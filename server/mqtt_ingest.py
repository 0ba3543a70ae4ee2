"""Device messages from MQTT into the database: status reports, presence, telemetry, in batches.

:class:`DeviceMessageSink` is the ``on_device_message`` handler of
:class:`edgeota.server.mqtt_bridge.FetchBridge`. :meth:`~DeviceMessageSink.submit`
only puts the message on a bounded queue (a full queue drops and counts, it
never blocks the caller); one worker thread takes up to ``batch_size``
messages, or whatever arrived within ``flush_interval`` seconds of the first,
and writes them in **one transaction**, so a fleet reporting at once costs one
commit per batch, not per message. Within a batch the messages of one device
keep their order.

What each topic does (the device id comes from the topic, which the broker's
ACL ties to the sender's certificate):

* ``status`` -- a signed report (:mod:`edgeota.protocol.reports`), checked and
  stored by :func:`edgeota.server.services.reports.ingest_report`, which also
  audits every rejection (and keeps the telemetry already in
  ``Device.reported_state``). A report too large to be read whole (refused
  by the bridge above its payload bound, or by the embedded broker above its
  packet bound) reaches :meth:`~DeviceMessageSink.oversize` as its size only
  and is audited as rejected, ``too_large``. One addition here: a *redelivery* of the
  report last accepted (same sequence number, valid signature: a QoS 1
  duplicate, or the retained report a broker replays when the server
  subscribes again) is counted as a duplicate instead of being audited as a
  replay attack after every restart.
* ``online`` -- presence, ``{"v": 1, "online": true|false}`` (the agent's last
  will publishes ``{"v": 1, "online": false}``, retained): sets
  ``Device.online`` and ``Device.last_seen``. A presence the broker replays
  from its retained store when the bridge subscribes again (handed to
  :meth:`~DeviceMessageSink.retained`) sets ``Device.online`` only: the
  device was not seen now, so ``last_seen`` keeps the time it really was.
* ``telemetry`` -- model metrics (:class:`Telemetry`)::

      {"v": 1, "models": {"digits": {"version": "2.0.0", "inferences": 1200,
                                     "errors": 3, "p50_ms": 4.1, "p95_ms": 9.8,
                                     "p99_ms": 15.0}}}

  Exactly these keys; counters are non-negative integers, percentiles
  non-negative finite numbers of milliseconds or ``null`` (no inference yet);
  at most :data:`MAX_TELEMETRY_MODELS` models named like releases
  (:data:`edgeota.protocol.manifest.NAME_PATTERN`), the whole message at most
  :data:`MAX_TELEMETRY_SIZE` bytes. The latest one replaces the previous in
  ``Device.reported_state["telemetry"]`` (``{"v": 1, "received_at": ISO-8601,
  "models": {...}}``, rebuilt from the parsed values, so its size is bounded
  too) and ``Device.last_seen`` is updated. The last figures of each recent
  version also go to ``Device.reported_state["versions"][model][version]``:
  the rollout gates compare a device on a new release with itself on the
  previous one.

Per-message problems are logged at debug level only (a device could flood
the log); :meth:`DeviceMessageSink.counters` shows them. For the same reason
the audit log takes at most :data:`AUDIT_BURST` rejected reports of one
device at once and :data:`AUDIT_RATE` a second after that; the others are
counted (``unaudited``) and a warning says so, at most once a minute. An empty payload (a
retained message being cleared) is ignored. A payload
that does not parse, or comes from a device that is not enrolled, is counted
as rejected and changes nothing. If a batch's transaction fails, it is rolled
back and its messages are written again one transaction each, so a bad message
costs only itself; a message whose own transaction fails is counted as failed
and lost (a retained status is replayed when the bridge next subscribes).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgeota.protocol.errors import EdgeotaError, ProtocolError
from edgeota.protocol.identity import DevicePublicIdentity, verify_report
from edgeota.protocol.reports import MAX_REPORT_SIZE, SignedReport
from edgeota.protocol.telemetry import (
    MAX_TELEMETRY_MODELS,
    MAX_TELEMETRY_SIZE,
    MalformedMessageError,
    ModelTelemetry,
    Telemetry,
    parse_presence,
)
from edgeota.protocol.topics import DeviceTopic
from edgeota.server.db.models import Device
from edgeota.server.ratelimit import RateLimiter, RepeatLog
from edgeota.server.services.reports import ReportRejection, ingest_report, reject_report
from edgeota.server.services.rollouts import ReportableAssignments, reportable_assignments

__all__ = [
    "AUDIT_BURST",
    "AUDIT_RATE",
    "MAX_TELEMETRY_MODELS",
    "MAX_TELEMETRY_SIZE",
    "DeviceMessageSink",
    "IngestError",
    "MalformedMessageError",
    "ModelTelemetry",
    "SinkCounters",
    "Telemetry",
    "parse_presence",
]

logger = logging.getLogger(__name__)

class IngestError(EdgeotaError):
    """The sink was used out of order (not started) or did not finish in time."""


@dataclass(frozen=True)
class SinkCounters:
    """A snapshot of what the sink did with the messages it was given."""

    received: int = 0  # queued by submit()
    accepted: int = 0  # committed with an effect on the device
    rejected: int = 0  # refused: malformed, unknown device, bad signature, replay (no effect)
    malformed: int = 0  # the part of ``rejected`` whose payload did not parse
    oversize: int = 0  # the part of ``rejected`` refused for its size (never read whole)
    unaudited: int = 0  # rejected reports past their device's audit budget (counted only)
    duplicates: int = 0  # a redelivery of the last accepted report (no effect, not audited)
    ignored: int = 0  # empty payloads: a retained message being cleared
    dropped: int = 0  # never processed: queue full, unknown topic kind, sink not running
    failed: int = 0  # lost because their own transaction failed
    batches: int = 0  # transactions committed


class _Outcome(enum.Enum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    MALFORMED = "malformed"
    OVERSIZE = "oversize"
    DUPLICATE = "duplicates"
    IGNORED = "ignored"


@dataclass(frozen=True)
class _Message:
    device_id: str
    kind: DeviceTopic
    payload: bytes
    retained: bool = False  # replayed by the broker, not sent by the device now
    oversize: int | None = None  # refused for this size: ``payload`` is empty


@dataclass(frozen=True)
class _Marker:
    """Commit what came before me, then tell the waiter (and stop the worker if ``stop``)."""

    done: threading.Event
    stop: bool = False


_HANDLED = (DeviceTopic.STATUS, DeviceTopic.TELEMETRY, DeviceTopic.ONLINE)
MAX_VERSIONS_PER_MODEL = 3
# Rejected reports of one device audited: a burst, then one every 6 s (a
# device that keeps sending bad reports leaves 14 400 entries a day, not millions).
AUDIT_BURST = 20
AUDIT_RATE = 1 / 6  # per second


class DeviceMessageSink:
    """Write device messages to the database in batches, on a thread of its own.

    ``sessions`` makes the sessions (one per batch); ``clock`` gives the
    aware UTC time stored as ``last_seen`` and report receipt time;
    ``batch_size`` caps the messages per transaction and ``flush_interval``
    (seconds) how long the first message of a batch waits for company;
    ``max_queue`` bounds the messages waiting (beyond it :meth:`submit`
    drops and counts).
    """

    def __init__(
        self,
        sessions: Callable[[], Session],
        *,
        clock: Callable[[], datetime],
        batch_size: int = 100,
        flush_interval: float = 0.5,  # seconds
        max_queue: int = 10_000,
    ) -> None:
        if batch_size < 1 or max_queue < 1:
            raise ValueError("batch_size and max_queue must be positive")
        if flush_interval < 0:
            raise ValueError("flush_interval must not be negative")
        self._sessions = sessions
        self._clock = clock
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._queue: queue.Queue[_Message | _Marker] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {f.name: 0 for f in dataclasses.fields(SinkCounters)}
        self._thread: threading.Thread | None = None
        self._running = False
        self._audit_budget = RateLimiter(AUDIT_RATE, AUDIT_BURST)
        self._repeats = RepeatLog(logger)

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> DeviceMessageSink:
        """Start the worker thread; returns at once."""
        if self._thread is not None:
            raise RuntimeError("sink already started")
        self._thread = threading.Thread(target=self._run, name="device-message-sink",
                                        daemon=True)
        self._running = True
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Commit everything submitted so far, then end the worker.

        Raises:
            IngestError: the worker did not finish within ``timeout`` seconds.
        """
        thread = self._thread
        if thread is None:
            return
        self._running = False  # submit() drops from now on
        marker = _Marker(threading.Event(), stop=True)
        try:
            self._queue.put(marker, timeout=timeout)
        except queue.Full as e:
            raise IngestError(f"sink queue still full after {timeout}s") from e
        thread.join(timeout)
        if thread.is_alive():
            raise IngestError(f"sink worker still busy after {timeout}s")
        self._thread = None

    def __enter__(self) -> DeviceMessageSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def flush(self, timeout: float = 10.0) -> None:
        """Return once every message submitted before this call is committed (or counted lost).

        Raises:
            IngestError: the sink is not running, or did not get there within ``timeout``.
        """
        if self._thread is None or not self._running:
            raise IngestError("the sink is not running")
        deadline = time.monotonic() + timeout
        marker = _Marker(threading.Event())
        try:
            self._queue.put(marker, timeout=timeout)
        except queue.Full as e:
            raise IngestError(f"sink queue still full after {timeout}s") from e
        if not marker.done.wait(max(0.0, deadline - time.monotonic())):
            raise IngestError(f"sink did not flush within {timeout}s")

    def counters(self) -> SinkCounters:
        with self._lock:
            return SinkCounters(**self._counts)

    # -- the producer side (any thread, never blocks) -------------------------

    def submit(self, device_id: str, kind: DeviceTopic, payload: bytes, *,
               retained: bool = False) -> None:
        """Queue one message from ``device_id`` (the topic's device) for the next batch.

        ``retained``: the broker replayed it from its retained store (a
        subscription was just made), so it says nothing about when the device
        was last seen.
        """
        if kind not in _HANDLED or not self._running:
            self._bump("dropped")
            return
        try:
            self._queue.put_nowait(_Message(device_id, kind, bytes(payload), retained))
        except queue.Full:
            self._bump("dropped")
            logger.debug("device message queue full: dropped %s from %s", kind, device_id)
            return
        self._bump("received")

    __call__ = submit

    def retained(self, device_id: str, kind: DeviceTopic, payload: bytes) -> None:
        """Queue a message the broker replayed from its retained store (the bridge's hook)."""
        self.submit(device_id, kind, payload, retained=True)

    def oversize(self, device_id: str, kind: DeviceTopic, size: int) -> None:
        """Note a message refused for its ``size`` before it was read (the bridge's hook).

        Only the size travels, never the payload: a status report is audited
        as rejected (``too_large``), like one that does not parse; telemetry
        and presence are only counted.
        """
        if kind not in _HANDLED or not self._running:
            self._bump("dropped")
            return
        try:
            self._queue.put_nowait(_Message(device_id, kind, b"", oversize=size))
        except queue.Full:
            self._bump("dropped")
            return
        self._bump("received")

    # -- the worker -----------------------------------------------------------

    def _bump(self, name: str, by: int = 1) -> None:
        with self._lock:
            self._counts[name] += by

    def _run(self) -> None:
        pending: list[_Message] = []
        deadline = 0.0
        while True:
            try:
                if pending:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                else:
                    item = self._queue.get()
            except queue.Empty:  # the first message of the batch has waited long enough
                self._write(pending)
                pending = []
                continue
            if isinstance(item, _Message):
                if not pending:
                    deadline = time.monotonic() + self._flush_interval
                pending.append(item)
                if len(pending) >= self._batch_size:
                    self._write(pending)
                    pending = []
                continue
            if pending:
                self._write(pending)
                pending = []
            item.done.set()
            if item.stop:
                return

    def _write(self, batch: list[_Message]) -> None:
        """Apply ``batch`` in one transaction; on failure, retry each message alone."""
        # Stable sort: a device's messages keep their order, and transactions of
        # several replicas lock device rows in the same order (fewer deadlocks).
        ordered = sorted(batch, key=lambda m: m.device_id)
        try:
            # One query locks and loads every device of the batch; without
            # autoflush, the batch's changes go out in one flush at the commit
            # instead of before each query (the audit log flushes its own
            # entries, and record_report's query reads no row of this batch that
            # only exists in memory). Per report this was three round trips and
            # a flush: the largest share of the server's CPU in a fleet rollout.
            with self._sessions() as session, session.begin(), session.no_autoflush:
                _lock_devices(session, {m.device_id for m in ordered})
                # Each status report is parsed once here; the assignments the
                # batch's reports move are loaded in one more query.
                reports = [_parse_report(m) for m in ordered]
                assignments = reportable_assignments(session, _report_keys(ordered, reports))
                outcomes = [self._apply(session, message, report, assignments)
                            for message, report in zip(ordered, reports, strict=True)]
        except Exception:
            # Logged, never swallowed silently: the messages are retried one by
            # one below, and a message that fails alone is counted as failed.
            if len(ordered) == 1:
                logger.exception("could not store %s from %s", ordered[0].kind,
                                 ordered[0].device_id)
                self._bump("failed")
                return
            logger.exception("a batch of %d device messages failed; retrying one by one",
                             len(ordered))
            for message in ordered:
                self._write([message])
            return
        with self._lock:
            self._counts["batches"] += 1
            for outcome in outcomes:
                self._counts[outcome.value] += 1
                if outcome in (_Outcome.MALFORMED, _Outcome.OVERSIZE):
                    self._counts["rejected"] += 1

    def _apply(self, session: Session, message: _Message, report: SignedReport | None,
               assignments: ReportableAssignments) -> _Outcome:
        if message.oversize is not None:
            if message.kind is DeviceTopic.STATUS:
                reject_report(session, message.device_id, ReportRejection.TOO_LARGE,
                              f"a {message.oversize}-byte report (at most {MAX_REPORT_SIZE})",
                              may_audit=self._may_audit(message.device_id))
            return _Outcome.OVERSIZE
        if not message.payload:
            return _Outcome.IGNORED
        if message.kind is DeviceTopic.STATUS:
            return self._status(session, message, report, assignments)
        if message.kind is DeviceTopic.ONLINE:
            return self._presence(session, message)
        return self._telemetry(session, message)

    def _status(self, session: Session, message: _Message, report: SignedReport | None,
                assignments: ReportableAssignments) -> _Outcome:
        device = session.get(Device, message.device_id)  # locked by _write
        if device is not None and report is not None and _is_redelivery(device, report):
            return _Outcome.DUPLICATE
        outcome = ingest_report(session, message.device_id, message.payload, clock=self._clock,
                                device_locked=True, parsed=report, assignments=assignments,
                                may_audit=self._may_audit(message.device_id))
        if not outcome.accepted:
            if outcome.reason is ReportRejection.MALFORMED:
                return _Outcome.MALFORMED
            return _Outcome.REJECTED
        return _Outcome.ACCEPTED

    def _may_audit(self, device_id: str) -> Callable[[], bool]:
        """The question ``ingest_report`` asks before auditing a rejection of ``device_id``."""

        def ask() -> bool:
            if self._audit_budget.allow(device_id):
                return True
            self._bump("unaudited")
            self._repeats.log(("unaudited", device_id), "rejected reports of %s beyond its "
                              "audit budget: counted, not audited", device_id)
            return False

        return ask

    def _presence(self, session: Session, message: _Message) -> _Outcome:
        try:
            online = parse_presence(message.payload)
        except MalformedMessageError as e:
            logger.debug("malformed presence from %s: %s", message.device_id, e)
            return _Outcome.MALFORMED
        device = session.get(Device, message.device_id)
        if device is None:
            return _Outcome.REJECTED
        device.online = online
        if not message.retained:  # a replay is the device's last word, not a sighting
            device.last_seen = self._clock()
        return _Outcome.ACCEPTED

    def _telemetry(self, session: Session, message: _Message) -> _Outcome:
        try:
            telemetry = Telemetry.from_bytes(message.payload)
        except MalformedMessageError as e:
            logger.debug("malformed telemetry from %s: %s", message.device_id, e)
            return _Outcome.MALFORMED
        device = session.get(Device, message.device_id)
        if device is None:
            return _Outcome.REJECTED
        now = self._clock()
        state = dict(device.reported_state or {})
        state["telemetry"] = telemetry.to_json(received_at=now)
        state["versions"] = _versions_with(state.get("versions"), telemetry, now)
        device.reported_state = state  # reassigned, never mutated: the JSON column sees it
        device.last_seen = now
        return _Outcome.ACCEPTED


def _parse_report(message: _Message) -> SignedReport | None:
    """The signed report a status message carries, unverified; ``None`` if it has none.

    ``None`` for a payload that does not parse too: ``ingest_report`` parses it
    again to refuse and audit it with the reason.
    """
    if message.kind is not DeviceTopic.STATUS or not message.payload:
        return None
    try:
        signed = SignedReport.from_bytes(message.payload)
        signed.report  # noqa: B018 - parsed (and kept) now: a malformed report is None
    except ProtocolError:
        return None
    return signed


def _report_keys(messages: list[_Message],
                 reports: list[SignedReport | None]) -> set[tuple[str, str, str]]:
    """(device, model, version) of the parsed ``reports`` of ``messages``, unverified.

    Only to choose which assignments to load: each report is verified before
    it moves anything.
    """
    keys = set()
    for message, signed in zip(messages, reports, strict=True):
        release = signed.report.release if signed is not None else None
        if release and "@" in release:
            name, _, version = release.partition("@")
            keys.add((message.device_id, name, version))
    return keys


def _lock_devices(session: Session, device_ids: set[str]) -> None:
    """Load the rows of ``device_ids`` into ``session``, locked ``FOR UPDATE`` in id order.

    Id order, as every batch takes them: replicas writing overlapping batches
    wait for each other instead of deadlocking. At most one batch of ids.
    """
    if device_ids:
        session.scalars(select(Device).where(Device.id.in_(sorted(device_ids)))
                        .order_by(Device.id).with_for_update()).all()


def _versions_with(previous: object, telemetry: Telemetry,
                   now: datetime) -> dict[str, dict[str, dict[str, object]]]:
    """The latest metrics per model *and version*: what the rollout gates compare.

    A device's telemetry names only the version it serves now; the gates need
    the same device's figures on the release it ran before, so the last
    message of each recent version is kept (at most
    :data:`MAX_VERSIONS_PER_MODEL` per model, newest kept; at most
    :data:`MAX_TELEMETRY_MODELS` models), bounded like the telemetry itself.
    """
    versions: dict[str, dict[str, dict[str, object]]] = {}
    if isinstance(previous, dict):
        for name, entries in previous.items():
            if isinstance(name, str) and isinstance(entries, dict):
                versions[name] = {v: e for v, e in entries.items()
                                  if isinstance(v, str) and isinstance(e, dict)}
    for name, model in telemetry.models.items():
        entries = dict(versions.get(name, {}))
        entries.pop(model.version, None)  # re-inserted last: the newest
        entries[model.version] = {**model.to_json(), "received_at": now.isoformat()}
        versions[name] = dict(list(entries.items())[-MAX_VERSIONS_PER_MODEL:])
    return dict(list(versions.items())[-MAX_TELEMETRY_MODELS:])


def _is_redelivery(device: Device, signed: SignedReport) -> bool:
    """Whether ``signed`` is the report last accepted from ``device``, delivered again.

    Same sequence number and a valid signature by the device: authentic, and
    already stored (an agent never signs two reports with one number). Storing
    it again would change nothing; refusing it through ``ingest_report`` would
    audit a "replay" each time a broker redelivers or replays the retained report.
    """
    if device.report_seq <= 0:
        return False
    try:
        report = signed.report
        if report.device_id != device.id or report.seq != device.report_seq:
            return False
        verify_report(DevicePublicIdentity.from_dict(device.identity), signed.report_bytes,
                      signed.signature)
    except ProtocolError:
        return False  # not a redelivery: ingest_report rejects and audits it
    return True
