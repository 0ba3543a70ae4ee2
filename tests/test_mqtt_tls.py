"""The production MQTT path with TLS and the ACL, on a real Mosquitto and on the embedded broker.

Mosquitto runs from the files ``write_mosquitto_config`` generates for the
test server's home (TLS, client certificates required, the generated ACL);
the embedded broker is amqtt with the certificate ACL plugin. On each, the
real :class:`FetchBridge` serves the server's blob store with the server
identity's certificate and hands device messages to a real
:class:`DeviceMessageSink` writing to the server's database; devices connect
with the TLS certificate from their enrolment folder.

Waits are on conditions with timeouts, never on sleeps. Absence of a message
is proven as in ``tests/test_broker_acl.py``: after the forbidden message the
same client publishes a control message (QoS 1) on a topic it may use; a
broker that let the forbidden one through would have delivered it before the
control, so when the control arrives with nothing before it, nothing came.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from mqtt_fleet_support import running_fleet_mosquitto
from server_support import RunningServer, wait_for
from sqlalchemy import select
from tuf.api import exceptions
from tuf.api.metadata import Metadata, Targets
from tuf.ngclient import Updater

from edgeota.agent.config import AgentConfig
from edgeota.agent.mqtt_fetcher import MQTT_REPOSITORY_URL, MqttFetcher
from edgeota.agent.mqtt_session import DeviceConnection
from edgeota.protocol.fetch import MqttTls
from edgeota.protocol.identity import SERVER_IDENTITY, DeviceIdentity
from edgeota.protocol.reports import SignedReport, StatusReport
from edgeota.protocol.topics import DeviceTopic, Topics
from edgeota.server.db.models import AuditEntry, Device
from edgeota.server.embedded_broker import EmbeddedBroker
from edgeota.server.fleet_ca import FleetCA, certificate_pem, private_key_pem
from edgeota.server.mqtt_bridge import MAX_DEVICE_PAYLOAD, FetchBridge
from edgeota.server.mqtt_ingest import DeviceMessageSink

TOPICS = Topics()
HOST = "127.0.0.1"
WAIT = 5.0  # seconds: the bound on every wait for something that must happen
OFFLINE = b'{"v":1,"online":false}'
ONLINE = b'{"v":1,"online":true}'


# -- brokers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsBroker:
    name: str
    port: int  # where devices connect
    server_port: int  # where the server connects (Mosquitto: its server listener)
    ca_cert: Path
    server_tls: MqttTls  # the edgeota server identity (CN _edgeota-server)
    shared_group: str | None  # amqtt has no shared subscriptions


def _mosquitto(server: RunningServer) -> Iterator[TlsBroker]:
    ca = FleetCA.load(server.config.ca_dir)
    with running_fleet_mosquitto(ca, server.home.parent / "mosquitto") as broker:
        yield TlsBroker("mosquitto", broker.port, broker.server_port, broker.files.ca_cert,
                        broker.server_tls, shared_group="edgeota-replicas")


def _embedded(server: RunningServer) -> Iterator[TlsBroker]:
    ca_dir = server.config.ca_dir
    key, cert = FleetCA.load(ca_dir).issue_service_client_certificate(SERVER_IDENTITY)
    folder = server.home.parent / "server-identity"
    folder.mkdir(mode=0o700)
    (folder / "tls.crt.pem").write_bytes(certificate_pem(cert))
    (folder / "tls.key.pem").write_bytes(private_key_pem(key))
    with EmbeddedBroker(ca_dir) as broker:
        yield TlsBroker("embedded", broker.port, broker.port, broker.ca_cert,
                        MqttTls(broker.ca_cert, folder / "tls.crt.pem", folder / "tls.key.pem"),
                        shared_group=None)


@pytest.fixture(params=["mosquitto", "embedded"])
def tls_broker(request: pytest.FixtureRequest, server: RunningServer) -> Iterator[TlsBroker]:
    """A TLS broker with the fleet ACL, trusting the test server's fleet CA."""
    start = _mosquitto if request.param == "mosquitto" else _embedded
    yield from start(server)


# -- the server side: bridge and sink -------------------------------------------------------


Message = tuple[str, DeviceTopic, bytes]


