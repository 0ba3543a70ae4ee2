"""SharedNetworkLoop against a real Mosquitto: many clients on one thread, and agents on it.

Plain paho clients on the plain broker (``mosquitto`` fixture) show the loop
itself: 200 clients on one thread, reconnects after a broker restart, an
outage and a cut connection, prompt sends from other threads, a bounded stop.
A ``DeviceConnection`` on the production TLS broker (``tls_mosquitto``) shows
that an agent's connection behaves the same on the shared loop as on its own
paho thread: fetch through the real ``FetchBridge``, resume across a broker
restart, presence and notify. Waits are on conditions with timeouts, never on
sleeps.
"""

from __future__ import annotations

import collections
import hashlib
import os
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from mosquitto_support import MosquittoBroker
from mqtt_fleet_support import TlsFleetBroker, tls_mosquitto  # noqa: F401 (fixture)

from edgeota.agent.mqtt_fetcher import MqttFetcher
from edgeota.agent.mqtt_session import DeviceConnection
from edgeota.agent.resumable import ResumableDownload
from edgeota.protocol.telemetry import presence_bytes
from edgeota.protocol.topics import DeviceTopic
from edgeota.server.mqtt_bridge import FetchBridge
from edgeota.server.repo.storage import RepoStore
from edgeota.simulator.mqtt_loop import SharedNetworkLoop

WAIT = 10.0  # seconds: the bound on every wait for something that must happen
WORKERS = 2  # connector threads of the loops under test
CHUNK = 16 * 1024
TARGET_SIZE = 40 * CHUNK + 123


@pytest.fixture
def make_loop() -> Iterator[Callable[..., SharedNetworkLoop]]:
    """Started loops, stopped after the test whatever happened."""
    loops: list[SharedNetworkLoop] = []

    def make(**options: Any) -> SharedNetworkLoop:
        options.setdefault("connect_workers", WORKERS)
        loop = SharedNetworkLoop(**options).start()
        loops.append(loop)
        return loop

    yield make
    for loop in loops:
        loop.stop(timeout=5.0)


class Fleet:
    """Plain paho clients on one loop, each subscribed (QoS 1) to its own topic."""

    def __init__(self, loop: SharedNetworkLoop, broker: MosquittoBroker, size: int,
                 prefix: str = "fleet") -> None:
        self.cond = threading.Condition()
        self.subscribed = collections.Counter[int]()  # subscriptions granted, per client
        self.disconnects = collections.Counter[int]()
        self.failures = collections.Counter[int]()  # failed connect attempts
        self.received: dict[int, list[bytes]] = collections.defaultdict(list)
        self.topics = [f"{prefix}/{i}" for i in range(size)]
        self.clients = [self._client(f"{prefix}-{i}", i) for i in range(size)]
        for i, client in enumerate(self.clients):
            loop.connect(client, broker.host, broker.port, keepalive=30,
                         on_connect_failed=self._failed, name=f"{prefix}-{i}")

    def _client(self, client_id: str, i: int) -> mqtt.Client:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv311)
        client.user_data_set(i)
        client.on_connect = lambda c, _u, _f, _rc, _p: c.subscribe(self.topics[i], 1)
        client.on_subscribe = lambda *_: self._count(self.subscribed, i)
        client.on_disconnect = lambda *_: self._count(self.disconnects, i)
        client.on_message = self.on_message
        return client

    def _count(self, counter: collections.Counter[int], i: int) -> None:
        with self.cond:
            counter[i] += 1
            self.cond.notify_all()

    def _failed(self, client: mqtt.Client, _error: BaseException) -> None:
        self._count(self.failures, client.user_data_get())

    def on_message(self, client: mqtt.Client, i: int, message: mqtt.MQTTMessage) -> None:
        assert message.topic == self.topics[i]
        with self.cond:
            self.received[i].append(message.payload)
            self.cond.notify_all()

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), f"timed out waiting for {what}"

    def all_at_least(self, counter: collections.Counter[int], n: int) -> Callable[[], bool]:
        return lambda: all(counter[i] >= n for i in range(len(self.clients)))

    def exchange(self, publisher: mqtt.Client, tag: str, per_client: int = 2) -> None:
        """Each client gets ``per_client`` messages of its own, in order, and nothing else."""
        with self.cond:
            self.received.clear()
        for i, topic in enumerate(self.topics):
            for k in range(per_client):
                publisher.publish(topic, f"{tag}:{i}:{k}".encode(), qos=1)
        expected = {i: [f"{tag}:{i}:{k}".encode() for k in range(per_client)]
                    for i in range(len(self.clients))}
        self.wait(lambda: all(len(self.received[i]) >= per_client for i in expected),
                  f"the {tag} messages")
        assert dict(self.received) == expected


