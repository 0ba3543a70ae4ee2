"""Attacks on the MQTT side (issue 21): real brokers over sockets, the real server, real devices.

Each test is one attack from a device that holds a valid certificate (the
hardest attacker the broker cannot simply refuse), and asserts the precise
refusal, that the server's memory stayed bounded (the server runs in this
process: psutil's RSS of it, sampled while the attack lasts), that the other
devices kept fetching and reporting, and that nothing changed:

* session takeover: a client id is the certificate's (item 1), on the
  embedded broker (refused, CONNACK 2) and on Mosquitto as ``edgeota
  broker-config`` writes it (connected as itself whatever id it asked for);
* a 200 MB PUBLISH refused from its fixed header (item 3), a 1 MB and a
  100 KB status report refused and audited ``too_large``;
* a device flooding ~5 000 fetch requests a second (item 4): the others'
  fetch latency, against their own unloaded latency in the same test;
* a device that never acknowledges, or never reads, what it asked for;
* reports over MQTT with JSON nested past the parser's stack, integers past
  4 300 digits, NaN and 1e999: rejected and audited like over HTTP (item 6).

Waits are on conditions with timeouts; every loop is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import socket
import ssl
import statistics
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
import pytest
from mosquitto_support import MosquittoBroker
from mqtt_fleet_support import running_fleet_mosquitto
from server_support import RunningServer, running_server, wait_for
from sqlalchemy import select

from edgeota.agent.config import AgentConfig
from edgeota.agent.mqtt_fetcher import MQTT_REPOSITORY_URL, MqttFetcher
from edgeota.agent.mqtt_session import DeviceConnection
from edgeota.protocol.fetch import FetchRequest, MqttTls, encode_request
from edgeota.protocol.identity import SERVER_IDENTITY, DeviceIdentity
from edgeota.protocol.reports import SignedReport, StatusReport
from edgeota.protocol.topics import DeviceTopic, Topics
from edgeota.server.db.models import AuditEntry, Device
from edgeota.server.embedded import bind_loopback
from edgeota.server.embedded_broker import BrokerLimits
from edgeota.server.fleet_ca import FleetCA
from edgeota.server.home import HomeOptions
from edgeota.server.mqtt_bridge import FetchBridge, FrameFilter
from edgeota.server.repo.storage import RepoStore
from edgeota.server.transport import MqttTransport

TOPICS = Topics()
HOST = "127.0.0.1"
WAIT = 10.0  # seconds: the bound on every wait for something that must happen
MIB = 1024 * 1024
RSS_BOUND = 64 * MIB  # the most the server's memory may grow during one attack
TIMESTAMP = f"{MQTT_REPOSITORY_URL}/image/metadata/timestamp.json"


# -- the world: a server with its MQTT side, enrolled devices ------------------------------------


@dataclass(frozen=True)
class Enrolled:
    device_id: str
    config: AgentConfig
    identity: DeviceIdentity

    def tls(self) -> MqttTls:
        return MqttTls(self.config.ca_cert, self.config.tls_cert, self.config.tls_key)


@dataclass
class World:
    """A running server, its MQTT transport (embedded broker, or a Mosquitto) and devices."""

    server: RunningServer
    transport: MqttTransport
    device_port: int  # where devices connect
    broker_name: str

    def enroll(self, device_id: str) -> Enrolled:
        folder = self.server.enroll(device_id, "rpi4")
        config = AgentConfig.load(folder / "agent.toml")
        return Enrolled(device_id, config, DeviceIdentity.load(folder / "identity"))

    @contextlib.contextmanager
    def connection(self, device: Enrolled) -> Iterator[DeviceConnection]:
        with DeviceConnection(device.device_id, host=HOST, port=self.device_port,
                              tls=device.tls(), reconnect_min_delay=0.05,
                              reconnect_max_delay=0.5) as connection:
            assert connection.wait_ready(WAIT), f"{device.device_id} did not connect"
            yield connection

    def flush(self) -> None:
        assert self.transport.sink is not None
        self.transport.sink.flush()

    def audited(self, device_id: str) -> list[dict[str, object]]:
        """The ``report.rejected`` audit details of ``device_id``, oldest first."""
        with self.server.ctx.sessions() as session:
            details = session.scalars(select(AuditEntry.detail).where(
                AuditEntry.action == "report.rejected", AuditEntry.subject == device_id)
                .order_by(AuditEntry.id)).all()
        return [json.loads(detail) for detail in details]

    def device(self, device_id: str) -> Device:
        with self.server.ctx.sessions() as session:
            found = session.get(Device, device_id)
            assert found is not None
            return found


@contextlib.contextmanager
def embedded_world(tmp_path: Path, db_url: str | None = None,
                   limits: BrokerLimits = BrokerLimits()) -> Iterator[World]:  # noqa: B008
    """``edgeota serve`` in this process: the embedded broker, the bridge, the sink."""
    probe = bind_loopback()
    port = probe.getsockname()[1]
    probe.close()  # the embedded broker binds it next
    options = HomeOptions(bin_bits=4, mqtt=f"{HOST}:{port}")
    with running_server(tmp_path, db_url or f"sqlite:///{tmp_path / 'edgeota.db'}",
                        options) as server:
        transport = MqttTransport(server.config.ca_dir, server.ctx.store, embedded_port=port,
                                  sessions=server.ctx.sessions, clock=server.ctx.clock,
                                  broker_limits=limits)
        transport.start()
        server.ctx.notify = transport.notify
        try:
            yield World(server, transport, port, "embedded")
        finally:
            transport.stop()


@contextlib.contextmanager
def mosquitto_world(tmp_path: Path) -> Iterator[World]:
    """``edgeota serve --broker`` against Mosquitto as ``edgeota broker-config`` sets it up."""
    with running_server(tmp_path, f"sqlite:///{tmp_path / 'edgeota.db'}") as server, \
            running_fleet_mosquitto(FleetCA.load(server.config.ca_dir),
                                    tmp_path / "mosquitto") as broker:
        transport = MqttTransport(server.config.ca_dir, server.ctx.store,
                                  broker_url=f"mqtts://{HOST}:{broker.server_port}",
                                  sessions=server.ctx.sessions, clock=server.ctx.clock)
        transport.start()
        server.ctx.notify = transport.notify
        try:
            yield World(server, transport, broker.port, "mosquitto")
        finally:
            transport.stop()


def fetch_seconds(connection: DeviceConnection) -> float:
    """One fetch of the image timestamp (a few hundred bytes, one frame), timed."""
    started = time.perf_counter()
    assert MqttFetcher(connection, timeout=WAIT).download_bytes(TIMESTAMP, 100_000)
    return time.perf_counter() - started


class PeakRss:
    """The largest RSS of this process (the server's) seen while the block runs."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self.before = self._process.memory_info().rss
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(WAIT)
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.before


# -- a raw MQTT 3.1.1 client: what an attacker writes, byte by byte -------------------------------


def _remaining_length(length: int) -> bytes:
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">H", len(raw)) + raw