class Recorder:
    """The bridge's ``on_device_message``: hands on to the sink, and remembers for the test."""

    def __init__(self, sink: DeviceMessageSink) -> None:
        self.sink = sink
        self.messages: queue.Queue[Message] = queue.Queue()

    def __call__(self, device_id: str, kind: DeviceTopic, payload: bytes) -> None:
        self.sink.submit(device_id, kind, payload)  # first: seen here means queued there
        self.messages.put((device_id, kind, payload))

    def until(self, device_id: str, kind: DeviceTopic, payload: bytes) -> list[Message]:
        """Every message handed over before this one, which must arrive within WAIT."""
        seen: list[Message] = []
        deadline = time.monotonic() + WAIT
        while True:
            try:
                message = self.messages.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                raise AssertionError(f"{kind} {payload[:60]!r} from {device_id} never reached "
                                     f"the bridge; saw {seen}") from None
            if message == (device_id, kind, payload):
                return seen
            seen.append(message)


@dataclass
class Backend:
    bridge: FetchBridge
    sink: DeviceMessageSink
    recorder: Recorder


@pytest.fixture
def backend(server: RunningServer, tls_broker: TlsBroker) -> Iterator[Backend]:
    sink = DeviceMessageSink(server.ctx.sessions, clock=server.ctx.clock, batch_size=50,
                             flush_interval=0.05).start()
    recorder = Recorder(sink)
    bridge = FetchBridge(
        server.ctx.store, host=HOST, port=tls_broker.server_port, client_id="_edgeota-server-1",
        tls=tls_broker.server_tls, shared_group=tls_broker.shared_group,
        on_device_message=recorder, reconnect_min_delay=0.05, reconnect_max_delay=0.5)
    bridge.start(timeout=WAIT)
    try:
        yield Backend(bridge, sink, recorder)
    finally:
        bridge.stop()
        sink.stop()


# -- the device side --------------------------------------------------------------------------


@dataclass(frozen=True)
class Enrolled:
    device_id: str
    config: AgentConfig
    identity: DeviceIdentity

    def tls(self) -> MqttTls:
        return MqttTls(self.config.ca_cert, self.config.tls_cert, self.config.tls_key)


def enroll(server: RunningServer, device_id: str) -> Enrolled:
    folder = server.enroll(device_id, "rpi4")
    config = AgentConfig.load(folder / "agent.toml")
    return Enrolled(device_id, config, DeviceIdentity.load(folder / "identity"))


class DeviceClient:
    """A device's raw MQTT connection (TLS, its own certificate), with blocking calls."""

    def __init__(self, broker: TlsBroker, tls: MqttTls | None,
                 will: tuple[str, bytes] | None = None, *,
                 client_id: str = "anonymous") -> None:
        self.port = broker.port
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  clean_session=True, protocol=mqtt.MQTTv311)
        self.client.tls_set(ca_certs=str(broker.ca_cert),
                            certfile=str(tls.cert_file) if tls and tls.cert_file else None,
                            keyfile=str(tls.key_file) if tls and tls.key_file else None)
        self.client.reconnect_delay_set(min_delay=0.05, max_delay=0.05)  # type: ignore[arg-type]
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self._connected, self._answered = threading.Event(), threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = lambda *_args: self._answered.set()
        self.client.on_disconnect = lambda *_args: self._answered.set()

    def _on_connect(self, _c: object, _u: object, _f: object, reason: mqtt.ReasonCode,
                    _p: object) -> None:
        if not reason.is_failure:
            self._connected.set()
        self._answered.set()

    def connect(self) -> bool:
        """True once the broker accepted the connection; False on any refusal (TLS or MQTT)."""
        try:
            self.client.connect(HOST, self.port, keepalive=30)
        except OSError:  # ssl.SSLError is an OSError: refused in the handshake
            return False
        self.client.loop_start()
        self._answered.wait(WAIT)
        return self._connected.is_set()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(WAIT)
        assert info.is_published(), f"no PUBACK for {topic}"

    def vanish(self) -> None:
        """Drop off the network without a DISCONNECT, so the broker publishes the last will."""
        self.client.loop_stop()
        sock = self.client.socket()
        assert sock is not None
        sock.close()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def device_client(tls_broker: TlsBroker) -> Iterator[Callable[..., DeviceClient]]:
    opened: list[DeviceClient] = []

    def open_client(device: Enrolled, *, will: tuple[str, bytes] | None = None) -> DeviceClient:
        client = DeviceClient(tls_broker, device.tls(), will, client_id=device.device_id)
        opened.append(client)
        assert client.connect(), f"{device.device_id} could not connect to {tls_broker.name}"
        return client

    yield open_client
    for client in opened:
        client.close()


def url(path: str) -> str:
    return f"{MQTT_REPOSITORY_URL}/{path}"


