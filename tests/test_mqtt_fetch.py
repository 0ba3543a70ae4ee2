"""Repository files over MQTT against a real Mosquitto: ngclient, scoping, resume, attacks.

Every test runs a private broker (``mosquitto`` fixture), the real
:class:`FetchBridge` over a real blob store, and real device connections.
Faults are injected the way they would happen: the broker is killed and
restarted mid-transfer, the agent's state is thrown away mid-download, and a
scripted "server" on the broker answers requests with crafted frames. Waits
are on conditions with timeouts, never on sleeps.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from mosquitto_support import MosquittoBroker
from server_support import RunningServer, wait_for
from tuf.api import exceptions
from tuf.api.metadata import Metadata, Targets
from tuf.ngclient import FetcherInterface, Updater

from edgeota.agent.config import AgentConfig
from edgeota.agent.mqtt_fetcher import MQTT_REPOSITORY_URL, MqttFetcher, repository_path
from edgeota.agent.mqtt_session import ConnectionLostError, DeviceConnection, FrameRejectedError
from edgeota.agent.resumable import ResumableDownload
from edgeota.protocol.fetch import (
    PIPELINE_DEPTH,
    ChunkFrame,
    ErrorFrame,
    FetchRequest,
    decode_frame,
    decode_request,
    encode_frame,
    encode_request,
)
from edgeota.protocol.topics import DeviceTopic, Topics
from edgeota.server.mqtt_bridge import FetchBridge, FrameFilter
from edgeota.server.repo.storage import RepoStore

CHUNK = 16 * 1024  # small chunks: many frames from little data
WINDOW = 8  # chunks in flight, asked for PIPELINE_DEPTH requests at a time
TIMEOUT = 5.0  # seconds; generous, tests that expect a timeout set their own
TARGET_SIZE = 40 * CHUNK + 123  # 41 chunks, the last one short
TOPICS = Topics()


# -- fixtures ---------------------------------------------------------------------


class Repo:
    """A blob store with one target and director metadata for two devices."""

    def __init__(self, root: Path) -> None:
        self.store = RepoStore(root / "blobs")
        source = root / "bundle.eotb"
        self.data = os.urandom(TARGET_SIZE)
        source.write_bytes(self.data)
        info = self.store.put_target("models/digits/1.0.0.eotb", source)
        self.sha256 = info.hashes["sha256"]
        self.target = f"image/targets/models/digits/{self.sha256}.1.0.0.eotb"
        for device in ("pi-a", "pi-b"):
            for version in (1, 2):
                self.store.write_metadata(
                    f"director/{device}", "timestamp", version,
                    b'{"signed": {"_type": "timestamp", "version": %d}, "for": "%s"}'
                    % (version, device.encode()))


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return Repo(tmp_path)


BridgeFactory = Callable[..., FetchBridge]


@pytest.fixture
def make_bridge(mosquitto: MosquittoBroker) -> Iterator[BridgeFactory]:
    bridges: list[FetchBridge] = []

    def make(store: RepoStore, **kw: Any) -> FetchBridge:
        options: dict[str, Any] = {"chunk_size": CHUNK, "max_window": 8,
                                   "reconnect_min_delay": 0.02, "reconnect_max_delay": 0.2}
        options.update(kw)
        bridge = FetchBridge(store, host=mosquitto.host, port=mosquitto.port,
                             client_id=f"edgeota-server-{len(bridges)}", **options)
        bridge.start(timeout=TIMEOUT)
        bridges.append(bridge)
        return bridge

    yield make
    for bridge in bridges:
        bridge.stop()


ConnectionFactory = Callable[[str], DeviceConnection]


@pytest.fixture
def connect(mosquitto: MosquittoBroker) -> Iterator[ConnectionFactory]:
    connections: list[DeviceConnection] = []

    def make(device_id: str) -> DeviceConnection:
        connection = DeviceConnection(device_id, host=mosquitto.host, port=mosquitto.port,
                                      reconnect_min_delay=0.02, reconnect_max_delay=0.2)
        connection.start()
        connections.append(connection)
        assert connection.wait_ready(TIMEOUT)
        return connection

    yield make
    for connection in connections:
        connection.close()


def url(path: str) -> str:
    return f"{MQTT_REPOSITORY_URL}/{path}"


# -- ngclient end to end ------------------------------------------------------------


def test_unmodified_updater_refreshes_both_repositories_and_downloads_over_mqtt(
        server: RunningServer, mosquitto: MosquittoBroker, make_bridge: BridgeFactory,
        connect: ConnectionFactory, tmp_path: Path) -> None:
    device = server.enroll("pi-1", "rpi4")
    assert server.publish("digits_v1", "1.0.0").code == 0
    assert server.cli("deploy", "digits@1.0.0", "--devices", "pi-1").code == 0
    # The HTTP app is left running: nothing below can reach it (no HTTP fetcher exists).
    bridge = make_bridge(server.ctx.store, chunk_size=64 * 1024)
    config = AgentConfig.load(device / "agent.toml")
    connection = connect("pi-1")

    def updater(name: str, metadata: str, targets: str | None, root: Path) -> Updater:
        folder = tmp_path / "tuf" / name
        folder.mkdir(parents=True)
        return Updater(
            metadata_dir=str(folder), metadata_base_url=url(metadata),
            target_dir=str(tmp_path), target_base_url=url(targets) if targets else None,
            fetcher=MqttFetcher(connection, timeout=TIMEOUT, window=4),
            bootstrap=root.read_bytes(),
        )

    director = updater("director", "director/pi-1/metadata/", None, config.director_root)
    director.refresh()
    image = updater("image", "image/metadata/", "image/targets/", config.image_root)
    image.refresh()
    cached = tmp_path / "tuf" / "director" / "targets.json"
    (target_path,) = Metadata[Targets].from_bytes(cached.read_bytes()).signed.targets
    info = image.get_targetinfo(target_path)
    assert info is not None
    bundle = Path(image.download_target(info))
    assert hashlib.sha256(bundle.read_bytes()).hexdigest() == info.hashes["sha256"]
    counters = bridge.counters()
    served = {path for device_id, path in counters.served if device_id == "pi-1"}
    assert "director/pi-1/metadata/timestamp.json" in served
    assert "image/metadata/timestamp.json" in served
    assert any(p.startswith("image/targets/models/digits/") for p in served)
    # ngclient probed for a newer root in both repositories and got "not found" (404).
    assert counters.errors_sent.get(404, 0) >= 2
    assert connection.active_requests() == 0


# -- scoping and errors ---------------------------------------------------------------


def test_a_device_reads_image_files_and_only_its_own_director_files(
        repo: Repo, make_bridge: BridgeFactory, connect: ConnectionFactory) -> None:
    make_bridge(repo.store)
    fetcher = MqttFetcher(connect("pi-a"), timeout=TIMEOUT, window=WINDOW)
    own = fetcher.download_bytes(url("director/pi-a/metadata/timestamp.json"), 10_000)
    assert b'"for": "pi-a"' in own
    for forbidden in ("director/pi-b/metadata/timestamp.json",
                      "director/pi-b/metadata/2.timestamp.json",
                      "director/pi-zz/metadata/1.root.json", "director"):
        with pytest.raises(exceptions.DownloadHTTPError) as caught:
            fetcher.download_bytes(url(forbidden), 10_000)
        assert caught.value.status_code == 403, forbidden
    for missing in ("director/pi-a/metadata/7.timestamp.json", "image/metadata/1.root.json",
                    "image/targets/models/digits/1.0.0.eotb", "image/../etc/passwd", "other"):
        with pytest.raises(exceptions.DownloadHTTPError) as caught:
            fetcher.download_bytes(url(missing), 10_000)
        assert caught.value.status_code == 404, missing
    # A file bigger than the client accepts is refused before any byte is sent.
    with pytest.raises(exceptions.DownloadHTTPError) as caught:
        fetcher.download_bytes(url(repo.target), TARGET_SIZE - 1)
    assert caught.value.status_code == 413
    assert fetcher.download_bytes(url(repo.target), TARGET_SIZE) == repo.data


def test_oversized_requests_are_refused(repo: Repo, make_bridge: BridgeFactory,
                                        connect: ConnectionFactory) -> None:
    bridge = make_bridge(repo.store, max_window=4)
    connection = connect("pi-a")
    with pytest.raises(exceptions.DownloadHTTPError) as caught:  # window above the bridge's
        next(MqttFetcher(connection, timeout=TIMEOUT,
                         window=PIPELINE_DEPTH * 4 + 1).stream(repo.target))
    assert caught.value.status_code == 400
    fetcher = MqttFetcher(connection, timeout=TIMEOUT, window=4)
    with pytest.raises(exceptions.DownloadHTTPError) as caught:  # offset beyond the end
        next(fetcher.stream(repo.target, offset=TARGET_SIZE + 1))
    assert caught.value.status_code == 416
    with pytest.raises(exceptions.DownloadError):  # path too long never leaves the device
        next(fetcher.stream("image/" + "x" * 2000))
    assert bridge.counters().errors_sent == {400: 1, 416: 1}


def test_url_forms() -> None:
    assert repository_path("mqtt://edgeota/image/metadata/1.root.json") == \
        "image/metadata/1.root.json"
    assert repository_path("mqtt://x/image/targets/a/b%2Bc.eotb") == "image/targets/a/b+c.eotb"
    assert repository_path("image/metadata/timestamp.json") == "image/metadata/timestamp.json"
    for bad in ("http://edgeota/image/metadata/x", "mqtt://edgeota/", "mqtt://e/x?y=1"):
        with pytest.raises(exceptions.DownloadError):
            repository_path(bad)


# -- resume -----------------------------------------------------------------------------


def test_download_resumes_after_the_broker_drops_three_times(
        repo: Repo, mosquitto: MosquittoBroker, make_bridge: BridgeFactory,
        connect: ConnectionFactory, tmp_path: Path) -> None:
    bridge = make_bridge(repo.store)
    connection = connect("pi-a")
    cuts = [TARGET_SIZE // 4, TARGET_SIZE // 2, 3 * TARGET_SIZE // 4]
    connections_before = connection.counters().connections

    def drop_broker(offset: int, _length: int) -> None:
        if cuts and offset >= cuts[0]:
            cuts.pop(0)
            seen = bridge.connections
            mosquitto.restart()  # every client connection drops, mid-window
            assert bridge.wait_ready(TIMEOUT, after=seen)

    download = ResumableDownload(connection, tmp_path / "dl", timeout=TIMEOUT, window=WINDOW,
                                 on_progress=drop_broker)
    path = download.download(url(repo.target), length=TARGET_SIZE, sha256=repo.sha256)
    assert path.read_bytes() == repo.data
    assert not cuts
    assert connection.counters().connections == connections_before + 3
    served = bridge.counters().served_bytes("pi-a", repo.target)
    # An interruption loses at most the window in flight: the rest was kept.
    assert TARGET_SIZE <= served <= TARGET_SIZE + 3 * WINDOW * CHUNK
    assert not download.partial_path(repo.sha256).exists()
    assert not download.progress_path(repo.sha256).exists()


class AgentKilledError(Exception):
    """Stands for the agent process dying: nothing in the download catches it."""


def test_download_resumes_after_the_agent_is_killed_and_restarted(
        repo: Repo, make_bridge: BridgeFactory, connect: ConnectionFactory,
        tmp_path: Path) -> None:
    bridge = make_bridge(repo.store)
    folder = tmp_path / "dl"
    killed_at: list[int] = []

    def kill(offset: int, _length: int) -> None:
        if offset >= TARGET_SIZE // 3:
            killed_at.append(offset)
            raise AgentKilledError

    first = connect("pi-a")
    with pytest.raises(AgentKilledError):
        ResumableDownload(first, folder, timeout=TIMEOUT, window=WINDOW,
                          on_progress=kill).download(repo.target, length=TARGET_SIZE,
                                                     sha256=repo.sha256)
    first.close()  # the process is gone: its connection, fetches and memory with it
    # The cancel (or the last window asked) ends what the bridge was still sending.
    wait_for(lambda: bridge.active_windows() == 0, TIMEOUT, "the bridge to finish")
    served_before = bridge.counters().served_bytes("pi-a", repo.target)

    second = connect("pi-a")  # the restarted agent: new connection, new objects
    download = ResumableDownload(second, folder, timeout=TIMEOUT, window=WINDOW)
    # The latest progress record names the last chunk written: the kill lost nothing
    # that the agent had received.
    saved = download.saved_offset(repo.sha256, TARGET_SIZE)
    assert saved == killed_at[0]
    path = download.download(url(repo.target), length=TARGET_SIZE, sha256=repo.sha256)
    assert path.read_bytes() == repo.data
    served = bridge.counters().served_bytes("pi-a", repo.target)
    # The restart fetched exactly the bytes past the kill; in all, the kill cost at
    # most the window that was in flight.
    assert served - served_before >= TARGET_SIZE - saved  # more: late requests of the first
    assert served <= TARGET_SIZE + WINDOW * CHUNK
    # A finished download is not fetched again.
    assert download.download(repo.target, length=TARGET_SIZE, sha256=repo.sha256) == path
    assert bridge.counters().served_bytes("pi-a", repo.target) == served


class CorruptOnce(FrameFilter):
    """Damages the payload of one frame in transit (CRC no longer matches)."""

    def __init__(self, offset: int) -> None:
        self.offset: int | None = offset

    def on_chunk(self, device_id: str, path: str, frame: bytearray, payload: int) -> bool:
        decoded = decode_frame(bytes(frame))
        if isinstance(decoded, ChunkFrame) and decoded.offset == self.offset:
            self.offset = None
            frame[-1] ^= 0x01
        return True


def test_a_damaged_chunk_is_refused_and_only_it_is_fetched_again(
        repo: Repo, make_bridge: BridgeFactory, connect: ConnectionFactory,
        tmp_path: Path) -> None:
    bridge = make_bridge(repo.store)
    bridge.add_filter(CorruptOnce(5 * CHUNK))
    connection = connect("pi-a")
    download = ResumableDownload(connection, tmp_path / "dl", timeout=TIMEOUT, window=WINDOW)
    path = download.download(repo.target, length=TARGET_SIZE, sha256=repo.sha256)
    assert path.read_bytes() == repo.data
    assert connection.counters().corrupt == 1
    served = bridge.counters().served_bytes("pi-a", repo.target)
    assert TARGET_SIZE < served <= TARGET_SIZE + WINDOW * CHUNK


# -- a hostile or broken server ------------------------------------------------------------


class ScriptedServer:
    """A fake server on the broker: answers each fetch request with crafted frames."""

    def __init__(self, broker: MosquittoBroker,
                 script: Callable[[FetchRequest], list[bytes]]) -> None:
        self.requests: list[FetchRequest] = []
        self._script = script
        self._ready = threading.Event()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="scripted",
                                   protocol=mqtt.MQTTv311)
        self._client.on_connect = lambda c, *_: c.subscribe(
            TOPICS.all_devices(DeviceTopic.FETCH), qos=1)
        self._client.on_subscribe = lambda *_: self._ready.set()
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(0.02, 0.2)  # type: ignore[arg-type]
        self._client.connect(broker.host, broker.port)
        self._client.loop_start()
        assert self._ready.wait(TIMEOUT)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        device_id, _ = TOPICS.parse(msg.topic)
        request = decode_request(msg.payload)
        self.requests.append(request)
        if request.cancel:
            return
        for data in self._script(request):
            self._client.publish(TOPICS.device(device_id, DeviceTopic.RX), data, qos=1)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


PAYLOAD = bytes(range(256)) * 16  # 4 KiB
FID = hashlib.sha256(PAYLOAD * 3).digest()


def frames(request: FetchRequest, *, rid: str | None = None, total: int = 3 * len(PAYLOAD),
           offsets: tuple[int, ...] | None = None, size: int = len(PAYLOAD)) -> list[bytes]:
    """Honest frames for ``request`` unless an argument says how to lie."""
    out = []
    for n in range(request.window):
        offset = offsets[n] if offsets else request.offset + n * size
        if offset >= total:
            break
        end = min(offset + size, total)
        payload = (PAYLOAD * (1 + size // len(PAYLOAD)))[:end - offset]
        out.append(encode_frame(ChunkFrame(rid or request.request_id, FID, offset, total,
                                           payload, last=end == total)))
        if end == total:
            break
    return out


def corrupted(request: FetchRequest) -> list[bytes]:
    good = frames(request)
    return [good[0][:-1] + bytes([good[0][-1] ^ 0xFF]), *good[1:]]


def bad_magic_then_good(request: FetchRequest) -> list[bytes]:
    good = frames(request)
    return [b"JUNK" + good[0][4:], *good]


def out_of_order(request: FetchRequest) -> list[bytes]:
    return frames(request)[::-1]


def other_request_id(request: FetchRequest) -> list[bytes]:
    return frames(request, rid="someone-else")


def other_id_then_good(request: FetchRequest) -> list[bytes]:
    return [*frames(request, rid="someone-else"), *frames(request)]


def larger_than_asked(request: FetchRequest) -> list[bytes]:
    return frames(request, total=request.max_length + len(PAYLOAD))


def too_large_frame(request: FetchRequest) -> list[bytes]:
    data = bytearray(frames(request)[0])
    data[8 + len(request.request_id) + 48:][:4] = b"\x00\x01\x00\x01"  # length 65537
    return [bytes(data) + b"\x00" * (65537 - len(PAYLOAD))]


def file_changes(request: FetchRequest) -> list[bytes]:
    if request.offset == 0:
        return frames(request)
    return frames(request, total=3 * len(PAYLOAD) + 1)


class SwappedWindows:
    """Answers the two pipelined windows (offsets 4K, 8K) in the wrong order, as two
    replicas behind a shared subscription may; ``lie`` puts the second off the grid."""

    def __init__(self, lie: bool = False) -> None:
        self.__name__ = "off_grid_window" if lie else "swapped_windows"
        self.bad_frames = 0  # nothing to drop: every frame is good, only early
        self._held: list[bytes] = []
        self._lie = lie

    def __call__(self, request: FetchRequest) -> list[bytes]:
        if request.offset == len(PAYLOAD):
            self._held = frames(request)
            return []
        if request.offset == 2 * len(PAYLOAD):
            ahead = frames(request, offsets=(request.offset - 1,)) if self._lie else \
                frames(request)
            return [*ahead, *self._held]
        return frames(request)


# Windows of chunks in flight: PIPELINE_DEPTH requests of 1 or 3 chunks each.
@pytest.mark.parametrize(("script", "window", "outcome"), [
    (SwappedWindows(), PIPELINE_DEPTH, None),
    (SwappedWindows(lie=True), PIPELINE_DEPTH, FrameRejectedError),
    (corrupted, 3 * PIPELINE_DEPTH, FrameRejectedError),
    (out_of_order, 3 * PIPELINE_DEPTH, FrameRejectedError),
    (other_request_id, 3 * PIPELINE_DEPTH, exceptions.SlowRetrievalError),
    (larger_than_asked, 3 * PIPELINE_DEPTH, exceptions.DownloadLengthMismatchError),
    (too_large_frame, 3 * PIPELINE_DEPTH, FrameRejectedError),
    (file_changes, PIPELINE_DEPTH, FrameRejectedError),
    (bad_magic_then_good, 3 * PIPELINE_DEPTH, None),
    (other_id_then_good, 3 * PIPELINE_DEPTH, None),
], ids=lambda v: getattr(v, "__name__", str(v)))
def test_bad_frames_are_rejected(mosquitto: MosquittoBroker, connect: ConnectionFactory,
                                 script: Callable[[FetchRequest], list[bytes]], window: int,
                                 outcome: type[Exception] | None) -> None:
    fake = ScriptedServer(mosquitto, script)
    try:
        connection = connect("pi-a")
        fetcher = MqttFetcher(connection, timeout=1.0, window=window)
        if outcome is None:  # the bad frame is dropped and the honest ones still count
            assert fetcher.download_bytes("image/targets/x", 10**6) == PAYLOAD * 3
            counters = connection.counters()
            assert counters.corrupt + counters.stray >= getattr(script, "bad_frames", 1)
        else:
            with pytest.raises(outcome):
                fetcher.download_bytes("image/targets/x", 10**6)
        assert connection.active_requests() == 0
    finally:
        fake.close()


def test_a_silent_server_times_out(mosquitto: MosquittoBroker,
                                   connect: ConnectionFactory) -> None:
    # Serves the first window, then never answers again.
    fake = ScriptedServer(mosquitto, lambda r: frames(r) if r.offset == 0 else [])
    try:
        fetcher = MqttFetcher(connect("pi-a"), timeout=0.5, window=1)
        started = time.monotonic()
        with pytest.raises(exceptions.SlowRetrievalError):
            fetcher.download_bytes("image/targets/x", 10**6)
        assert 0.5 <= time.monotonic() - started < 2.0
        # No server at all: same bounded wait.
        fake.close()
        started = time.monotonic()
        with pytest.raises(exceptions.SlowRetrievalError):
            fetcher.download_bytes("image/metadata/timestamp.json", 10**6)
        assert time.monotonic() - started < 2.0
    finally:
        fake.close()


def test_an_endless_response_is_cut_and_cancelled(mosquitto: MosquittoBroker,
                                                  connect: ConnectionFactory) -> None:
    # Claims a file of 2**40 bytes and serves every window it is asked for.
    endless = ScriptedServer(mosquitto, lambda r: frames(r, total=2**40))
    try:
        connection = connect("pi-a")
        fetcher = MqttFetcher(connection, timeout=TIMEOUT, window=PIPELINE_DEPTH * 4)
        assert fetcher.request_window == 4
        # Through ngclient's entry point the limit travels in the request: refused at once.
        with pytest.raises(exceptions.DownloadLengthMismatchError):
            fetcher.download_bytes("image/targets/x", 100_000)
        wait_for(lambda: len(endless.requests) == 2, TIMEOUT, "the cancel")
        assert [r.window for r in endless.requests] == [4, 0]  # asked once, then cancelled
        # Through FetcherInterface's generic path (plain fetch() with no limit in the
        # request), ngclient's own byte count cuts it; the generator is closed and cancels.
        endless.requests.clear()
        with pytest.raises(exceptions.DownloadLengthMismatchError):
            FetcherInterface.download_bytes(fetcher, "image/targets/x", 100_000)
        wait_for(lambda: any(r.cancel for r in endless.requests), TIMEOUT, "the cancel")
        asked = [r for r in endless.requests if not r.cancel]
        # Windows asked for: what ngclient took, plus the pipeline ahead of it.
        assert len(asked) <= 100_000 // (4 * len(PAYLOAD)) + PIPELINE_DEPTH
        assert connection.active_requests() == 0
    finally:
        endless.close()


def test_a_dropped_connection_fails_waiting_fetches_at_once(
        repo: Repo, mosquitto: MosquittoBroker, connect: ConnectionFactory) -> None:
    fake = ScriptedServer(mosquitto, lambda r: [])  # never answers: the fetch waits
    connection = connect("pi-a")
    fetcher = MqttFetcher(connection, timeout=30.0, window=1)
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            fetcher.download_bytes(repo.target, 10**6)
        except exceptions.DownloadError as e:
            errors.append(e)

    thread = threading.Thread(target=fetch)
    thread.start()
    wait_for(lambda: bool(fake.requests), TIMEOUT, "the request")
    started = time.monotonic()
    mosquitto.restart()
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert isinstance(errors[0], ConnectionLostError)
    assert time.monotonic() - started < TIMEOUT
    fake.close()


def test_notify_reaches_the_device(repo: Repo, mosquitto: MosquittoBroker,
                                   make_bridge: BridgeFactory) -> None:
    bridge = make_bridge(repo.store)
    received = threading.Event()
    messages: list[tuple[str, bytes, int]] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pi-a-notify",
                         protocol=mqtt.MQTTv311)
    subscribed = threading.Event()
    client.on_connect = lambda c, *_: c.subscribe(TOPICS.device("pi-a", DeviceTopic.NOTIFY), 1)
    client.on_subscribe = lambda *_: subscribed.set()

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        messages.append((msg.topic, msg.payload, msg.qos))
        received.set()

    client.on_message = on_message
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()
    try:
        assert subscribed.wait(TIMEOUT)
        bridge.notify("pi-a")
        assert received.wait(TIMEOUT)
        assert messages == [("edgeota/v1/devices/pi-a/notify",
                             b'{"v":1,"event":"director-changed"}', 1)]
    finally:
        client.disconnect()
        client.loop_stop()


def test_frames_reach_the_device_at_qos_0_and_a_notify_at_qos_1(
        repo: Repo, mosquitto: MosquittoBroker, make_bridge: BridgeFactory) -> None:
    """The bridge publishes at QoS 1; the device takes frames at QoS 0: no PUBACK per chunk.

    The next request is the device's acknowledgement; a notify has no other, so it
    keeps QoS 1.
    """
    bridge = make_bridge(repo.store)
    connection = DeviceConnection("pi-a", host=mosquitto.host, port=mosquitto.port,
                                  reconnect_min_delay=0.02, reconnect_max_delay=0.2)
    received: list[tuple[str, int]] = []
    connection.on_received = lambda kind, qos: received.append((str(kind), qos))
    connection.start()
    try:
        assert connection.wait_ready(TIMEOUT)
        fetcher = MqttFetcher(connection, timeout=TIMEOUT, window=WINDOW)
        assert fetcher.download_bytes(url(repo.target), TARGET_SIZE) == repo.data
        woken = threading.Event()
        connection.on_notify = woken.set
        bridge.notify("pi-a")
        assert woken.wait(TIMEOUT)
        rx = [qos for kind, qos in received if kind == "rx"]
        assert len(rx) == -(-TARGET_SIZE // CHUNK)  # every chunk, each once
        assert set(rx) == {0}
        assert [qos for kind, qos in received if kind == "notify"] == [1]
    finally:
        connection.close()


def test_a_reconnection_wakes_the_agent_as_a_notify_would(
        mosquitto: MosquittoBroker, connect: ConnectionFactory) -> None:
    """A notify sent while the link was down is lost: coming back counts as one."""
    connection = connect("pi-a")
    woken = threading.Semaphore(0)
    connection.on_notify = woken.release
    assert not woken.acquire(timeout=0.2)  # the first connection is no news
    before = connection.counters().connections
    assert connection.drop()
    assert woken.acquire(timeout=TIMEOUT)
    assert connection.counters().connections == before + 1
    assert not woken.acquire(timeout=0.2)  # once per reconnection


def test_error_frames_from_the_server_keep_their_code(
        mosquitto: MosquittoBroker, connect: ConnectionFactory) -> None:
    fake = ScriptedServer(mosquitto, lambda r: [encode_frame(ErrorFrame(r.request_id, 503,
                                                                        "busy"))])
    try:
        fetcher = MqttFetcher(connect("pi-a"), timeout=TIMEOUT, window=PIPELINE_DEPTH * 2)
        with pytest.raises(exceptions.DownloadHTTPError) as caught:
            fetcher.download_bytes("image/metadata/timestamp.json", 1000)
        assert caught.value.status_code == 503
        assert [r.window for r in fake.requests] == [2]  # the server ended it: no cancel
    finally:
        fake.close()


class HoldRequests(FrameFilter):
    """Holds every request until ``release`` is set, so requests pile up deterministically."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def on_request(self, device_id: str, request: FetchRequest) -> bool:
        assert self.release.wait(TIMEOUT)
        return False  # then the bridge serves it