class RawClient:
    """A TLS socket speaking just enough MQTT to misbehave: no automatic PUBACK, no reads."""

    def __init__(self, port: int, tls: MqttTls, client_id: str) -> None:
        context = ssl.create_default_context(cafile=str(tls.ca_file))
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        self.sock = context.wrap_socket(socket.create_connection((HOST, port), timeout=WAIT),
                                        server_hostname="localhost")
        body = _string("MQTT") + bytes((4, 0x02)) + struct.pack(">H", 60) + _string(client_id)
        self.sock.sendall(b"\x10" + _remaining_length(len(body)) + body)
        self.connack = self._read(4)

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("the broker closed the connection")
            data += chunk
        return data

    @property
    def accepted(self) -> bool:
        return self.connack == b"\x20\x02\x00\x00"

    def subscribe(self, topic: str) -> None:
        body = struct.pack(">H", 1) + _string(topic) + b"\x01"
        self.sock.sendall(b"\x82" + _remaining_length(len(body)) + body)

    def publish(self, topic: str, payload: bytes) -> None:
        """QoS 0: nothing comes back."""
        head = _string(topic)
        self.sock.sendall(b"\x30" + _remaining_length(len(head) + len(payload)) + head + payload)

    def stream_publish(self, topic: str, size: int, *, chunk: int = MIB) -> int:
        """Announce a ``size``-byte PUBLISH and send its payload until the broker hangs up.

        Returns the payload bytes the socket took before the connection ended.
        """
        head = _string(topic)
        self.sock.sendall(b"\x30" + _remaining_length(len(head) + size) + head)
        block, sent = b" " * chunk, 0
        with contextlib.suppress(OSError):  # ssl.SSLError, BrokenPipe, ConnectionReset
            while sent < size:
                piece = block[:size - sent]
                self.sock.sendall(piece)
                sent += len(piece)
        return sent

    def closed_by_broker(self, timeout: float = WAIT) -> bool:
        """Whether the broker ends the connection within ``timeout`` (reading what it sends)."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self.sock.recv(65536):
                    return True
        except TimeoutError:
            return False
        except OSError:  # ssl.SSLError: the broker dropped the connection
            return True
        return False

    def drain(self) -> threading.Thread:
        """Read (and drop) whatever arrives, on a thread, until closed: never a PUBACK."""

        def run() -> None:
            with contextlib.suppress(OSError):
                while self.sock.recv(1 << 20):
                    pass

        self.sock.settimeout(None)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()


def signed(device: Enrolled, body: bytes) -> bytes:
    """An envelope around ``body`` (any bytes), signed by the device: only the body is hostile."""
    return SignedReport(body, device.identity.sign_report(body)).to_bytes()


def report(device: Enrolled, seq: int, state: str) -> bytes:
    return signed(device, StatusReport(device.device_id, seq, state).to_bytes())


# -- item 1: session takeover ------------------------------------------------------------------


@pytest.mark.parametrize("broker", ["embedded", "mosquitto"])
def test_a_certificate_cannot_take_another_clients_session(tmp_path: Path, broker: str) -> None:
    make = embedded_world if broker == "embedded" else mosquitto_world
    with make(tmp_path) as world:
        attacker, victim, bystander = (world.enroll(d) for d in ("pi-a", "pi-b", "pi-c"))
        bridge = world.transport.bridge
        assert bridge is not None
        notified = threading.Event()
        with world.connection(victim) as connection:
            connection.on_notify = notified.set
            before = fetch_seconds(connection)
            claims = ["pi-b", SERVER_IDENTITY, bridge.client_id, f"{SERVER_IDENTITY}-x"]
            for claimed in claims:
                raw = RawClient(world.device_port, attacker.tls(), claimed)
                try:
                    if world.broker_name == "embedded":  # CONNACK 2: identifier rejected
                        assert raw.connack == b"\x20\x02\x00\x02", (claimed, raw.connack)
                        assert raw.closed_by_broker()
                    else:
                        # Mosquitto cannot refuse it: it connects pi-a as pi-a
                        # (use_username_as_clientid), whatever it asked for.
                        assert raw.accepted, (claimed, raw.connack)
                finally:
                    raw.close()
            # Nothing changed: the victim and the bridge never lost their connection
            # or their subscriptions; the victim fetches and is notified, as is pi-c.
            assert connection.counters().connections == 1
            assert bridge.connections == 1
            notified.clear()
            world.transport.notify("pi-b")
            assert notified.wait(WAIT), "the victim's notify subscription is gone"
            assert fetch_seconds(connection) < WAIT
            with world.connection(bystander) as other:
                assert fetch_seconds(other) < WAIT
        if world.broker_name == "embedded":
            assert world.transport.broker is not None
            assert world.transport.broker.counters().refused_connects == len(claims)
        assert before < WAIT


def test_a_device_certificate_gets_nowhere_near_the_mosquitto_server_listener(
        tmp_path: Path) -> None:
    with running_server(tmp_path, f"sqlite:///{tmp_path / 'edgeota.db'}") as server, \
            running_fleet_mosquitto(FleetCA.load(server.config.ca_dir),
                                    tmp_path / "mosquitto") as broker:
        folder = server.enroll("pi-a", "rpi4")
        config = AgentConfig.load(folder / "agent.toml")
        with pytest.raises(ssl.SSLError):  # the handshake fails: only the services CA counts
            RawClient(broker.server_port, MqttTls(config.ca_cert, config.tls_cert,
                                                  config.tls_key), "pi-a")


# -- item 3 and resource limits: packets too large ------------------------------------------------


@pytest.mark.parametrize("broker", ["embedded", "mosquitto"])
def test_a_200_mb_publish_is_refused_from_its_header(tmp_path: Path, broker: str) -> None:
    make = embedded_world if broker == "embedded" else mosquitto_world
    with make(tmp_path) as world:
        attacker, other = world.enroll("pi-a"), world.enroll("pi-b")
        with world.connection(other) as connection:
            fetch_seconds(connection)  # warm: the first fetch opens files and caches
            raw = RawClient(world.device_port, attacker.tls(), "pi-a")
            try:
                assert raw.accepted
                with PeakRss() as rss:
                    sent = raw.stream_publish(TOPICS.device("pi-a", DeviceTopic.TELEMETRY),
                                              200 * MIB)
                    assert raw.closed_by_broker()
            finally:
                raw.close()
            print(f"\n{broker}: 200 MB PUBLISH refused after {sent / MIB:.0f} MiB sent; "
                  f"RSS +{rss.growth / MIB:.1f} MiB")
            # Refused long before the end: the broker read the header, not the body.
            assert sent < 64 * MIB, sent
            assert rss.growth < RSS_BOUND, rss.growth
            assert fetch_seconds(connection) < WAIT  # the others never noticed
        if world.broker_name == "embedded":
            assert world.transport.broker is not None
            assert world.transport.broker.counters().oversize == 1
        world.flush()
        assert world.audited("pi-a") == []  # telemetry: counted, not a report


@pytest.mark.parametrize("size", [1 * MIB, 100 * 1024])
def test_an_oversized_status_report_is_refused_audited_and_bounded(tmp_path: Path,
                                                                    size: int) -> None:
    # 1 MiB: above the broker's 128 KiB packet bound (the connection is closed);
    # 100 KiB: within it, above the bridge's 16 KiB (dropped there). Both are
    # audited as rejected reports (QoS 0 from a raw client: paho would send a
    # refused QoS 1 message again after every reconnection); the device
    # reports normally afterwards.
    with embedded_world(tmp_path) as world:
        device = world.enroll("pi-a")
        raw = RawClient(world.device_port, device.tls(), "pi-a")
        try:
            assert raw.accepted
            with PeakRss() as rss:
                raw.stream_publish(TOPICS.device("pi-a", DeviceTopic.STATUS), size)

                def audited() -> bool:
                    world.flush()
                    return bool(world.audited("pi-a"))

                wait_for(audited, WAIT, "the audited refusal")
            assert raw.closed_by_broker(0.5 if size < MIB else WAIT) is (size >= MIB)
        finally:
            raw.close()
        print(f"\n{size // 1024} KiB status report refused; RSS +{rss.growth / MIB:.1f} MiB")
        assert rss.growth < RSS_BOUND, rss.growth
        (entry,) = world.audited("pi-a")
        assert entry["reason"] == "too_large", entry
        refused = int(str(entry["detail"]).removeprefix("a ").partition("-byte")[0])
        assert size <= refused < size + 100, entry  # the payload, or the packet's whole size
        with world.connection(device) as connection:
            assert connection.publish(DeviceTopic.STATUS, report(device, 1, "idle"))

            def accepted() -> bool:
                world.flush()
                return world.device("pi-a").report_seq == 1

            wait_for(accepted, WAIT, "the next report accepted")
        assert world.device("pi-a").reported_state["state"] == "idle"
        assert world.transport.sink is not None
        assert world.transport.sink.counters().oversize == 1


# -- item 6: reports that break the JSON parser, over MQTT ----------------------------------------


def _report_json(seq: object, detail: str = "{}", progress: str = "null") -> bytes:
    return (f'{{"detail":{detail},"device_id":"pi-a","error":null,"progress":{progress},'
            f'"release":null,"seq":{seq},"state":"committed"}}').encode()


HOSTILE_REPORTS: dict[str, Callable[[Enrolled], bytes]] = {
    # Signed by the device itself: the signature is fine, the body is not.
    "deep detail": lambda d: signed(d, _report_json(1, "[" * 5000 + "]" * 5000)),
    "detail past the depth bound": lambda d: signed(d, _report_json(1, '{"a":' * 9 + "1"
                                                                    + "}" * 9)),
    "5000-digit seq": lambda d: signed(d, _report_json("9" * 5000)),
    "NaN progress": lambda d: signed(d, _report_json(1, progress="NaN")),
    "Infinity in detail": lambda d: signed(d, _report_json(1, '{"x":Infinity}')),
    "1e999 in detail": lambda d: signed(d, _report_json(1, '{"x":1e999}')),
    # The envelope itself.
    "deep envelope": lambda _d: b"[" * 8000 + b"]" * 8000,
    "5000-digit envelope version": lambda _d: b'{"v":' + b"1" * 5000 + b',"report":"","sig":""}',
}


def test_reports_that_break_the_parser_are_rejected_and_audited_over_mqtt(
        tmp_path: Path, db_url: str) -> None:
    with embedded_world(tmp_path, db_url) as world:
        device = world.enroll("pi-a")
        with world.connection(device) as connection:
            assert connection.publish(DeviceTopic.STATUS, report(device, 1, "downloading"))
            for name, build in HOSTILE_REPORTS.items():
                payload = build(device)
                assert len(payload) <= 16 * 1024, name  # within the size bound: the parser's job
                assert connection.publish(DeviceTopic.STATUS, payload), name
            control = report(device, 2, "idle")
            assert connection.publish(DeviceTopic.STATUS, control)

            def settled() -> bool:
                world.flush()
                return world.device("pi-a").report_seq == 2

            wait_for(settled, WAIT, "the control report")
        # Each one rejected as malformed, audited, and nothing stored from it.
        reasons = [entry["reason"] for entry in world.audited("pi-a")]
        assert reasons == ["malformed"] * len(HOSTILE_REPORTS), reasons
        row = world.device("pi-a")
        assert row.reported_state["state"] == "idle" and row.report_seq == 2
        assert world.transport.sink is not None
        counters = world.transport.sink.counters()
        assert (counters.malformed, counters.failed) == (len(HOSTILE_REPORTS), 0), counters


# -- item 4: one device flooding fetch requests ---------------------------------------------------


FLOOD_RATE = 5000  # requests per second, as the attack in the issue
FLOOD_SECONDS = 3.0
# The victim's fetch under the flood, against its own unloaded median in the same
# test: a shared 2-core machine runs the flooder, the broker, the bridge and the
# victim at once, so the bound is generous; without per-device limits it was
# 16 s against 12 ms (a ratio over 1000).
LATENCY_RATIO = 20.0  # on the median: typically 1-2x was measured
LATENCY_FLOOR = 0.25  # seconds: below this, a ratio says nothing about starvation
WORST_FETCH = 2.0  # seconds: the slowest single fetch while (or just after) the flood lasts


def _flood(port: int, tls: MqttTls, device_id: str, rate: int, seconds: float,
           report: multiprocessing.Queue[int], kind: str = "fetch") -> None:
    """The flooding device, in a process of its own (the attacker gets no share of our GIL).

    Sends valid fetch requests for a small file (``kind`` "fetch") or valid
    telemetry ("telemetry") at ``rate`` a second for ``seconds`` (in batches
    every 10 ms), reading whatever comes back, then reports how many it sent.
    """
    raw = RawClient(port, tls, device_id)
    assert raw.accepted
    raw.subscribe(TOPICS.device(device_id, DeviceTopic.RX))
    topic = _string(TOPICS.device(device_id, DeviceTopic(kind)))
    telemetry = json.dumps({"v": 1, "models": {}}).encode()
    stop = threading.Event()

    def drain() -> None:
        raw.sock.settimeout(0.2)
        while not stop.is_set():
            try:
                if not raw.sock.recv(1 << 20):
                    return
            except TimeoutError:
                continue
            except OSError:
                return

    def packet(rid: str) -> bytes:
        payload = (telemetry if kind == "telemetry" else
                   encode_request(FetchRequest(rid, "image/metadata/timestamp.json", 0, 1)))
        return b"\x30" + _remaining_length(len(topic) + len(payload)) + topic + payload

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    sent, batch, started = 0, max(1, rate // 100), time.monotonic()
    with contextlib.suppress(OSError):
        while (elapsed := time.monotonic() - started) < seconds:
            due = int(elapsed * rate) + batch
            raw.sock.sendall(b"".join(packet(f"f-{n}") for n in range(sent, due)))
            sent = due
            time.sleep(0.01)  # the attacker's own pacing
    report.put(sent)
    stop.set()
    reader.join(WAIT)
    raw.close()


@pytest.mark.parametrize("broker", ["embedded", "mosquitto"])
def test_a_flooding_device_does_not_starve_the_others(
        tmp_path: Path, broker: str, caplog: pytest.LogCaptureFixture) -> None:
    make = embedded_world if broker == "embedded" else mosquitto_world
    with make(tmp_path) as world:
        flooder_id, victim = world.enroll("pi-flood"), world.enroll("pi-v")
        with world.connection(victim) as connection:
            unloaded = statistics.median(fetch_seconds(connection) for _ in range(20))
            caplog.clear()
            caplog.set_level(logging.INFO)
            under_flood: list[float] = []
            spawn = multiprocessing.get_context("spawn")
            sent: multiprocessing.Queue[int] = spawn.Queue()
            attack = spawn.Process(target=_flood, args=(
                world.device_port, flooder_id.tls(), flooder_id.device_id, FLOOD_RATE,
                FLOOD_SECONDS, sent), daemon=True)
            try:
                with PeakRss() as rss:
                    attack.start()
                    while attack.is_alive() and len(under_flood) < 10_000:
                        under_flood.append(fetch_seconds(connection))
                    attack.join(WAIT)
                    after = [fetch_seconds(connection) for _ in range(5)]  # no timeouts after
                flood_sent = sent.get(timeout=WAIT)
            finally:
                if attack.is_alive():
                    attack.kill()
                attack.join(WAIT)
        lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    bound = max(LATENCY_RATIO * unloaded, LATENCY_FLOOR)
    worst, typical = max(under_flood), statistics.median(under_flood)
    print(f"\n{broker}: unloaded p50 {unloaded * 1000:.1f} ms; under {flood_sent} requests "
          f"in {FLOOD_SECONDS:.0f} s: p50 {typical * 1000:.1f} ms, max {worst * 1000:.1f} ms "
          f"({len(under_flood)} fetches); after: max {max(after) * 1000:.1f} ms; "
          f"RSS +{rss.growth / MIB:.1f} MiB; {len(lines)} warning lines")
    assert flood_sent >= FLOOD_RATE * FLOOD_SECONDS * 0.8, flood_sent
    assert typical < bound, (typical, unloaded)
    assert worst < WORST_FETCH, worst
    assert max(after) < WORST_FETCH and statistics.median(after) < bound, (after, unloaded)
    assert rss.growth < RSS_BOUND, rss.growth
    assert len(lines) < 20, [r.getMessage() for r in lines][:30]


@pytest.mark.parametrize("broker", ["embedded", "mosquitto"])
def test_a_device_flooding_telemetry_does_not_crowd_out_the_others_reports(
        tmp_path: Path, broker: str) -> None:
    # The bridge's queue of device messages, and the sink's, are every device's:
    # 5 000 telemetry messages a second from one device must not push another
    # device's status reports out of them.
    make = embedded_world if broker == "embedded" else mosquitto_world
    with make(tmp_path) as world:
        flooder, victim = world.enroll("pi-flood"), world.enroll("pi-v")
        spawn = multiprocessing.get_context("spawn")
        sent: multiprocessing.Queue[int] = spawn.Queue()
        attack = spawn.Process(target=_flood, args=(
            world.device_port, flooder.tls(), flooder.device_id, FLOOD_RATE, FLOOD_SECONDS,
            sent, "telemetry"), daemon=True)
        with world.connection(victim) as connection:
            try:
                with PeakRss() as rss:
                    attack.start()
                    for seq in range(1, 11):  # one report every 0.2 s while it lasts
                        assert connection.publish(DeviceTopic.STATUS,
                                                  report(victim, seq, "downloading"))
                        time.sleep(0.2)  # the victim's own pace, not synchronisation
                    attack.join(WAIT)
                    flood_sent = sent.get(timeout=WAIT)

                    def all_in() -> bool:
                        world.flush()
                        return world.device("pi-v").report_seq == 10

                    wait_for(all_in, WAIT, "every report of the victim")
            finally:
                if attack.is_alive():
                    attack.kill()
                attack.join(WAIT)
        bridge, sink = world.transport.bridge, world.transport.sink
        assert bridge is not None and sink is not None
        counters, stored = bridge.counters(), sink.counters()
    print(f"\n{broker}: {flood_sent} telemetry messages; the bridge took "
          f"{counters.device_messages}, dropped {counters.device_rate_limited} over the rate; "
          f"RSS +{rss.growth / MIB:.1f} MiB")
    assert flood_sent >= FLOOD_RATE * FLOOD_SECONDS * 0.8, flood_sent
    assert (counters.device_dropped, stored.dropped) == (0, 0), (counters, stored)
    assert rss.growth < RSS_BOUND, rss.growth


# -- resource limits: a device that never acknowledges, or never reads -----------------------------


BIG = 4 * MIB  # a target another device downloads meanwhile


@pytest.mark.parametrize("reads", [True, False], ids=["never-acks", "never-reads"])
def test_a_device_that_never_acknowledges_holds_nothing(
        tmp_path: Path, reads: bool, caplog: pytest.LogCaptureFixture) -> None:
    # The attacker asks for the first window of one fetch after another (16
    # chunks of 64 KiB each) and never asks for the next, never PUBACKs a
    # frame, and (never-reads) never reads its socket either. The broker
    # keeps at most max_queued frames on their way to it and disconnects it
    # once it has left its socket unread for write_stall_timeout; the bridge
    # holds no window for it; the victim downloads 4 MiB meanwhile.
    limits = BrokerLimits(write_stall_timeout=2.0)
    with embedded_world(tmp_path, limits=limits) as world:
        attacker, victim = world.enroll("pi-x"), world.enroll("pi-v")
        source = tmp_path / "big.eotb"
        source.write_bytes(bytes(range(256)) * (BIG // 256))
        stored = world.server.ctx.store.put_target("models/big/1.0.0.eotb", source)
        target = f"image/targets/models/big/{stored.hashes['sha256']}.1.0.0.eotb"
        raw = RawClient(world.device_port, attacker.tls(), "pi-x")
        assert raw.accepted
        raw.subscribe(TOPICS.device("pi-x", DeviceTopic.RX))
        if reads:
            raw.drain()
        else:
            raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        caplog.clear()
        broker = world.transport.broker
        bridge = world.transport.bridge
        assert broker is not None and bridge is not None
        try:
            with PeakRss() as rss, world.connection(victim) as connection:
                for n in range(200):  # 200 windows of 1 MiB asked for, none acknowledged
                    request = encode_request(FetchRequest(f"x-{n}", target, 0, 16, BIG))
                    raw.publish(TOPICS.device("pi-x", DeviceTopic.FETCH), request)
                started = time.perf_counter()
                got = MqttFetcher(connection, timeout=WAIT).download_bytes(
                    f"{MQTT_REPOSITORY_URL}/{target}", BIG)
                elapsed = time.perf_counter() - started
                assert hashlib.sha256(got).hexdigest() == stored.hashes["sha256"]
                del got
                if reads:
                    wait_for(lambda: broker.counters().dropped > 0, WAIT,
                             "deliveries to the attacker refused past max_queued")
                else:
                    wait_for(lambda: broker.counters().stalled == 1, 3 * WAIT,
                             "the attacker disconnected for not reading")
                wait_for(lambda: bridge.active_windows() == 0, WAIT, "the bridge holding nothing")
        finally:
            raw.close()
        lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    print(f"\n{'reads' if reads else 'no reads'}: victim 4 MiB in {elapsed:.2f} s; "
          f"RSS +{rss.growth / MIB:.1f} MiB; broker {broker.counters()}; "
          f"{len(lines)} warning lines")
    assert elapsed < WAIT
    assert rss.growth < RSS_BOUND, rss.growth
    assert len(lines) < 20, [r.getMessage() for r in lines][:30]


class _Recorder(FrameFilter):
    """Holds the bridge's one worker on the first window, then records the order windows come in."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.inside, self.release = threading.Event(), threading.Event()

    def on_request(self, device_id: str, request: FetchRequest) -> bool:
        self.order.append(request.request_id)
        self.inside.set()
        assert self.release.wait(WAIT)
        return True  # handled: dropped, nobody reads the frames here


