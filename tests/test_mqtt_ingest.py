"""The device message sink alone: batches, presence, telemetry, reports. SQLite and PostgreSQL.

Messages go in through ``submit`` exactly as the bridge's dispatcher hands
them over; ``flush`` is the synchronisation point (it returns once everything
submitted before it is committed). Transactions are counted with an SQLAlchemy
``commit`` listener on the engine, independently of the sink's own counters.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from server_support import wait_for
from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session, sessionmaker

from edgeota.protocol.identity import DeviceIdentity
from edgeota.protocol.reports import SignedReport, StatusReport
from edgeota.protocol.topics import DeviceTopic, Topics
from edgeota.server.db.models import AuditEntry, Device
from edgeota.server.db.session import make_session_factory
from edgeota.server.mqtt_bridge import FetchBridge
from edgeota.server.mqtt_ingest import (
    AUDIT_BURST,
    MAX_TELEMETRY_MODELS,
    MAX_TELEMETRY_SIZE,
    DeviceMessageSink,
    IngestError,
    MalformedMessageError,
    SinkCounters,
    Telemetry,
    parse_presence,
)
from edgeota.server.repo.storage import RepoStore

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
STATUS, TELEMETRY, ONLINE = DeviceTopic.STATUS, DeviceTopic.TELEMETRY, DeviceTopic.ONLINE


class Clock:
    """Advances one second per reading, so every write has its own instant."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture
def identities(db_session: Session) -> dict[str, DeviceIdentity]:
    identities = {name: DeviceIdentity.generate(name) for name in ("pi-a", "pi-b")}
    for name, identity in identities.items():
        db_session.add(Device(id=name, hardware="rpi4", tags={},
                              identity=identity.public().to_dict()))
    db_session.commit()
    return identities