def connected_publisher(loop: SharedNetworkLoop, broker: MosquittoBroker,
                        client_id: str = "publisher") -> mqtt.Client:
    connected = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv311)
    client.on_connect = lambda *_: connected.set()
    loop.connect(client, broker.host, broker.port, keepalive=30)
    assert connected.wait(WAIT)
    return client


def loop_threads(name: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(name)]


# -- many clients on one thread -----------------------------------------------------------


def test_two_hundred_clients_share_one_thread(mosquitto: MosquittoBroker,
                                              make_loop: Callable[..., SharedNetworkLoop]
                                              ) -> None:
    before = threading.active_count()
    loop = make_loop()
    fleet = Fleet(loop, mosquitto, 200)
    fleet.wait(fleet.all_at_least(fleet.subscribed, 1), "200 subscriptions")
    publisher = connected_publisher(loop, mosquitto)
    fleet.exchange(publisher, "hello", per_client=3)
    # One loop thread and its connectors, whatever the number of clients.
    assert threading.active_count() - before <= 1 + WORKERS
    counters = loop.counters()
    assert (counters.clients, counters.open) == (201, 201)
    assert counters.connect_failures == counters.client_errors == 0
    assert not fleet.disconnects


# -- reconnects -------------------------------------------------------------------------


def test_clients_reconnect_after_a_restart_an_outage_and_a_cut_connection(
        mosquitto: MosquittoBroker, make_loop: Callable[..., SharedNetworkLoop]) -> None:
    loop = make_loop(min_delay=0.05, max_delay=0.5)
    fleet = Fleet(loop, mosquitto, 50)
    fleet.wait(fleet.all_at_least(fleet.subscribed, 1), "the first subscriptions")
    publisher = connected_publisher(loop, mosquitto)

    # Restart: every connection drops at once; all come back by themselves.
    mosquitto.restart()
    fleet.wait(fleet.all_at_least(fleet.subscribed, 2), "resubscription after the restart")
    fleet.exchange(publisher, "restart")

    # Outage: attempts fail (reported) and back off, but stay bounded by max_delay.
    mosquitto.kill()
    fleet.wait(fleet.all_at_least(fleet.failures, 2), "failed attempts during the outage")
    mosquitto.start()
    back = time.monotonic()
    fleet.wait(fleet.all_at_least(fleet.subscribed, 3), "resubscription after the outage")
    # Within one backoff step at most (max_delay 0.5 s with jitter up to 1.5) plus a connect.
    assert time.monotonic() - back < 3.0
    fleet.exchange(publisher, "outage")

    # One connection cut under one client (the network, not the broker): only it reconnects.
    sock = fleet.clients[7].socket()
    assert sock is not None
    sock.shutdown(socket.SHUT_RDWR)
    fleet.wait(lambda: fleet.subscribed[7] >= 4, "client 7 back")
    assert all(fleet.subscribed[i] == 3 for i in range(50) if i != 7)
    fleet.exchange(publisher, "cut")
    assert loop.counters().client_errors == 0


def test_a_client_that_raises_is_reconnected_and_the_others_carry_on(
        mosquitto: MosquittoBroker, make_loop: Callable[..., SharedNetworkLoop],
        caplog: pytest.LogCaptureFixture) -> None:
    loop = make_loop(min_delay=0.05, max_delay=0.5)
    fleet = Fleet(loop, mosquitto, 5)
    fleet.wait(fleet.all_at_least(fleet.subscribed, 1), "the subscriptions")
    publisher = connected_publisher(loop, mosquitto)
    broken = fleet.clients[2]
    raised = threading.Event()

    def explode(_c: mqtt.Client, _u: Any, _m: mqtt.MQTTMessage) -> None:
        broken.on_message = fleet.on_message  # only once
        raised.set()
        raise RuntimeError("bug in a message handler")

    broken.on_message = explode  # paho's suppress_exceptions is off: it reaches the loop
    publisher.publish(fleet.topics[2], b"boom", qos=1)
    assert raised.wait(WAIT)
    fleet.wait(lambda: fleet.subscribed[2] >= 2, "the broken client back")
    fleet.exchange(publisher, "after")
    assert loop.counters().client_errors == 1
    assert any("fleet-2" in r.getMessage() and r.exc_info for r in caplog.records)


# -- wake-ups -----------------------------------------------------------------------------