def test_the_bridge_serves_devices_in_turn_not_in_arrival_order(
        mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    # pi-a queues four fetches, then pi-b one: pi-b is served second, not fifth.
    bridge = FetchBridge(RepoStore(tmp_path / "blobs"), host=mosquitto.host,
                         port=mosquitto.port, client_id="bridge", workers=1)
    recorder = _Recorder()
    bridge.add_filter(recorder)
    bridge.start(timeout=WAIT)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sender",
                         protocol=mqtt.MQTTv311)
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()
    try:
        def ask(device_id: str, rid: str) -> None:
            request = encode_request(FetchRequest(rid, "image/metadata/timestamp.json", 0, 1))
            info = client.publish(TOPICS.device(device_id, DeviceTopic.FETCH), request, qos=1)
            info.wait_for_publish(WAIT)

        ask("pi-a", "a1")
        assert recorder.inside.wait(WAIT)  # the worker holds a1
        for rid in ("a2", "a3", "a4"):
            ask("pi-a", rid)
        ask("pi-b", "b1")
        wait_for(lambda: bridge.active_windows() == 5, WAIT, "five windows accepted")
        recorder.release.set()
        wait_for(lambda: bridge.active_windows() == 0, WAIT, "every window handled")
    finally:
        recorder.release.set()
        client.disconnect()
        client.loop_stop()
        bridge.stop()
    assert recorder.order == ["a1", "a2", "b1", "a3", "a4"]