def test_the_bridge_bounds_requests_per_device_and_ignores_duplicates(
        repo: Repo, mosquitto: MosquittoBroker, make_bridge: BridgeFactory,
        connect: ConnectionFactory) -> None:
    bridge = make_bridge(repo.store, workers=1, max_requests_per_device=1)
    hold = HoldRequests()
    bridge.add_filter(hold)
    fetcher = MqttFetcher(connect("pi-a"), timeout=TIMEOUT, window=WINDOW)
    results: list[bytes] = []
    thread = threading.Thread(
        target=lambda: results.append(fetcher.download_bytes(repo.target, TARGET_SIZE)))
    thread.start()
    wait_for(lambda: bridge.counters().requests == 1, TIMEOUT, "the first request")
    with pytest.raises(exceptions.DownloadHTTPError) as caught:  # one at a time for pi-a
        fetcher.download_bytes("image/metadata/timestamp.json", 1000)
    assert caught.value.status_code == 429
    # A QoS 1 duplicate of an accepted request is recognised, not served twice.
    raw = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dup", protocol=mqtt.MQTTv311)
    raw.connect(mosquitto.host, mosquitto.port)
    raw.loop_start()
    try:
        duplicate = FetchRequest("dup-1", repo.target, 0, 1, TARGET_SIZE)
        for _ in range(2):
            raw.publish(TOPICS.device("pi-b", DeviceTopic.FETCH),
                        encode_request(duplicate), qos=1).wait_for_publish(TIMEOUT)
        wait_for(lambda: bridge.counters().duplicates == 1, TIMEOUT, "the duplicate")
    finally:
        raw.disconnect()
        raw.loop_stop()
    hold.release.set()
    thread.join(TIMEOUT)
    assert results == [repo.data]
    wait_for(lambda: bridge.counters().served_bytes("pi-b", repo.target) == CHUNK, TIMEOUT,
             "one chunk for the single accepted pi-b request")