def report(device: Enrolled, seq: int, state: str, signer: DeviceIdentity | None = None) -> bytes:
    body = StatusReport(device.device_id, seq, state, release="digits@1.0.0").to_bytes()
    return SignedReport(body, (signer or device.identity).sign_report(body)).to_bytes()


def stored(server: RunningServer, device_id: str) -> Device:
    with server.ctx.sessions() as session:
        found = session.get(Device, device_id)
        assert found is not None
        return found


# -- fetching over TLS --------------------------------------------------------------------------


def test_unmodified_updater_downloads_the_assigned_bundle_over_tls(
        server: RunningServer, tls_broker: TlsBroker, backend: Backend, tmp_path: Path) -> None:
    first, second = enroll(server, "pi-1"), enroll(server, "pi-2")
    assert server.publish("digits_v1", "1.0.0").code == 0
    assert server.cli("deploy", "digits@1.0.0", "--devices", "pi-1").code == 0

    with DeviceConnection("pi-1", host=HOST, port=tls_broker.port, tls=first.tls(),
                          reconnect_min_delay=0.05, reconnect_max_delay=0.5) as connection:
        assert connection.wait_ready(WAIT)

        def updater(name: str, metadata: str, targets: str | None, root: Path) -> Updater:
            folder = tmp_path / "tuf" / name
            folder.mkdir(parents=True)
            return Updater(
                metadata_dir=str(folder), metadata_base_url=url(metadata),
                target_dir=str(tmp_path), target_base_url=url(targets) if targets else None,
                fetcher=MqttFetcher(connection, timeout=WAIT, window=4),
                bootstrap=root.read_bytes(),
            )

        image = updater("image", "image/metadata/", "image/targets/", first.config.image_root)
        image.refresh()
        director = updater("director", "director/pi-1/metadata/", None,
                           first.config.director_root)
        director.refresh()
        cached = tmp_path / "tuf" / "director" / "targets.json"
        (target_path,) = Metadata[Targets].from_bytes(cached.read_bytes()).signed.targets
        info = image.get_targetinfo(target_path)
        assert info is not None
        bundle = Path(image.download_target(info))
        assert hashlib.sha256(bundle.read_bytes()).hexdigest() == info.hashes["sha256"]
        assert connection.active_requests() == 0
    served = {path for device, path in backend.bridge.counters().served if device == "pi-1"}
    assert "director/pi-1/metadata/timestamp.json" in served
    assert any(p.startswith("image/targets/models/digits/") for p in served)

    # Another enrolled device reads the image repository but not pi-1's director files.
    with DeviceConnection("pi-2", host=HOST, port=tls_broker.port, tls=second.tls()) as other:
        assert other.wait_ready(WAIT)
        fetcher = MqttFetcher(other, timeout=WAIT, window=4)
        assert fetcher.download_bytes(url("image/metadata/timestamp.json"), 100_000)
        with pytest.raises(exceptions.DownloadHTTPError) as caught:
            fetcher.download_bytes(url("director/pi-1/metadata/timestamp.json"), 100_000)
        assert caught.value.status_code == 403

    # No certificate, no connection (the CA is trusted, the handshake still fails).
    anonymous = DeviceClient(tls_broker, MqttTls(tls_broker.ca_cert))
    try:
        assert not anonymous.connect()
    finally:
        anonymous.close()


# -- status, presence and the ACL ----------------------------------------------------------------