def test_a_silent_or_garbled_connection_is_closed_without_a_session(tmp_path: Path) -> None:
    # Slowloris for MQTT: a TLS handshake, then nothing (closed after
    # connect_timeout), or a first packet that is not a CONNECT, or MQTT 5.
    with embedded_world(tmp_path, limits=BrokerLimits(connect_timeout=1.0)) as world:
        device = world.enroll("pi-a")
        tls = device.tls()
        context = ssl.create_default_context(cafile=str(tls.ca_file))
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))

        def opened() -> ssl.SSLSocket:
            return context.wrap_socket(socket.create_connection((HOST, world.device_port),
                                                                timeout=WAIT),
                                       server_hostname="localhost")

        silent, garbled, mqtt5 = opened(), opened(), opened()
        try:
            started = time.monotonic()
            garbled.sendall(b"\x30\x05\x00\x01a12")  # a PUBLISH first
            body = _string("MQTT") + bytes((5, 0x02)) + b"\x00\x3c\x00" + _string("pi-a")
            mqtt5.sendall(b"\x10" + _remaining_length(len(body)) + body)
            assert mqtt5.recv(4) == b"\x20\x02\x00\x01"  # unacceptable protocol version
            for sock in (garbled, silent):
                sock.settimeout(WAIT)
                assert sock.recv(1) == b""  # closed by the broker
            assert time.monotonic() - started < WAIT
        finally:
            for sock in (silent, garbled, mqtt5):
                sock.close()
        broker = world.transport.broker
        assert broker is not None and broker.counters().refused_connects == 1
        with world.connection(device) as connection:  # and the device connects as ever
            assert fetch_seconds(connection) < WAIT