def test_a_publish_from_another_thread_is_sent_at_once(
        mosquitto: MosquittoBroker, make_loop: Callable[..., SharedNetworkLoop]) -> None:
    # loop_misc once a minute: nothing but the wake-up can make these sends prompt
    # (the loop's select() caps its sleep at 1 s).
    loop = make_loop(misc_interval=60.0)
    cond = threading.Condition()
    seen: list[tuple[str, bytes, float]] = []
    receiver = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="receiver",
                           protocol=mqtt.MQTTv311)
    subscribed = threading.Event()
    receiver.on_connect = lambda c, *_: c.subscribe([("wake/ping", 0), ("wake/pong", 0)])
    receiver.on_subscribe = lambda *_: subscribed.set()
    echo = connected_publisher(loop, mosquitto, "echo")

    def on_message(_c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == "wake/ping":
            # On the loop thread, for another client of the same loop.
            echo.publish("wake/pong", message.payload, qos=0)
        with cond:
            seen.append((message.topic, message.payload, time.monotonic()))
            cond.notify_all()

    receiver.on_message = on_message
    loop.connect(receiver, mosquitto.host, mosquitto.port, keepalive=30)
    assert subscribed.wait(WAIT)
    sender = connected_publisher(loop, mosquitto, "sender")
    latencies = []
    for k in range(20):
        payload = str(k).encode()
        sent = time.monotonic()
        sender.publish("wake/ping", payload, qos=0)  # from this (non-loop) thread
        with cond:
            assert cond.wait_for(lambda p=payload: ("wake/pong", p) in
                                 [(t, d) for t, d, _ in seen], 0.5), f"message {k} late"
        arrived = max(at for t, d, at in seen if (t, d) == ("wake/pong", payload))
        latencies.append(arrived - sent)
    assert statistics.median(latencies) < 0.05, latencies


# -- stop --------------------------------------------------------------------------------


def test_stop_returns_within_its_timeout_and_leaves_no_thread(
        mosquitto: MosquittoBroker) -> None:
    before = threading.active_count()
    loop = SharedNetworkLoop(name="stop-test-loop", connect_workers=WORKERS,
                             min_delay=0.05, max_delay=0.2).start()
    fleet = Fleet(loop, mosquitto, 20)
    fleet.wait(fleet.all_at_least(fleet.subscribed, 1), "the subscriptions")
    # One client that can never connect (a closed port): it sits in backoff.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
    failed = threading.Event()
    dead = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dead")
    loop.connect(dead, "127.0.0.1", dead_port, on_connect_failed=lambda *_: failed.set())
    assert failed.wait(WAIT)
    assert len(loop_threads("stop-test-loop")) == 1 + WORKERS

    started = time.monotonic()
    assert loop.stop(timeout=2.0)
    assert time.monotonic() - started < 2.0
    assert loop_threads("stop-test-loop") == []
    assert threading.active_count() == before
    # Every client left cleanly (on_disconnect ran) and holds no socket.
    fleet.wait(fleet.all_at_least(fleet.disconnects, 1), "the disconnects")
    assert all(client.socket() is None for client in fleet.clients)
    assert len(loop) == 0
    with pytest.raises(RuntimeError):
        loop.add(mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="late"))
    assert loop.stop(timeout=1.0)  # twice is harmless


def test_a_stalled_tls_handshake_does_not_stall_the_others(
        mosquitto: MosquittoBroker, make_loop: Callable[..., SharedNetworkLoop]) -> None:
    loop = make_loop()
    fleet = Fleet(loop, mosquitto, 10)
    fleet.wait(fleet.all_at_least(fleet.subscribed, 1), "the subscriptions")
    publisher = connected_publisher(loop, mosquitto)
    # A server that accepts TCP and never answers the TLS ClientHello.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        silent.settimeout(WAIT)
        failed = threading.Event()
        stuck = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="stuck")
        stuck.tls_set()
        stuck.connect_timeout = 1.5
        loop.connect(stuck, "127.0.0.1", silent.getsockname()[1],
                     on_connect_failed=lambda *_: failed.set())
        accepted, _ = silent.accept()  # the TCP connect is done: the handshake waits now
        with accepted:
            # While a connector waits in the handshake, traffic of the others flows.
            started = time.monotonic()
            fleet.exchange(publisher, "during-handshake")
            assert time.monotonic() - started < 1.0
            assert not failed.is_set()
            assert failed.wait(WAIT)  # then the handshake times out and is reported


# -- DeviceConnection on the shared loop -------------------------------------------------------


@pytest.fixture(params=["own-thread", "shared-loop"])
def network(request: pytest.FixtureRequest,
            make_loop: Callable[..., SharedNetworkLoop]) -> SharedNetworkLoop | None:
    return None if request.param == "own-thread" else make_loop()