def test_reports_and_presence_reach_the_database_only_from_their_device(
        server: RunningServer, backend: Backend, device_client) -> None:
    a, b = enroll(server, "pi-a"), enroll(server, "pi-b")
    status_a = TOPICS.device("pi-a", DeviceTopic.STATUS)
    online_a = TOPICS.device("pi-a", DeviceTopic.ONLINE)
    recorder = backend.recorder

    # A comes online (retained presence, last will registered) and reports, signed.
    device_a = device_client(a, will=(online_a, OFFLINE))
    device_a.publish(online_a, ONLINE, retain=True)
    first = report(a, 1, "downloading")
    device_a.publish(status_a, first, retain=True)
    assert recorder.until("pi-a", DeviceTopic.STATUS, first) == [
        ("pi-a", DeviceTopic.ONLINE, ONLINE)]
    backend.sink.flush()
    row = stored(server, "pi-a")
    assert row.online is True
    assert row.report_seq == 1 and row.reported_state["state"] == "downloading"

    # A report on A's own topic signed with B's key: rejected and audited, nothing changes.
    forged = report(a, 2, "committed", signer=b.identity)
    device_a.publish(status_a, forged)
    assert recorder.until("pi-a", DeviceTopic.STATUS, forged) == []
    backend.sink.flush()
    with server.ctx.sessions() as session:
        audited = session.execute(
            select(AuditEntry.subject, AuditEntry.detail)
            .where(AuditEntry.action == "report.rejected")).all()
    assert [(s, json.loads(d)["reason"]) for s, d in audited] == [("pi-a", "bad_signature")]
    assert stored(server, "pi-a").reported_state["state"] == "downloading"

    # B publishes a genuine A report (say, captured on the network) on A's topic:
    # the broker drops it. B's own report, published after it, is the control.
    device_b = device_client(b)
    captured = report(a, 5, "committed")
    device_b.publish(status_a, captured)
    device_b.publish(online_a, OFFLINE)
    control = report(b, 1, "idle")
    device_b.publish(TOPICS.device("pi-b", DeviceTopic.STATUS), control)
    assert recorder.until("pi-b", DeviceTopic.STATUS, control) == []
    backend.sink.flush()
    row = stored(server, "pi-a")
    assert (row.report_seq, row.reported_state["state"], row.online) == (1, "downloading", True)
    assert stored(server, "pi-b").reported_state["state"] == "idle"

    # Telemetry: an oversize message is dropped by the bridge, the next one is stored.
    telemetry_a = TOPICS.device("pi-a", DeviceTopic.TELEMETRY)
    device_a.publish(telemetry_a, b" " * (MAX_DEVICE_PAYLOAD + 1))
    metrics = json.dumps({"v": 1, "models": {"digits": {
        "version": "1.0.0", "inferences": 42, "errors": 1, "p50_ms": 2.5, "p95_ms": 4.0,
        "p99_ms": 7.25}}}).encode()
    device_a.publish(telemetry_a, metrics)
    assert recorder.until("pi-a", DeviceTopic.TELEMETRY, metrics) == []
    assert backend.bridge.counters().device_oversize == 1
    backend.sink.flush()
    state = stored(server, "pi-a").reported_state
    assert state["state"] == "downloading"
    assert state["telemetry"]["models"]["digits"]["p99_ms"] == 7.25

    # A drops off the network: the broker publishes its last will, A is offline.
    device_a.vanish()
    assert recorder.until("pi-a", DeviceTopic.ONLINE, OFFLINE) == []
    backend.sink.flush()
    assert stored(server, "pi-a").online is False
    counters = backend.sink.counters()
    assert (counters.accepted, counters.rejected, counters.failed) == (5, 1, 0)
    assert backend.bridge.counters().device_messages == 6


def test_a_slow_or_failing_handler_never_blocks_the_bridge(
        server: RunningServer, tls_broker: TlsBroker, device_client) -> None:
    a, b = enroll(server, "pi-a"), enroll(server, "pi-b")
    inside, gate = threading.Event(), threading.Event()
    handled: list[bytes] = []

    def handler(_device_id: str, _kind: DeviceTopic, payload: bytes) -> None:
        if payload == b"slow":
            inside.set()
            assert gate.wait(WAIT)
        if payload == b"boom":
            raise RuntimeError("a handler bug")
        handled.append(payload)

    bridge = FetchBridge(server.ctx.store, host=HOST, port=tls_broker.server_port,
                         client_id="_edgeota-server-2", tls=tls_broker.server_tls,
                         on_device_message=handler, max_device_queue=2)
    bridge.start(timeout=WAIT)
    try:
        device = device_client(a)
        topic = TOPICS.device("pi-a", DeviceTopic.TELEMETRY)
        device.publish(topic, b"slow")
        assert inside.wait(WAIT)
        for payload in (b"boom", b"queued", b"dropped"):  # the queue holds two
            device.publish(topic, payload)
        wait_for(lambda: bridge.counters().device_dropped == 1, WAIT, "the dropped message")
        # The network thread is free all along: fetches are still answered (pi-b's:
        # pi-a's client id is taken by the publisher above).
        with DeviceConnection("pi-b", host=HOST, port=tls_broker.port, tls=b.tls()) as conn:
            assert conn.wait_ready(WAIT)
            fetcher = MqttFetcher(conn, timeout=WAIT)
            assert fetcher.download_bytes(url("image/metadata/timestamp.json"), 100_000)
        gate.set()
    finally:
        gate.set()
        bridge.stop()  # hands the queued messages over before returning
    counters = bridge.counters()
    # Dropped: "dropped", and the fetching connection's own "online" presence, which
    # also arrived while the queue was full.
    assert (counters.device_messages, counters.device_dropped, counters.device_errors) == (3, 2, 1)
    assert handled == [b"slow", b"queued"]
