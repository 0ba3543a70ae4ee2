"""Broker access control: the same suite against a real Mosquitto and the embedded broker.

Mosquitto runs from the files ``write_mosquitto_config`` generates; the
embedded broker is amqtt with our certificate ACL plugin. Absence of a
message is proven without sleeping: after the forbidden message, a control
message goes on a topic the observer *may* receive, from the same publisher
with QoS 1; a broker that let the forbidden one through would have delivered
it before the control.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import typer
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from mqtt_fleet_support import running_fleet_mosquitto
from typer.testing import CliRunner

from edgeota.cli.broker import broker_config
from edgeota.protocol.identity import SERVER_IDENTITY, TLS_CERT_FILE, TLS_KEY_FILE
from edgeota.protocol.topics import DeviceTopic, Topics
from edgeota.server.broker_config import (
    BrokerConfigError,
    render_acl,
    write_mosquitto_files,
)
from edgeota.server.config import load_server_config
from edgeota.server.embedded_broker import (
    BrokerAcl,
    BrokerLimits,
    ConnackCode,
    ConnectRequest,
    EmbeddedBroker,
    EmbeddedBrokerError,
    MalformedPacketError,
    certificate_identity,
    filters_overlap,
    parse_connect,
    topic_matches,
)
from edgeota.server.fleet_ca import FleetCA, certificate_pem, private_key_pem, write_device_tls
from edgeota.server.home import init_home

TOPICS = Topics()
PREFIX = TOPICS.prefix
WAIT = 5.0  # seconds: the bound on every wait for something that must happen


def t(device: str, kind: DeviceTopic) -> str:
    return TOPICS.device(device, kind)


# --- fixtures: one home, certificates, and each broker once per module -------------------------


@dataclass(frozen=True)
class Credentials:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Fleet:
    home: Path
    ca_dir: Path
    ca_cert: Path
    devices: dict[str, Credentials]
    foreign: Credentials  # CN pi-a, issued by another CA
    work: Path


@dataclass(frozen=True)
class RunningBroker:
    name: str
    port: int  # where devices connect
    server_port: int  # where the server identity connects (Mosquitto: the server listener)
    ca_cert: Path
    server: Credentials  # the server identity's client certificate


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    work = tmp_path_factory.mktemp("broker-acl")
    home = work / "home"
    init_home(home)
    ca_dir = load_server_config(home).ca_dir
    ca = FleetCA.load(ca_dir)
    devices = {}
    for device in ("pi-a", "pi-b"):
        write_device_tls(work / device, device, ca)
        devices[device] = Credentials(work / device / TLS_CERT_FILE, work / device / TLS_KEY_FILE)
    other = FleetCA.create(work / "other-ca", common_name="someone else's CA")
    write_device_tls(work / "foreign", "pi-a", other)
    foreign = Credentials(work / "foreign" / TLS_CERT_FILE, work / "foreign" / TLS_KEY_FILE)
    return Fleet(home, ca_dir, ca.folder / "ca.crt.pem", devices, foreign, work)


@pytest.fixture(scope="module")
def acl_mosquitto(fleet: Fleet) -> Iterator[RunningBroker]:
    ca = FleetCA.load(fleet.ca_dir)
    with running_fleet_mosquitto(ca, fleet.work / "mosquitto") as broker:
        files = broker.files
        yield RunningBroker("mosquitto", broker.port, broker.server_port, files.ca_cert,
                            Credentials(files.bridge_cert, files.bridge_key))


@pytest.fixture(scope="module")
def acl_embedded(fleet: Fleet) -> Iterator[RunningBroker]:
    ca = FleetCA.load(fleet.ca_dir)
    key, cert = ca.issue_service_client_certificate(SERVER_IDENTITY)
    folder = fleet.work / "embedded-server-identity"
    folder.mkdir()
    (folder / "bridge.crt.pem").write_bytes(certificate_pem(cert))
    (folder / "bridge.key.pem").write_bytes(private_key_pem(key))
    (folder / "bridge.key.pem").chmod(0o600)
    with EmbeddedBroker(fleet.ca_dir) as broker:
        yield RunningBroker("embedded", broker.port, broker.port, broker.ca_cert,
                            Credentials(folder / "bridge.crt.pem", folder / "bridge.key.pem"))


@pytest.fixture(params=["mosquitto", "embedded"])
def broker(request: pytest.FixtureRequest) -> RunningBroker:
    # Named acl_* so they never shadow tests/mosquitto_support.py's plain broker.
    return request.getfixturevalue(f"acl_{request.param}")


# --- a small synchronous MQTT client ----------------------------------------------------------


def own_client_id(creds: Credentials | None) -> str:
    """The client id a certificate may use: its CN (the server: a replica id of its own)."""
    if creds is None:
        return f"anonymous-{uuid.uuid4().hex[:8]}"
    cert = x509.load_pem_x509_certificate(creds.cert.read_bytes())
    identity = certificate_identity(cert.public_bytes(Encoding.DER)) or "no-cn"
    return f"{identity}-{uuid.uuid4().hex[:8]}" if identity == SERVER_IDENTITY else identity


class Client:
    """paho (MQTT 3.1.1, TLS) with blocking connect/subscribe/publish and a message queue.

    The client id is the certificate's own unless ``client_id`` claims
    another; the server's certificate connects where the broker takes the
    server (Mosquitto's server listener), every other one where devices do.
    """

    def __init__(self, broker: RunningBroker, creds: Credentials | None,
                 *, ca_cert: Path | None = None, username: str | None = None,
                 client_id: str | None = None, clean_session: bool = True,
                 port: int | None = None) -> None:
        self.port = port or (broker.server_port if creds == broker.server else broker.port)
        self.client_id = client_id or own_client_id(creds)
        self.refusal: mqtt.ReasonCode | None = None
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                  clean_session=clean_session, protocol=mqtt.MQTTv311)
        self.client.tls_set(ca_certs=str(ca_cert or broker.ca_cert),
                            certfile=str(creds.cert) if creds else None,
                            keyfile=str(creds.key) if creds else None)
        # After a refusal paho's loop thread sleeps before retrying; keep that
        # short so closing a refused client does not wait a second.
        self.client.reconnect_delay_set(min_delay=0.05, max_delay=0.05)  # type: ignore[arg-type]
        if username is not None:
            self.client.username_pw_set(username, "ignored")
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._connected = threading.Event()
        self._done = threading.Event()
        self._acks: dict[int, list[mqtt.ReasonCode]] = {}
        self._acked = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_args: self._done.set()
        self.client.on_connect_fail = lambda *_args: self._done.set()
        self.client.on_message = lambda _c, _u, m: self.messages.put((m.topic, m.payload))
        self.client.on_subscribe = self._on_subscribe

    def _on_connect(self, _c: object, _u: object, _f: object, reason: mqtt.ReasonCode,
                    _p: object) -> None:
        if not reason.is_failure:
            self._connected.set()
        elif self.refusal is None:
            self.refusal = reason
        self._done.set()

    def _on_subscribe(self, _c: object, _u: object, mid: int, codes: list[mqtt.ReasonCode],
                      _p: object) -> None:
        with self._acked:
            self._acks[mid] = codes
            self._acked.notify_all()

    def connect(self) -> bool:
        """True once CONNACK accepted; False on any refusal (TLS or MQTT)."""
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=30)
        except OSError:  # ssl.SSLError is an OSError: refused in the handshake
            return False
        self.client.loop_start()
        self._done.wait(WAIT)
        return self._connected.is_set()

    def subscribe(self, *filters: str) -> list[mqtt.ReasonCode]:
        result, mid = self.client.subscribe([(f, 1) for f in filters])
        assert result == mqtt.MQTT_ERR_SUCCESS
        with self._acked:
            assert self._acked.wait_for(lambda: mid in self._acks, WAIT), "no SUBACK"
            return self._acks.pop(mid)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(WAIT)
        assert info.is_published(), f"no PUBACK for {topic}"

    def until(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        """Every message received before (topic, payload), which must arrive within WAIT."""
        seen: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + WAIT
        while True:
            remaining = deadline - time.monotonic()
            try:
                message = self.messages.get(timeout=max(remaining, 0.001))
            except queue.Empty:
                raise AssertionError(
                    f"control {topic} {payload!r} not received; saw {seen}") from None
            if message == (topic, payload):
                return seen
            seen.append(message)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def connect(broker: RunningBroker) -> Iterator[object]:
    opened: list[Client] = []

    def open_client(creds: Credentials, **kwargs: object) -> Client:
        client = Client(broker, creds, **kwargs)  # type: ignore[arg-type]
        opened.append(client)
        assert client.connect(), f"{creds.cert} could not connect to {broker.name}"
        return client

    yield open_client
    for client in opened:
        client.close()


# --- who may connect --------------------------------------------------------------------------


def test_client_without_certificate_is_refused(broker: RunningBroker) -> None:
    client = Client(broker, None)
    try:
        assert not client.connect()
    finally:
        client.close()


def test_certificate_from_another_ca_is_refused(broker: RunningBroker, fleet: Fleet) -> None:
    # Same CN as a real device, trusting the right broker CA: only the issuer differs.
    client = Client(broker, fleet.foreign)
    try:
        assert not client.connect()
    finally:
        client.close()


# --- what devices may do ----------------------------------------------------------------------


def test_device_cannot_publish_on_other_topics(broker: RunningBroker, fleet: Fleet,
                                               connect) -> None:
    server = connect(broker.server)
    server.subscribe(f"{PREFIX}/devices/#")  # the server reads every device topic
    # The claimed user name is ignored: the certificate (CN pi-b) is the identity.
    device_b = connect(fleet.devices["pi-b"], username=SERVER_IDENTITY)
    forbidden = [t("pi-a", kind) for kind in DeviceTopic] + [
        t("pi-b", DeviceTopic.RX),      # B cannot forge what the server sends B
        t("pi-b", DeviceTopic.NOTIFY),
        f"{PREFIX}/devices/pi-a",
        f"{PREFIX}/other",
    ]
    for topic in forbidden:
        device_b.publish(topic, b"forged")
    device_b.publish(t("pi-b", DeviceTopic.FETCH), b"control")
    assert server.until(t("pi-b", DeviceTopic.FETCH), b"control") == []


def test_device_never_receives_other_devices_messages(broker: RunningBroker, fleet: Fleet,
                                                      connect) -> None:
    server = connect(broker.server)
    server.subscribe(f"{PREFIX}/devices/#")
    device_a = connect(fleet.devices["pi-a"])
    # Retained messages on A's topics exist before B arrives: a broker must not
    # hand them over on B's SUBSCRIBE, nor at B's CONNECT because some other
    # client (the server) holds a matching filter.
    device_a.publish(t("pi-a", DeviceTopic.STATUS), b"a-status", retain=True)
    server.publish(t("pi-a", DeviceTopic.NOTIFY), b"a-notify-retained", retain=True)
    try:
        device_b = connect(fleet.devices["pi-b"])
        codes = device_b.subscribe(
            t("pi-a", DeviceTopic.RX), t("pi-a", DeviceTopic.NOTIFY),
            f"{PREFIX}/devices/+/rx", f"{PREFIX}/devices/#", "#",
            t("pi-b", DeviceTopic.RX), t("pi-b", DeviceTopic.NOTIFY),
        )
        assert not codes[-1].is_failure and not codes[-2].is_failure  # its own topics
        server.publish(t("pi-a", DeviceTopic.RX), b"for-a")
        server.publish(t("pi-a", DeviceTopic.NOTIFY), b"for-a")
        server.publish(t("pi-a", DeviceTopic.FETCH), b"for-the-server")
        server.publish(t("pi-b", DeviceTopic.RX), b"control")
        assert device_b.until(t("pi-b", DeviceTopic.RX), b"control") == []
    finally:
        server.publish(t("pi-a", DeviceTopic.NOTIFY), b"", retain=True)
        device_a.publish(t("pi-a", DeviceTopic.STATUS), b"", retain=True)


def test_server_reaches_every_device_and_reads_them_all(broker: RunningBroker, fleet: Fleet,
                                                        connect) -> None:
    server = connect(broker.server)
    server.subscribe(TOPICS.all_devices(DeviceTopic.FETCH), TOPICS.all_devices(DeviceTopic.STATUS),
                     TOPICS.all_devices(DeviceTopic.TELEMETRY),
                     TOPICS.all_devices(DeviceTopic.ONLINE))
    devices = {name: connect(creds) for name, creds in fleet.devices.items()}
    for name, device in devices.items():
        device.subscribe(t(name, DeviceTopic.NOTIFY), t(name, DeviceTopic.RX))
    for name in devices:
        server.publish(t(name, DeviceTopic.NOTIFY), f"notify {name}".encode())
        server.publish(t(name, DeviceTopic.RX), f"chunk {name}".encode())
    for name, device in devices.items():
        assert device.until(t(name, DeviceTopic.RX), f"chunk {name}".encode()) == [
            (t(name, DeviceTopic.NOTIFY), f"notify {name}".encode())
        ]
    sent = []
    for name, device in devices.items():
        for kind in (DeviceTopic.FETCH, DeviceTopic.STATUS, DeviceTopic.TELEMETRY):
            device.publish(t(name, kind), f"{kind} {name}".encode())
            sent.append((t(name, kind), f"{kind} {name}".encode()))
    last = sent.pop()
    received = server.until(*last)
    assert sorted(received) == sorted(sent)


def test_resuming_another_devices_session_gives_none_of_its_messages(
        broker: RunningBroker, fleet: Fleet, connect) -> None:
    # A persistent session belongs to a client id, which the client chooses.
    # B asking for A's client id must not inherit A's subscriptions or queue
    # (amqtt even kept the old connection's certificate on a resumed session),
    # nor take A's session away: the embedded broker refuses the CONNECT,
    # Mosquitto connects B as itself (use_username_as_clientid).
    device_a = connect(fleet.devices["pi-a"], clean_session=False)
    device_a.subscribe(t("pi-a", DeviceTopic.RX))
    server = connect(broker.server)
    device_b = Client(broker, fleet.devices["pi-b"], client_id="pi-a", clean_session=False)
    try:
        if device_b.connect():
            assert broker.name == "mosquitto"
            device_b.subscribe(t("pi-b", DeviceTopic.RX))
            server.publish(t("pi-a", DeviceTopic.RX), b"live for a")
            server.publish(t("pi-b", DeviceTopic.RX), b"control")
            assert device_b.until(t("pi-b", DeviceTopic.RX), b"control") == []
        else:
            assert device_b.refusal is not None and "identifier" in str(device_b.refusal).lower()
            server.publish(t("pi-a", DeviceTopic.RX), b"live for a")
    finally:
        device_b.close()
    # A kept its connection and its subscription.
    assert device_a.until(t("pi-a", DeviceTopic.RX), b"live for a") == []


def test_no_certificate_connects_under_another_clients_id(broker: RunningBroker, fleet: Fleet,
                                                          connect) -> None:
    # Issue 21 item 1: a broker drops whoever holds a client id when a client
    # connects with it. pi-a's certificate asking for pi-b's id, or the
    # server's, must leave pi-b and the server connected and subscribed: the
    # embedded broker refuses (identifier rejected), Mosquitto connects it as
    # pi-a whatever it asked for.
    server = connect(broker.server)
    server.subscribe(TOPICS.all_devices(DeviceTopic.FETCH))
    victim = connect(fleet.devices["pi-b"])
    victim.subscribe(t("pi-b", DeviceTopic.RX))
    for claimed in ("pi-b", server.client_id, SERVER_IDENTITY, f"{SERVER_IDENTITY}-x"):
        attacker = Client(broker, fleet.devices["pi-a"], client_id=claimed)
        try:
            accepted = attacker.connect()
            if broker.name == "embedded":
                assert not accepted, claimed
                assert "identifier" in str(attacker.refusal).lower(), attacker.refusal
            else:
                assert accepted, claimed  # as pi-a: it publishes on pi-a's topics only
                attacker.publish(t("pi-a", DeviceTopic.FETCH), claimed.encode())
                assert server.until(t("pi-a", DeviceTopic.FETCH), claimed.encode()) == []
        finally:
            attacker.close()
    # Both kept their connection and their subscriptions.
    for n in range(3):
        server.publish(t("pi-b", DeviceTopic.RX), f"frame {n}".encode())
    assert victim.until(t("pi-b", DeviceTopic.RX), b"frame 2") == [
        (t("pi-b", DeviceTopic.RX), b"frame 0"), (t("pi-b", DeviceTopic.RX), b"frame 1")]
    victim.publish(t("pi-b", DeviceTopic.FETCH), b"control")
    assert server.until(t("pi-b", DeviceTopic.FETCH), b"control") == []
    if broker.name == "mosquitto":  # a device certificate is not even let in where the server is
        intruder = Client(broker, fleet.devices["pi-a"], port=broker.server_port)
        try:
            assert not intruder.connect()
        finally:
            intruder.close()


def test_last_will_on_another_devices_topic_is_dropped(broker: RunningBroker, fleet: Fleet,
                                                       connect) -> None:
    server = connect(broker.server)
    server.subscribe(f"{PREFIX}/devices/#")
    liar = Client(broker, fleet.devices["pi-b"])
    liar.client.will_set(t("pi-a", DeviceTopic.ONLINE), b"forged will", qos=1)
    honest = Client(broker, fleet.devices["pi-a"])  # its own client id: the liar's is pi-b
    honest.client.will_set(t("pi-a", DeviceTopic.ONLINE), b"control", qos=1)
    for client in (liar, honest):  # a refused CONNECT would also do for the liar
        assert client.connect() or client is liar
    for client in (liar, honest):  # vanish without DISCONNECT: the broker sends the will
        client.client.loop_stop()
        client.client.socket().close()
    assert server.until(t("pi-a", DeviceTopic.ONLINE), b"control") == []


def test_server_replicas_share_fetch_load_on_mosquitto(acl_mosquitto: RunningBroker,
                                                        fleet: Fleet) -> None:
    mosquitto = acl_mosquitto
    # The ACL must not get in the way of $share subscriptions (amqtt has none).
    server = Client(mosquitto, mosquitto.server)
    device = Client(mosquitto, fleet.devices["pi-a"])
    try:
        assert server.connect() and device.connect()
        assert not server.subscribe(TOPICS.shared("replicas", DeviceTopic.FETCH))[0].is_failure
        device.publish(t("pi-a", DeviceTopic.FETCH), b"shared")
        assert server.until(t("pi-a", DeviceTopic.FETCH), b"shared") == []
    finally:
        server.close()
        device.close()


def test_broker_certificate_is_not_a_client_identity(broker: RunningBroker, fleet: Fleet) -> None:
    # The Mosquitto server certificate has CN "localhost", a valid device id
    # spelling; its serverAuth-only usage must keep it out as a client.
    if broker.name != "mosquitto":
        ca = FleetCA.load(fleet.ca_dir)
        key, cert = ca.issue_server_certificate(["localhost"], ["127.0.0.1"])
        folder = fleet.work / "server-as-client"
        folder.mkdir(exist_ok=True)
        creds = Credentials(folder / "c.pem", folder / "k.pem")
        creds.cert.write_bytes(certificate_pem(cert))
        creds.key.write_bytes(private_key_pem(key))
    else:
        files = sorted((fleet.work / "mosquitto").glob("tls-broker-*"))[-1]  # the one running
        creds = Credentials(files / "server.crt.pem", files / "server.key.pem")
    client = Client(broker, creds)
    try:
        assert not client.connect()
    finally:
        client.close()


# --- the generated files and the pure policy (no network) -------------------------------------


EXPECTED_ACL = f"""\
user _edgeota-server
topic readwrite {PREFIX}/devices/#
pattern write {PREFIX}/devices/%u/fetch
pattern write {PREFIX}/devices/%u/status
pattern write {PREFIX}/devices/%u/telemetry
pattern write {PREFIX}/devices/%u/online
pattern read {PREFIX}/devices/%u/notify
pattern read {PREFIX}/devices/%u/rx
"""


def test_acl_grants_exactly_the_device_and_server_rules() -> None:
    rules = [line for line in render_acl().splitlines() if line and not line.startswith("#")]
    assert "\n".join(rules) + "\n" == EXPECTED_ACL


@pytest.mark.parametrize("prefix", ["fleet/%c", "fleet/a b", "fleet\ntopic readwrite x"])
def test_unsafe_prefix_is_refused(prefix: str) -> None:
    with pytest.raises((BrokerConfigError, ValueError)):
        render_acl(Topics(prefix))


def test_generated_files_and_modes(fleet: Fleet) -> None:
    ca = FleetCA.load(fleet.ca_dir)
    files = write_mosquitto_files(ca, fleet.work / "modes", host="0.0.0.0", port=1883,
                                  hostnames=["broker.lan"], ips=["10.0.0.2"])
    conf = files.config.read_text()
    for line in ("listener 1883 0.0.0.0", "listener 1884 0.0.0.0", "require_certificate true",
                 "use_identity_as_username true", "use_username_as_clientid true",
                 "allow_anonymous false", f"acl_file {files.acl}", f"cafile {files.ca_cert}",
                 f"cafile {files.service_ca_cert}", "max_packet_size 131072"):
        assert line in conf.splitlines()
    # The client id is the certificate's on the device listener only (replicas keep theirs).
    device_listener, server_listener = conf.split("listener 1884 0.0.0.0")
    assert "use_username_as_clientid true" in device_listener
    assert "use_username_as_clientid true" not in server_listener
    assert f"cafile {files.ca_cert}" not in server_listener
    services = x509.load_pem_x509_certificate(files.service_ca_cert.read_bytes())
    assert services.subject != ca.certificate.subject
    for private in (files.server_key, files.bridge_key, files.acl):
        assert private.stat().st_mode & 0o777 == 0o600
    bridge = x509.load_pem_x509_certificate(files.bridge_cert.read_bytes())
    assert certificate_identity(bridge.public_bytes(Encoding.DER)) == SERVER_IDENTITY
    assert bridge.issuer == services.subject  # the services CA's, not the fleet CA's
    with pytest.raises(BrokerConfigError):
        write_mosquitto_files(ca, fleet.work / "bad", host="127.0.0.1\nlistener 1 0.0.0.0")
    with pytest.raises(BrokerConfigError):
        write_mosquitto_files(ca, fleet.work / "bad", hostnames=["not a host"])
    assert not (fleet.work / "bad").exists()


def test_cli_writes_the_setup(fleet: Fleet) -> None:
    app = typer.Typer()
    app.command(name="broker-config")(broker_config)
    app.callback()(lambda: None)
    out = fleet.work / "cli"
    result = CliRunner().invoke(app, ["broker-config", "--home", str(fleet.home), "--out",
                                      str(out), "--port", "18883", "--hostname", "a.lan,b.lan"])
    assert result.exit_code == 0, result.output
    assert f"mosquitto -c {out.resolve() / 'mosquitto.conf'}" in result.output
    assert "listener 18883 127.0.0.1" in (out / "mosquitto.conf").read_text()
    help_text = CliRunner().invoke(app, ["broker-config", "--help"]).output
    assert "mosquitto -c" in help_text


def test_policy_matches_the_acl() -> None:
    acl = BrokerAcl()
    for kind in DeviceTopic:
        own, other = t("pi-a", kind), t("pi-b", kind)
        device_sends = kind in (DeviceTopic.FETCH, DeviceTopic.STATUS, DeviceTopic.TELEMETRY,
                                DeviceTopic.ONLINE)
        assert acl.may_publish("pi-a", own) is device_sends
        assert acl.may_receive("pi-a", own) is not device_sends
        assert not acl.may_publish("pi-a", other) and not acl.may_receive("pi-a", other)
        assert acl.may_publish(SERVER_IDENTITY, own) and acl.may_receive(SERVER_IDENTITY, own)
    assert acl.may_subscribe("pi-a", "#") and acl.may_subscribe("pi-a", f"{PREFIX}/devices/+/rx")
    assert not acl.may_subscribe("pi-a", t("pi-b", DeviceTopic.RX))
    assert not acl.may_subscribe("pi-a", t("pi-a", DeviceTopic.FETCH))
    assert acl.may_subscribe(SERVER_IDENTITY, TOPICS.shared("g", DeviceTopic.FETCH))
    assert not acl.may_subscribe(SERVER_IDENTITY, "other/#")
    assert not acl.may_publish(SERVER_IDENTITY, f"{PREFIX}/devices/+/rx")
    for stranger in ("_edgeota-metrics", "Pi-A", "pi-a/rx", ""):
        assert acl.grants(stranger) is None and not acl.may_receive(stranger, "#")


@pytest.mark.parametrize(("topic", "topic_filter", "expected"), [
    ("a/b", "a/b", True), ("a/b", "a/+", True), ("a/b", "a/#", True), ("a", "a/#", True),
    ("a/b/c", "a/+", False), ("a", "a/+", False), ("$SYS/x", "#", False), ("b/a", "a/#", False),
])
def test_topic_matches(topic: str, topic_filter: str, expected: bool) -> None:
    assert topic_matches(topic, topic_filter) is expected


@pytest.mark.parametrize(("first", "second", "expected"), [
    ("#", "a/b", True), ("a/+/c", "a/b/+", True), ("a/b", "a/c", False), ("a", "a/#", True),
    ("a/b", "a", False), ("+/+", "a/b/c", False),
])
def test_filters_overlap(first: str, second: str, expected: bool) -> None:
    assert filters_overlap(first, second) is expected
    assert filters_overlap(second, first) is expected


def test_embedded_broker_refuses_ipv6_literal_and_reports_not_running(fleet: Fleet) -> None:
    with pytest.raises(EmbeddedBrokerError):
        EmbeddedBroker(fleet.ca_dir, host="::1")
    with pytest.raises(EmbeddedBrokerError):
        _ = EmbeddedBroker(fleet.ca_dir).port


# --- client ids: bound to the certificate (issue 21, item 1), the pure part ----------------------


def connect_packet(client_id: bytes, *, level: int = 4, name: bytes = b"MQTT",
                   flags: int = 0x02) -> bytes:
    body = (len(name).to_bytes(2, "big") + name + bytes((level, flags)) + b"\x00\x3c"
            + len(client_id).to_bytes(2, "big") + client_id)
    assert len(body) < 128
    return bytes((0x10, len(body))) + body


def test_parse_connect_reads_level_clean_session_and_client_id() -> None:
    assert parse_connect(connect_packet(b"pi-a")) == ConnectRequest(4, True, "pi-a")
    assert parse_connect(connect_packet(b"", level=3, name=b"MQIsdp", flags=0)) == \
        ConnectRequest(3, False, "")
    for bad in (connect_packet(b"pi-a")[:-1], b"\x30\x00", b"\x10",
                connect_packet(b"\xff\xfe")):
        with pytest.raises(MalformedPacketError):
            parse_connect(bad)


@pytest.mark.parametrize(("identity", "client_id", "verdict"), [
    ("pi-a", "pi-a", ConnackCode.ACCEPTED),
    ("pi-a", "pi-b", ConnackCode.IDENTIFIER_REJECTED),
    ("pi-a", "pi-a-2", ConnackCode.IDENTIFIER_REJECTED),  # another device's id spelling
    ("pi-a", "", ConnackCode.IDENTIFIER_REJECTED),  # amqtt would make one up
    ("pi-a", SERVER_IDENTITY, ConnackCode.IDENTIFIER_REJECTED),
    ("pi-a", f"{SERVER_IDENTITY}-1", ConnackCode.IDENTIFIER_REJECTED),
    (SERVER_IDENTITY, SERVER_IDENTITY, ConnackCode.ACCEPTED),
    (SERVER_IDENTITY, f"{SERVER_IDENTITY}-3fa2c1d0", ConnackCode.ACCEPTED),  # a replica
    (SERVER_IDENTITY, f"{SERVER_IDENTITY}-", ConnackCode.IDENTIFIER_REJECTED),
    (SERVER_IDENTITY, f"{SERVER_IDENTITY}x", ConnackCode.IDENTIFIER_REJECTED),
    (SERVER_IDENTITY, "pi-a", ConnackCode.IDENTIFIER_REJECTED),  # not even the server
    (SERVER_IDENTITY, f"{SERVER_IDENTITY}-a/b", ConnackCode.IDENTIFIER_REJECTED),
    ("_edgeota-metrics", "_edgeota-metrics", ConnackCode.NOT_AUTHORIZED),
    (None, "pi-a", ConnackCode.NOT_AUTHORIZED),
])
def test_a_client_id_is_its_certificate_identity(identity: str | None, client_id: str,
                                                 verdict: ConnackCode) -> None:
    assert BrokerAcl().connect_verdict(identity, ConnectRequest(4, True, client_id)) is verdict


def test_only_mqtt_3_1_and_3_1_1_are_spoken() -> None:
    acl = BrokerAcl()
    assert acl.connect_verdict("pi-a", ConnectRequest(5, True, "pi-a")) is \
        ConnackCode.UNACCEPTABLE_PROTOCOL
    assert acl.connect_verdict("pi-a", ConnectRequest(3, True, "pi-a")) is ConnackCode.ACCEPTED


@pytest.mark.parametrize("bad", [
    {"max_packet_size": 100}, {"device_publish_rate": 0}, {"device_publish_burst": 0},
    {"max_queued": 0}, {"max_backlog": 0}, {"connect_timeout": 0}, {"write_stall_timeout": -1},
])
def test_broker_limits_refuse_values_that_would_disable_them(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BrokerLimits(**bad)  # type: ignore[arg-type]