@pytest.fixture
def sessions(db_engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(db_engine)


@pytest.fixture
def commits(db_engine: Engine) -> Iterator[list[int]]:
    """One entry per transaction committed on the engine while the test runs."""
    seen: list[int] = []

    def on_commit(_connection: object) -> None:
        seen.append(1)

    event.listen(db_engine, "commit", on_commit)
    yield seen
    event.remove(db_engine, "commit", on_commit)


@pytest.fixture
def make_sink(sessions: sessionmaker[Session]) -> Iterator[Any]:
    sinks: list[DeviceMessageSink] = []

    def make(**kw: Any) -> DeviceMessageSink:
        options: dict[str, Any] = {"clock": Clock(), "flush_interval": 60.0}
        options.update(kw)
        sink = DeviceMessageSink(sessions, **options).start()
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        sink.stop()


def device(sessions: sessionmaker[Session], name: str) -> Device:
    with sessions() as session:
        found = session.get(Device, name)
        assert found is not None
        return found


def presence(online: bool) -> bytes:
    return json.dumps({"v": 1, "online": online}).encode()


def model(version: str = "2.0.0", inferences: int = 10, **kw: Any) -> dict[str, Any]:
    return {"version": version, "inferences": inferences, "errors": 0, "p50_ms": 1.5,
            "p95_ms": 3.0, "p99_ms": None, **kw}


def telemetry(**models: dict[str, Any]) -> bytes:
    return json.dumps({"v": 1, "models": models}).encode()


def signed(identity: DeviceIdentity, seq: int, state: str = "downloading",
           signer: DeviceIdentity | None = None) -> bytes:
    body = StatusReport(identity.device_id, seq, state, release="digits@2.0.0").to_bytes()
    return SignedReport(body, (signer or identity).sign_report(body)).to_bytes()


def rejections(sessions: sessionmaker[Session]) -> list[tuple[str, str]]:
    with sessions() as session:
        rows = session.execute(select(AuditEntry.subject, AuditEntry.detail)
                               .where(AuditEntry.action == "report.rejected")
                               .order_by(AuditEntry.id))
        return [(subject, json.loads(detail)["reason"]) for subject, detail in rows]


# -- batching -----------------------------------------------------------------------------


def test_n_messages_commit_in_ceil_n_over_batch_transactions(
        make_sink, sessions, identities, commits: list[int]) -> None:
    sink = make_sink(batch_size=10)
    for i in range(25):
        sink.submit("pi-a" if i % 2 else "pi-b", ONLINE, presence(i % 3 == 0))
    sink.flush()
    assert len(commits) == math.ceil(25 / 10) == 3
    assert sink.counters() == SinkCounters(received=25, accepted=25, batches=3)
    # The last message of each device wins: i=24 (pi-b, online), i=23 (pi-a, offline).
    assert device(sessions, "pi-b").online is True
    assert device(sessions, "pi-a").online is False


def test_a_partial_batch_is_committed_after_the_flush_interval(
        make_sink, sessions, identities, commits: list[int]) -> None:
    sink = make_sink(batch_size=100, flush_interval=0.05)
    sink.submit("pi-a", ONLINE, presence(True))  # alone: only the interval can commit it
    wait_for(lambda: sink.counters().batches == 1, 5.0, "the time-triggered batch")
    assert len(commits) == 1 and sink.counters().accepted == 1
    assert device(sessions, "pi-a").online


def test_a_failing_batch_is_retried_message_by_message(
        make_sink, sessions: sessionmaker[Session], identities, commits: list[int]) -> None:
    def refuse_pi_b(session: Session, _context: object, _instances: object) -> None:
        if any(isinstance(o, Device) and o.id == "pi-b" for o in session.dirty):
            raise RuntimeError("simulated database failure for pi-b")

    event.listen(sessions, "before_flush", refuse_pi_b)
    try:
        sink = make_sink(batch_size=10)
        for name in ("pi-a", "pi-b", "pi-a"):
            sink.submit(name, ONLINE, presence(True))
        sink.flush()
    finally:
        event.remove(sessions, "before_flush", refuse_pi_b)
    counters = sink.counters()
    assert (counters.accepted, counters.failed, counters.batches) == (2, 1, 2)
    assert len(commits) == 2  # the failed batch committed nothing; then one per message
    assert device(sessions, "pi-a").online and not device(sessions, "pi-b").online


# -- presence -------------------------------------------------------------------------------


def test_online_and_offline_set_presence_and_last_seen(make_sink, sessions, identities) -> None:
    clock = Clock()
    sink = make_sink(clock=clock)
    sink.submit("pi-a", ONLINE, presence(True))
    sink.flush()
    first = device(sessions, "pi-a")
    assert first.online is True and first.last_seen == NOW + timedelta(seconds=1)
    sink.submit("pi-a", ONLINE, b'{"v":1,"online":false}')  # the agent's last will
    sink.flush()
    second = device(sessions, "pi-a")
    assert second.online is False and second.last_seen == NOW + timedelta(seconds=2)
    sink.submit("pi-a", ONLINE, b"")  # a retained presence being cleared
    sink.submit("pi-zz", ONLINE, presence(True))  # not enrolled
    sink.flush()
    assert device(sessions, "pi-a").online is False
    counters = sink.counters()
    assert (counters.accepted, counters.ignored, counters.rejected) == (2, 1, 1)
    with sessions() as session:
        assert session.get(Device, "pi-zz") is None


def test_a_replayed_retained_presence_sets_online_but_not_last_seen(
        make_sink, sessions, identities) -> None:
    sink = make_sink(clock=Clock())
    sink.retained("pi-a", ONLINE, presence(True))  # the broker's copy, on subscribing
    sink.flush()
    replayed = device(sessions, "pi-a")
    assert replayed.online is True and replayed.last_seen is None  # never actually seen
    sink.submit("pi-a", ONLINE, presence(True))  # the device, now
    sink.flush()
    seen = device(sessions, "pi-a").last_seen
    assert seen == NOW + timedelta(seconds=1)
    sink.retained("pi-a", ONLINE, presence(False))  # e.g. its last will, replayed later
    sink.flush()
    after = device(sessions, "pi-a")
    assert after.online is False and after.last_seen == seen
    assert sink.counters().accepted == 3


def test_the_bridge_resubscribing_replays_presence_without_moving_last_seen(
        make_sink, sessions, identities, mosquitto, tmp_path) -> None:
    """Through a real broker: the retain flag on delivery tells a replay from a live message."""
    sink = make_sink(clock=Clock(), flush_interval=0.0)
    store = RepoStore(tmp_path / "blobs")
    topic = Topics().device("pi-a", DeviceTopic.ONLINE)
    device_client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pi-a",
                                protocol=mqtt.MQTTv311)
    device_client.connect(mosquitto.host, mosquitto.port)
    device_client.loop_start()
    bridges: list[FetchBridge] = []

    def bridge() -> FetchBridge:
        started = FetchBridge(store, host=mosquitto.host, port=mosquitto.port,
                              client_id=f"server-{len(bridges)}", on_device_message=sink)
        bridges.append(started)
        started.start(timeout=10.0)
        return started

    def publish(payload: bytes) -> None:
        device_client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10.0)

    def handled(count: int) -> None:
        wait_for(lambda: sink.counters().received >= count, 10.0, f"{count} messages")
        sink.flush()

    try:
        publish(presence(True))  # retained before any server listens
        first = bridge()
        handled(1)  # replayed on subscribing
        assert device(sessions, "pi-a").online is True
        assert device(sessions, "pi-a").last_seen is None
        publish(presence(False))  # live: the bridge is subscribed
        handled(2)
        seen = device(sessions, "pi-a").last_seen
        assert seen is not None and device(sessions, "pi-a").online is False
        first.stop()
        bridge()  # subscribes again: the broker replays the retained "offline"
        handled(3)
        assert device(sessions, "pi-a").last_seen == seen
        assert sink.counters().accepted == 3
    finally:
        for started in bridges:
            with contextlib.suppress(Exception):
                started.stop()
        device_client.disconnect()
        device_client.loop_stop()