def test_a_device_connection_fetches_and_resumes_the_same_on_either_loop(
        tls_mosquitto: TlsFleetBroker, network: SharedNetworkLoop | None,  # noqa: F811
        tmp_path: Path) -> None:
    store = RepoStore(tmp_path / "blobs")
    data = os.urandom(TARGET_SIZE)
    (tmp_path / "bundle.eotb").write_bytes(data)
    sha256 = store.put_target("models/digits/1.0.0.eotb", tmp_path / "bundle.eotb") \
        .hashes["sha256"]
    target = f"image/targets/models/digits/{sha256}.1.0.0.eotb"
    messages: list[tuple[str, DeviceTopic, bytes]] = []
    arrived = threading.Condition()

    def on_device_message(device_id: str, kind: DeviceTopic, payload: bytes) -> None:
        with arrived:
            messages.append((device_id, kind, payload))
            arrived.notify_all()

    bridge = FetchBridge(store, host=tls_mosquitto.host, port=tls_mosquitto.server_port,
                         client_id="_edgeota-server-1", tls=tls_mosquitto.server_tls,
                         chunk_size=CHUNK, max_window=8,
                         reconnect_min_delay=0.02, reconnect_max_delay=0.2,
                         on_device_message=on_device_message)
    bridge.start(timeout=WAIT)
    connection = DeviceConnection("pi-1", host=tls_mosquitto.host, port=tls_mosquitto.port,
                                  tls=tls_mosquitto.device_tls("pi-1"),
                                  reconnect_min_delay=0.02, reconnect_max_delay=0.2,
                                  network=network)
    try:
        connection.start()
        assert connection.wait_ready(WAIT)
        # Presence: "online" reaches the server.
        online = ("pi-1", DeviceTopic.ONLINE, presence_bytes(online=True))
        with arrived:
            assert arrived.wait_for(lambda: online in messages, WAIT)
        # Notify reaches the device.
        notified = threading.Event()
        connection.on_notify = notified.set
        bridge.notify("pi-1")
        assert notified.wait(WAIT)
        # A fetch, then a resumable download with the broker restarted in the middle.
        fetcher = MqttFetcher(connection, timeout=WAIT, window=4)
        assert fetcher.download_bytes(target, TARGET_SIZE) == data
        cut = [TARGET_SIZE // 2]

        def restart_once(offset: int, _length: int) -> None:
            if cut and offset >= cut[0]:
                cut.pop()
                seen = bridge.connections
                tls_mosquitto.broker.restart()
                assert bridge.wait_ready(WAIT, after=seen)

        download = ResumableDownload(connection, tmp_path / "dl", timeout=WAIT, window=4,
                                     on_progress=restart_once)
        path = download.download(target, length=TARGET_SIZE, sha256=sha256)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha256
        assert not cut
        assert connection.counters().connections == 2
        assert connection.active_requests() == 0
        # The connection cut without a goodbye: the broker publishes the last will
        # ("offline"), the device comes back by itself and says "online" again.
        assert connection.drop()
        offline = ("pi-1", DeviceTopic.ONLINE, presence_bytes(online=False))
        with arrived:
            assert arrived.wait_for(lambda: messages[-2:] == [offline, online], WAIT)
        assert connection.wait_ready(WAIT)
        assert connection.counters().connections == 3
        assert MqttFetcher(connection, timeout=WAIT).download_bytes(target, TARGET_SIZE) == data
        # No paho thread of its own on the shared loop.
        own_thread = [t for t in threading.enumerate() if t.name == "paho-mqtt-client-pi-1"]
        assert bool(own_thread) == (network is None)
    finally:
        connection.close()
        bridge.stop()
    assert not connection.ready
    if network is not None:
        assert len(network) == 0


def test_a_client_the_application_disconnects_stays_disconnected_a_dropped_one_returns(
        mosquitto: MosquittoBroker, make_loop: Callable[..., SharedNetworkLoop]) -> None:
    """Told apart by paho's own disconnect reason (success for the application's own)."""
    loop = make_loop(min_delay=0.02, max_delay=0.1)
    fleet = Fleet(loop, mosquitto, 2)
    fleet.wait(fleet.all_at_least(fleet.subscribed, 1), "the subscriptions")
    left, dropped = fleet.clients
    left.disconnect()
    fleet.wait(lambda: fleet.disconnects[0] >= 1, "the application's disconnect")
    sock = dropped.socket()
    assert sock is not None
    sock.shutdown(socket.SHUT_RDWR)  # a network fault: no DISCONNECT sent
    fleet.wait(lambda: fleet.subscribed[1] >= 2, "the dropped client's return")
    # By then the disconnected client would have come back too (same backoff bounds).
    with fleet.cond:
        assert not fleet.cond.wait_for(lambda: fleet.subscribed[0] >= 2, 0.5)
    assert not left.is_connected() and dropped.is_connected()
    # Connecting it again through the loop works as before.
    loop.connect(left, mosquitto.host, mosquitto.port, keepalive=30)
    fleet.wait(lambda: fleet.subscribed[0] >= 2, "the reconnect asked for")