def test_replicas_share_the_load_through_a_shared_subscription(
        repo: Repo, make_bridge: BridgeFactory, connect: ConnectionFactory,
        tmp_path: Path) -> None:
    replicas = [make_bridge(repo.store, shared_group="fetch") for _ in range(2)]
    connection = connect("pi-a")
    download = ResumableDownload(connection, tmp_path / "dl", timeout=TIMEOUT, window=WINDOW)
    path = download.download(repo.target, length=TARGET_SIZE, sha256=repo.sha256)
    assert path.read_bytes() == repo.data
    counts = [r.counters() for r in replicas]
    # Each window is a self-contained request, so any replica can answer any of them.
    assert sum(c.served_bytes("pi-a", repo.target) for c in counts) == TARGET_SIZE
    request_bytes = MqttFetcher(connection, window=WINDOW).request_window * CHUNK
    assert sum(c.requests for c in counts) == -(-TARGET_SIZE // request_bytes)
    assert all(c.requests > 0 for c in counts)


def test_the_bridge_caches_never_outlive_the_stored_file(
        repo: Repo, make_bridge: BridgeFactory, connect: ConnectionFactory,
        tmp_path: Path) -> None:
    """Target paths and chunk CRCs are cached; a file replaced or swapped for a symlink
    since goes back through the store's checks, and its CRCs are computed again."""
    make_bridge(repo.store)
    fetcher = MqttFetcher(connect("pi-a"), timeout=TIMEOUT, window=WINDOW)
    assert fetcher.download_bytes(repo.target, TARGET_SIZE) == repo.data  # caches filled
    stored = repo.store.target_file_for_request(repo.target.removeprefix("image/targets/"))
    other = os.urandom(TARGET_SIZE)  # same name and size, other bytes: a repaired store
    (tmp_path / "replacement").write_bytes(other)
    os.replace(tmp_path / "replacement", stored)
    assert fetcher.download_bytes(repo.target, TARGET_SIZE) == other  # CRCs of the new file
    outside = tmp_path / "outside"
    outside.write_bytes(repo.data)
    stored.unlink()
    stored.symlink_to(outside)  # planted after the path was cached
    with pytest.raises(exceptions.DownloadHTTPError) as caught:
        fetcher.download_bytes(repo.target, TARGET_SIZE)
    assert caught.value.status_code == 404


def test_cached_metadata_paths_follow_the_store(
        repo: Repo, make_bridge: BridgeFactory, connect: ConnectionFactory,
        tmp_path: Path) -> None:
    """Metadata paths are cached too: a timestamp moved on, a file swapped for a symlink
    and a removed device's folder are all seen at the next request."""
    make_bridge(repo.store)
    fetcher = MqttFetcher(connect("pi-a"), timeout=TIMEOUT, window=WINDOW)
    timestamp = url("director/pi-a/metadata/timestamp.json")
    assert b'"version": 2' in fetcher.download_bytes(timestamp, 10_000)  # cached now
    repo.store.write_metadata("director/pi-a", "timestamp", 3,
                              b'{"signed": {"_type": "timestamp", "version": 3}}')
    assert b'"version": 3' in fetcher.download_bytes(timestamp, 10_000)

    pointer = repo.store.metadata_file_for_request("director/pi-a", "timestamp.json")
    outside = tmp_path / "outside.json"
    outside.write_bytes(b'{"signed": {"_type": "timestamp", "version": 9}}')
    pointer.unlink()
    pointer.symlink_to(outside)  # planted after the path was cached
    with pytest.raises(exceptions.DownloadHTTPError) as caught:
        fetcher.download_bytes(timestamp, 10_000)
    assert caught.value.status_code == 404

    version_two = url("director/pi-a/metadata/2.timestamp.json")
    assert b'"version": 2' in fetcher.download_bytes(version_two, 10_000)
    shutil.rmtree(pointer.parent.parent)  # the device is gone from the director
    with pytest.raises(exceptions.DownloadHTTPError) as caught:
        fetcher.download_bytes(version_two, 10_000)
    assert caught.value.status_code == 404


def test_a_complete_download_with_the_wrong_hash_is_refused_and_discarded(
        repo: Repo, make_bridge: BridgeFactory, connect: ConnectionFactory,
        tmp_path: Path) -> None:
    make_bridge(repo.store)
    stored = repo.store.target_file_for_request(repo.target.removeprefix("image/targets/"))
    stored.write_bytes(b"\x00" * TARGET_SIZE)  # same size, other content: a damaged store
    download = ResumableDownload(connect("pi-a"), tmp_path / "dl", timeout=TIMEOUT,
                                 window=WINDOW)
    with pytest.raises(exceptions.LengthOrHashMismatchError):
        download.download(repo.target, length=TARGET_SIZE, sha256=repo.sha256)
    assert not download.partial_path(repo.sha256).exists()
    assert not download.progress_path(repo.sha256).exists()
    assert not (tmp_path / "dl" / repo.sha256).exists()


def test_a_frame_filter_is_installed_once_and_removed_once(repo: Repo) -> None:
    """The interception seam refuses a double install or removal instead of hiding the slip."""
    bridge = FetchBridge(repo.store, host="127.0.0.1", port=1, client_id="unstarted")
    hold = HoldRequests()
    bridge.add_filter(hold)
    with pytest.raises(ValueError, match="already installed"):
        bridge.add_filter(hold)
    bridge.remove_filter(hold)
    with pytest.raises(ValueError, match="not installed"):
        bridge.remove_filter(hold)