# -- telemetry ------------------------------------------------------------------------------


def test_latest_telemetry_is_stored_beside_the_reported_state(
        make_sink, sessions, identities) -> None:
    sink = make_sink()
    sink.submit("pi-a", TELEMETRY, telemetry(digits=model(inferences=10)))
    sink.flush()
    stored = device(sessions, "pi-a").reported_state
    received = (NOW + timedelta(seconds=1)).isoformat()
    assert stored == {
        "telemetry": {"v": 1, "received_at": received,
                      "models": {"digits": model(inferences=10)}},
        # The same figures per version: what the rollout gates compare.
        "versions": {"digits": {"2.0.0": {**model(inferences=10), "received_at": received}}},
    }
    # A signed report replaces the state but keeps the telemetry ...
    sink.submit("pi-a", STATUS, signed(identities["pi-a"], 1, "committed"))
    sink.flush()
    stored = device(sessions, "pi-a").reported_state
    assert stored["state"] == "committed"
    assert stored["telemetry"]["models"]["digits"]["inferences"] == 10
    # ... and newer telemetry replaces the old one and keeps the state.
    sink.submit("pi-a", TELEMETRY, telemetry(digits=model(inferences=99),
                                              faces=model("0.1.0", 1, p50_ms=None)))
    sink.flush()
    stored = device(sessions, "pi-a").reported_state
    assert stored["state"] == "committed"
    assert stored["telemetry"]["models"]["digits"]["inferences"] == 99
    assert stored["telemetry"]["models"]["faces"]["p50_ms"] is None
    assert sink.counters().accepted == 3


MALFORMED: list[tuple[DeviceTopic, bytes]] = [
    (TELEMETRY, b"not json"),
    (TELEMETRY, b"[]"),
    (TELEMETRY, json.dumps({"v": 2, "models": {}}).encode()),
    (TELEMETRY, json.dumps({"v": 1, "models": {}, "extra": 1}).encode()),
    (TELEMETRY, telemetry(digits=model(inferences=-1))),
    (TELEMETRY, telemetry(digits=model(inferences=True))),
    (TELEMETRY, telemetry(digits=model(errors=1.5))),
    (TELEMETRY, telemetry(digits=model(p95_ms=-3))),
    (TELEMETRY, telemetry(digits=model(p99_ms="fast"))),
    (TELEMETRY, telemetry(digits=model(version=""))),
    (TELEMETRY, telemetry(digits=model(version="v" * 65))),
    (TELEMETRY, telemetry(digits={**model(), "extra": 1})),
    (TELEMETRY, telemetry(**{"Bad Name": model()})),
    (TELEMETRY, b'{"v":1,"models":{"digits":{"version":"1","inferences":1,"errors":0,'
                b'"p50_ms":NaN,"p95_ms":1,"p99_ms":1}}}'),
    (TELEMETRY, telemetry(**{f"m{i}": model() for i in range(MAX_TELEMETRY_MODELS + 1)})),
    (TELEMETRY, telemetry(digits=model(version="1" * 60), **{
        "x" * 60: model(version="2" * 60)}) + b" " * MAX_TELEMETRY_SIZE),
    (ONLINE, b"yes"),
    (ONLINE, b'{"v":1,"online":"true"}'),
    (ONLINE, b'{"v":1,"online":1}'),
    (ONLINE, b'{"v":1}'),
    (ONLINE, b'{"v":2,"online":true}'),
    (ONLINE, b'{"v":1,"online":true,"since":0}'),
    (ONLINE, b'\xff\xfe'),
    (STATUS, b"not a report"),
]


def test_malformed_payloads_are_counted_and_change_nothing(
        make_sink, sessions, identities) -> None:
    sink = make_sink(batch_size=7)
    sink.submit("pi-a", TELEMETRY, telemetry(digits=model()))
    sink.submit("pi-a", ONLINE, presence(True))
    sink.flush()
    before = device(sessions, "pi-a")
    for kind, payload in MALFORMED:
        sink.submit("pi-a", kind, payload)
    sink.flush()
    after = device(sessions, "pi-a")
    assert after.reported_state == before.reported_state
    assert (after.online, after.last_seen) == (before.online, before.last_seen)
    counters = sink.counters()
    assert counters.malformed == counters.rejected == len(MALFORMED)
    assert counters.accepted == 2 and counters.failed == 0
    # ingest_report audits a malformed report; presence and telemetry are only counted.
    assert rejections(sessions) == [("pi-a", "malformed")]


@pytest.mark.parametrize(("payload", "expected"), [
    (b'{"v":1,"online":true}', True), (b'{"online": false, "v": 1}', False)])
def test_parse_presence(payload: bytes, expected: bool) -> None:
    assert parse_presence(payload) is expected


def test_telemetry_parse_bounds() -> None:
    most = telemetry(**{f"m{i}": model() for i in range(MAX_TELEMETRY_MODELS)})
    assert len(Telemetry.from_bytes(most).models) == MAX_TELEMETRY_MODELS
    with pytest.raises(MalformedMessageError):
        Telemetry.from_bytes(b" " * (MAX_TELEMETRY_SIZE + 1))
    with pytest.raises(MalformedMessageError):
        parse_presence(b" " * 100 + b'{"v":1,"online":true}')


# -- signed status reports ----------------------------------------------------------------


def test_reports_accepted_rejected_audited_and_redelivery_tolerated(
        make_sink, sessions, identities) -> None:
    a, b = identities["pi-a"], identities["pi-b"]
    sink = make_sink()
    sink.submit("pi-a", STATUS, signed(a, 1))
    sink.submit("pi-a", STATUS, signed(a, 2, "verifying"))
    sink.submit("pi-a", STATUS, signed(a, 2, "verifying"))  # QoS 1 redelivery / retained replay
    sink.submit("pi-a", STATUS, signed(a, 1))  # an older report replayed
    sink.submit("pi-a", STATUS, signed(a, 3, "committed", signer=b))  # forged with B's key
    sink.submit("pi-b", STATUS, signed(a, 4, "committed"))  # A's report on B's topic
    sink.submit("pi-zz", STATUS, signed(DeviceIdentity.generate("pi-zz"), 1))  # not enrolled
    sink.flush()
    counters = sink.counters()
    assert (counters.accepted, counters.duplicates, counters.rejected) == (2, 1, 4)
    assert counters.batches == 1
    state = device(sessions, "pi-a")
    assert state.report_seq == 2 and state.reported_state["state"] == "verifying"
    assert device(sessions, "pi-b").reported_state is None
    assert sorted(rejections(sessions)) == sorted([
        ("pi-a", "replayed"), ("pi-a", "bad_signature"), ("pi-b", "wrong_device"),
        ("pi-zz", "unknown_device")])


def test_a_report_refused_for_its_size_is_audited_from_its_size_alone(
        make_sink, sessions, identities) -> None:
    sink = make_sink()
    sink.oversize("pi-a", STATUS, 1_048_614)  # the bridge's or the broker's hook: no payload
    sink.oversize("pi-a", TELEMETRY, 20_000)  # counted, not a report: not audited
    sink.submit("pi-a", STATUS, signed(identities["pi-a"], 1))
    sink.flush()
    counters = sink.counters()
    assert (counters.accepted, counters.rejected, counters.oversize) == (1, 2, 2)
    assert rejections(sessions) == [("pi-a", "too_large")]
    assert device(sessions, "pi-a").report_seq == 1


def test_a_device_sending_bad_reports_without_end_gets_a_bounded_audit_trail(
        make_sink, sessions, identities) -> None:
    # Each rejected report is audited up to the device's budget (AUDIT_BURST at
    # once); past it the rejections are counted only, and another device's
    # budget is its own.
    sink = make_sink(batch_size=500)
    for _ in range(AUDIT_BURST + 30):
        sink.submit("pi-a", STATUS, b'{"v": 1, "report": "!!", "sig": ""}')
    sink.submit("pi-b", STATUS, b"not json")
    sink.flush()
    counters = sink.counters()
    assert (counters.rejected, counters.unaudited) == (AUDIT_BURST + 31, 30)
    audited = rejections(sessions)
    assert audited.count(("pi-a", "malformed")) == AUDIT_BURST
    assert audited.count(("pi-b", "malformed")) == 1


# -- the queue ------------------------------------------------------------------------------


def test_full_queue_unknown_kinds_and_stopped_sink_drop_and_count(sessions, identities) -> None:
    sink = DeviceMessageSink(sessions, clock=Clock(), batch_size=1, max_queue=2)
    sink.submit("pi-a", ONLINE, presence(True))  # not started yet
    with pytest.raises(IngestError):
        sink.flush()
    # Hold the worker inside its first transaction while the queue fills up.
    inside, gate = threading.Event(), threading.Event()

    def hold(_session: Session, _context: object, _instances: object) -> None:
        inside.set()
        assert gate.wait(5.0)

    event.listen(sessions, "before_flush", hold)
    try:
        sink.start()
        sink.submit("pi-a", ONLINE, presence(False))
        assert inside.wait(5.0)
        for _ in range(3):  # two fit in the queue, the third is dropped
            sink.submit("pi-a", ONLINE, presence(True))
        gate.set()
        sink.submit("pi-a", DeviceTopic.FETCH, b"{}")  # not a message the sink stores
        sink.flush()
    finally:
        gate.set()
        event.remove(sessions, "before_flush", hold)
    sink.stop()
    sink.submit("pi-a", ONLINE, presence(False))  # after stop
    counters = sink.counters()
    assert (counters.received, counters.accepted, counters.dropped) == (3, 3, 4)
    assert device(sessions, "pi-a").online is True
