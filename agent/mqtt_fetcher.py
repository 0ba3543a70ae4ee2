"""A ``tuf.ngclient`` fetcher over MQTT, and resumable target downloads on top of it.

:class:`DeviceConnection` is the device's one MQTT connection: paho runs its
network loop in its own thread (or, for many simulated devices in one process,
a :class:`~edgeota.agent.mqtt_loop.SharedNetworkLoop` drives it), reconnects
with exponential backoff (each device's delays jittered so a fleet does not
reconnect in lock-step after a broker restart), subscribes to the device's own
``rx`` topic and routes each incoming frame by request id to the fetch waiting
for it.

:class:`MqttFetcher` implements ngclient's ``FetcherInterface``. The Updater
is configured with ``mqtt://`` base URLs whose path is the repository path,
the same paths as HTTP ``/repo/`` (:data:`MQTT_REPOSITORY_URL` +
``/image/metadata/``, ``/image/targets/``, ``/director/{id}/metadata/``); the
host part is only a label, the broker is the connection's. A bare repository
path (``image/metadata/timestamp.json``) is accepted too. The fetcher keeps
ngclient's error contract: error frames become ``DownloadHTTPError`` with
their code (403/404 mean "no such file" to ngclient), a server that stops
sending becomes ``SlowRetrievalError`` after ``timeout`` seconds, bytes beyond
what ngclient allows become ``DownloadLengthMismatchError``, and every frame
that is damaged, out of order or inconsistent ends the fetch with
:class:`FrameRejectedError`. All of them are ``DownloadError`` subclasses.
Whenever a fetch ends early its request id is unregistered (later frames are
dropped) and a cancel is sent, so the server stops too.

:class:`ResumableDownload` fetches a target into ``{sha256}.partial`` with a
progress record beside it, persisted after every chunk, so a disconnect or a
restart of the whole agent resumes at the last complete chunk and never
fetches a finished chunk again; the sha256 is checked at the end.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import random
import re
import secrets
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from tuf.api import exceptions
from tuf.ngclient import FetcherInterface

from edgeota.agent.mqtt_loop import SharedNetworkLoop
from edgeota.protocol.fetch import (
    MAX_OFFSET,
    MAX_WINDOW,
    ChunkFrame,
    ErrorFrame,
    FetchRequest,
    FrameError,
    MqttTls,
    decode_frame,
    encode_request,
)
from edgeota.protocol.files import atomic_write
from edgeota.protocol.telemetry import presence_bytes
from edgeota.protocol.topics import DeviceTopic, Topics

__all__ = [
    "MQTT_REPOSITORY_URL",
    "ConnectionCounters",
    "ConnectionLostError",
    "DeviceConnection",
    "DownloadStats",
    "FrameRejectedError",
    "MqttFetchError",
    "MqttFetcher",
    "ResumableDownload",
    "repository_path",
]

logger = logging.getLogger(__name__)

_PRESENCE_ONLINE = presence_bytes(online=True)
_PRESENCE_OFFLINE = presence_bytes(online=False)
MQTT_REPOSITORY_URL = "mqtt://edgeota"  # AgentConfig.repository_url for the MQTT transport
_URL_SCHEMES = ("mqtt", "mqtts")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_PROGRESS_VERSION = 1
_HASH_BLOCK = 1024 * 1024  # bytes read at a time when verifying a finished download


class MqttFetchError(exceptions.DownloadError):
    """Base of the MQTT transport's own failures; network-side, so callers may retry."""


class ConnectionLostError(MqttFetchError):
    """The broker connection dropped (or never came up) while a fetch needed it."""


class FrameRejectedError(MqttFetchError):
    """A frame that is damaged, out of order, or contradicts the frames before it."""


def repository_path(url: str) -> str:
    """The repository path of an ``mqtt://`` URL (or of a bare path).

    Raises:
        exceptions.DownloadError: another scheme, a query or fragment, or no path.
    """
    if "://" in url:
        parts = urlsplit(url)
        if parts.scheme not in _URL_SCHEMES or parts.query or parts.fragment:
            raise exceptions.DownloadError(f"not an mqtt:// repository URL: {url[:200]!r}")
        path = unquote(parts.path).lstrip("/")
    else:
        path = url
    if not path:
        raise exceptions.DownloadError(f"no repository path in {url[:200]!r}")
    return path


@dataclass(frozen=True)
class ConnectionCounters:
    """What arrived on ``rx`` and was not delivered to a fetch (snapshot)."""

    frames: int = 0
    corrupt: int = 0  # undecodable frames
    stray: int = 0  # frames for no waiting fetch (another or an old request id)
    connections: int = 0  # times connected and subscribed


class _Failure:
    """Something that ends a fetch, queued in order with its frames."""

    def __init__(self, error: exceptions.DownloadError) -> None:
        self.error = error


_Item = ChunkFrame | ErrorFrame | _Failure


class _Inbox:
    """Frames for one request id; bounded, so a flooding sender cannot exhaust memory."""

    def __init__(self, capacity: int) -> None:
        self._items: collections.deque[_Item] = collections.deque()
        self._cond = threading.Condition()
        self._capacity = capacity
        self._flooded = False

    def put(self, item: _Item) -> None:
        with self._cond:
            if self._flooded:
                return
            if len(self._items) >= self._capacity and not isinstance(item, _Failure):
                self._flooded = True
                self._items.append(_Failure(FrameRejectedError(
                    f"more than {self._capacity} frames queued for one request")))
            else:
                self._items.append(item)
            self._cond.notify()

    def get(self, timeout: float) -> _Item | None:
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._items), timeout):
                return None
            return self._items.popleft()


class DeviceConnection:
    """One device's MQTT connection, shared by all its fetches (thread-safe).

    With ``network`` the connection runs on that shared loop instead of a paho
    thread of its own; everything else behaves the same.
    """

    def __init__(
        self,
        device_id: str,
        *,
        host: str,
        port: int,
        topics: Topics | None = None,
        tls: MqttTls | None = None,
        client_id: str | None = None,
        keepalive: int = 30,
        reconnect_min_delay: float = 1.0,  # seconds, before jitter
        reconnect_max_delay: float = 60.0,  # seconds, before jitter
        rng: random.Random | None = None,
        network: SharedNetworkLoop | None = None,
    ) -> None:
        self._topics = topics or Topics()
        self._network = network
        self.device_id = device_id
        self._rx = self._topics.device(device_id, DeviceTopic.RX)
        self._notify = self._topics.device(device_id, DeviceTopic.NOTIFY)
        # Called (on paho's thread: keep it short) when the server says the
        # device's director metadata changed; the agent uses it to check now.
        self.on_notify: Callable[[], None] | None = None
        self._fetch_topic = self._topics.device(device_id, DeviceTopic.FETCH)
        self._host, self._port, self._keepalive = host, port, keepalive
        self._lock = threading.Lock()
        self._streams: dict[str, _Inbox] = {}
        self._counts = {"frames": 0, "corrupt": 0, "stray": 0, "connections": 0}
        self._ready = threading.Condition()
        self._is_ready = False
        self._subscribe_mid: int | None = None
        self._started = False
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or device_id,
            clean_session=True, protocol=mqtt.MQTTv311,
        )
        if tls is not None:
            self._client.tls_set(
                ca_certs=str(tls.ca_file),
                certfile=str(tls.cert_file) if tls.cert_file else None,
                keyfile=str(tls.key_file) if tls.key_file else None,
            )
        # Jitter: one random factor per connection scales the whole backoff
        # sequence, so devices cut off together come back spread out.
        factor = (rng or random.Random()).uniform(0.5, 1.5)  # noqa: S311 (not for secrets)
        self._reconnect_delays = (reconnect_min_delay * factor, reconnect_max_delay * factor)
        self._client.reconnect_delay_set(*self._reconnect_delays)  # type: ignore[arg-type]
        # Presence: the broker announces "offline" for us if we vanish without goodbye.
        self._online_topic = self._topics.device(device_id, DeviceTopic.ONLINE)
        self._client.will_set(self._online_topic, _PRESENCE_OFFLINE, qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_socket_open = _no_delay
        # A bug in one message handler must not end the network thread: paho logs
        # the exception (to this module's logger) and carries on.
        self._client.suppress_exceptions = True
        self._client.enable_logger(logger)
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> DeviceConnection:
        """Start connecting in paho's thread (retrying with backoff); returns at once."""
        if self._started:
            raise RuntimeError("connection already started")
        self._started = True
        if self._network is not None:
            low, high = self._reconnect_delays
            self._network.connect(self._client, self._host, self._port, self._keepalive,
                                  min_delay=low, max_delay=high, name=self.device_id)
            return self
        self._client.connect_async(self._host, self._port, self._keepalive)
        self._client.loop_start()
        return self

    def close(self) -> None:
        """Disconnect and stop paho's thread; waiting fetches fail with ConnectionLostError."""
        # paho 2.2's network loop may run once more after disconnect and log
        # "Client is not connected" as an error: noise when we are closing on purpose.
        self._client.disable_logger()
        if self._network is not None:
            self._network.remove(self._client)  # disconnects cleanly, bounded
        else:
            self._client.disconnect()
            self._client.loop_stop()
        self._lost("connection closed")

    def __enter__(self) -> DeviceConnection:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def ready(self) -> bool:
        """Connected and subscribed to ``rx``: requests sent now can be answered."""
        with self._ready:
            return self._is_ready

    def wait_ready(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for :attr:`ready`."""
        with self._ready:
            return self._ready.wait_for(lambda: self._is_ready, timeout)

    def counters(self) -> ConnectionCounters:
        with self._lock:
            return ConnectionCounters(**self._counts)

    def active_requests(self) -> int:
        """Request ids currently registered (0 once every fetch has ended)."""
        with self._lock:
            return len(self._streams)

    # -- used by fetches ----------------------------------------------------

    def open_stream(self, request_id: str, capacity: int) -> _Inbox:
        inbox = _Inbox(capacity)
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id} is in use")
            self._streams[request_id] = inbox
        return inbox

    def close_stream(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)

    def send(self, request: FetchRequest) -> None:
        """Publish a request (QoS 1).

        Raises:
            ConnectionLostError: not connected; nothing is queued for later,
                since the fetch that wanted it is failing now.
        """
        if not self.ready:
            raise ConnectionLostError("not connected to the broker")
        info = self._client.publish(self._fetch_topic, encode_request(request), qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionLostError(f"request not sent: {mqtt.error_string(info.rc)}")

    def drop(self) -> bool:
        """Cut the TCP connection as a network fault would (no DISCONNECT sent).

        The broker sees the device vanish (its last will goes out) and the
        connection reconnects by itself, as after a real outage. Used by the
        simulator's link profiles; True if there was a connection to cut.
        """
        sock = self._client.socket()
        if sock is None:
            return False
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            return False
        return True

    def publish(self, kind: DeviceTopic, payload: bytes, *, retain: bool = False) -> bool:
        """Publish on one of this device's own topics (QoS 1); False when not connected.

        Status reports are retained so the server sees the latest one even if
        it (re)subscribes later; the broker ACL admits only this device's topics.
        """
        if not self.ready:
            return False
        info = self._client.publish(self._topics.device(self.device_id, kind), payload, qos=1,
                                    retain=retain)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    # -- paho callbacks (network thread) -------------------------------------

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any,
                    reason_code: Any, _properties: Any) -> None:
        if reason_code.is_failure:
            logger.warning("broker refused %s: %s", self.device_id, reason_code)
            return
        client.publish(self._online_topic, _PRESENCE_ONLINE, qos=1, retain=True)
        _rc, self._subscribe_mid = client.subscribe([(self._rx, 1), (self._notify, 1)])

    def _on_subscribe(self, _client: mqtt.Client, _userdata: Any, mid: int,
                      reason_codes: list[Any], _properties: Any) -> None:
        if mid != self._subscribe_mid:
            return
        if any(rc.is_failure for rc in reason_codes):
            logger.error("broker refused %s the subscription to %s", self.device_id, self._rx)
            return
        with self._lock:
            self._counts["connections"] += 1
        with self._ready:
            self._is_ready = True
            self._ready.notify_all()

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any,
                       reason_code: Any, _properties: Any) -> None:
        self._lost(f"disconnected from the broker ({reason_code})")

    def _lost(self, why: str) -> None:
        # Not ready first: a fetch woken by the failure must not see a stale "ready".
        with self._ready:
            self._is_ready = False
            self._ready.notify_all()
        with self._lock:
            inboxes = list(self._streams.values())
        for inbox in inboxes:
            inbox.put(_Failure(ConnectionLostError(why)))

    def _on_message(self, _client: mqtt.Client, _userdata: Any,
                    message: mqtt.MQTTMessage) -> None:
        if message.topic == self._notify:
            callback = self.on_notify
            if callback is not None:
                callback()
            return
        try:
            frame = decode_frame(message.payload)
        except FrameError as e:
            with self._lock:
                self._counts["corrupt"] += 1
                inbox = self._streams.get(e.request_id) if e.request_id else None
            if inbox is not None:
                inbox.put(_Failure(FrameRejectedError(f"bad frame: {e}")))
            else:
                logger.warning("dropped an undecodable frame for %s: %s", self.device_id, e)
            return
        with self._lock:
            self._counts["frames"] += 1
            inbox = self._streams.get(frame.request_id)
            if inbox is None:
                self._counts["stray"] += 1
                return
        inbox.put(frame)


class MqttFetcher(FetcherInterface):
    """ngclient's network layer over a :class:`DeviceConnection`."""

    def __init__(
        self,
        connection: DeviceConnection,
        *,
        timeout: float = 30.0,  # seconds without a frame before SlowRetrievalError
        window: int = 8,  # chunks per request
        max_length: int = MAX_OFFSET,  # bound for plain fetch(); download_* pass their own
    ) -> None:
        if not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"window must be 1..{MAX_WINDOW}")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._connection = connection
        self._timeout = timeout
        self._window = window
        self._max_length = max_length

    def stream(self, path: str, *, offset: int = 0,
               max_length: int = MAX_OFFSET) -> Iterator[ChunkFrame]:
        """Yield the frames of ``path`` from ``offset`` on, checked and in order.

        Closing the generator early (the consumer stopped) cancels the request.

        Raises:
            exceptions.DownloadHTTPError: the server answered an error frame.
            exceptions.SlowRetrievalError: no frame for ``timeout`` seconds.
            exceptions.DownloadLengthMismatchError: the file exceeds ``max_length``.
            FrameRejectedError: a damaged, out-of-order or inconsistent frame.
            ConnectionLostError: the broker connection dropped.
        """
        rid = secrets.token_hex(8)
        try:
            request = FetchRequest(rid, path, offset, self._window, max_length)
        except FrameError as e:
            raise exceptions.DownloadError(f"cannot request {path[:200]!r}: {e}") from e
        inbox = self._connection.open_stream(rid, capacity=2 * self._window + 4)
        finished = False
        try:
            if not self._connection.wait_ready(self._timeout):
                raise ConnectionLostError(f"not connected within {self._timeout}s")
            self._connection.send(request)
            expected, in_window = offset, 0
            first: ChunkFrame | None = None
            while True:
                item = inbox.get(self._timeout)
                if item is None:
                    raise exceptions.SlowRetrievalError(
                        f"no data for {path} within {self._timeout}s")
                if isinstance(item, _Failure):
                    raise item.error
                if isinstance(item, ErrorFrame):
                    finished = True  # the server ended the request itself
                    raise exceptions.DownloadHTTPError(
                        f"{item.code} for {path}: {item.message}", item.code)
                self._check(item, first, expected, max_length, path)
                first = first or item
                expected += len(item.payload)
                if item.last:
                    finished = True
                yield item
                if finished:
                    return
                in_window += 1
                if in_window == self._window:
                    in_window = 0
                    self._connection.send(FetchRequest(rid, path, expected, self._window,
                                                       max_length))
        finally:
            self._connection.close_stream(rid)
            if not finished:
                self._cancel(rid, path, max_length)

    @staticmethod
    def _check(frame: ChunkFrame, first: ChunkFrame | None, expected: int, max_length: int,
               path: str) -> None:
        if frame.total > max_length:
            raise exceptions.DownloadLengthMismatchError(
                f"{path} is {frame.total} bytes, more than the {max_length} allowed")
        if frame.offset != expected:
            raise FrameRejectedError(
                f"chunk of {path} at offset {frame.offset}, expected {expected}")
        if first is not None and (frame.total, frame.file_id) != (first.total, first.file_id):
            raise FrameRejectedError(f"{path} changed during the download")

    def _cancel(self, rid: str, path: str, max_length: int) -> None:
        """Best effort: tell the server to stop; it stops anyway after the current window."""
        with contextlib.suppress(ConnectionLostError):
            self._connection.send(FetchRequest(rid, path, 0, 0, max_length))

    def _fetch(self, url: str) -> Iterator[bytes]:
        path = repository_path(url)
        return (frame.payload for frame in self.stream(path, max_length=self._max_length))

    @contextlib.contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        """ngclient's ``download_file``, passing ``max_length`` to the server as ``max``.

        The server then refuses an oversized file before sending a byte, and
        the stream stops at ``max_length`` whatever the server claims.
        """
        path = repository_path(url)
        with tempfile.TemporaryFile() as temp_file:
            for frame in self.stream(path, max_length=max_length):
                temp_file.write(frame.payload)
            temp_file.seek(0)
            yield temp_file


@dataclass(frozen=True)
class _Progress:
    sha256: str
    length: int
    offset: int  # bytes of the partial file that are written and synced

    def to_bytes(self) -> bytes:
        return json.dumps({"v": _PROGRESS_VERSION, "sha256": self.sha256,
                           "length": self.length, "offset": self.offset}).encode()

    @classmethod
    def load(cls, path: Path, sha256: str, length: int) -> _Progress:
        """The saved progress, or a fresh start if there is none or it does not fit."""
        try:
            obj = json.loads(path.read_bytes()[:4096])
            saved = cls(obj["sha256"], obj["length"], obj["offset"])
            ok = (obj.get("v") == _PROGRESS_VERSION and saved.sha256 == sha256
                  and saved.length == length and isinstance(saved.offset, int)
                  and 0 <= saved.offset <= length)
        except FileNotFoundError:
            return cls(sha256, length, 0)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            logger.warning("ignoring unusable progress record %s", path)
            return cls(sha256, length, 0)
        return saved


@dataclass
class DownloadStats:
    """What resumable downloads did, summed over a device's life (read by the simulator)."""

    completed: int = 0
    bytes_fetched: int = 0  # payload bytes received, re-fetched ones included
    resumes: int = 0  # continuations from a saved offset: after a drop, or a restart
    full_restarts: int = 0  # downloads thrown away (wrong digest) to begin again


class ResumableDownload:
    """Download targets into ``folder`` so that no finished chunk is ever fetched twice.

    Layout: ``{sha256}.partial`` (bytes so far), ``{sha256}.progress`` (how many
    of them are synced), and ``{sha256}`` once complete and verified.
    """

    def __init__(
        self,
        connection: DeviceConnection,
        folder: Path,
        *,
        timeout: float = 30.0,  # seconds without a frame
        window: int = 8,
        max_retries: int = 5,  # consecutive failed attempts without progress
        reconnect_timeout: float = 120.0,  # seconds to wait for the broker per attempt
        on_progress: Callable[[int, int], None] | None = None,  # (offset, length)
        stats: DownloadStats | None = None,
    ) -> None:
        self._connection = connection
        self.stats = stats if stats is not None else DownloadStats()
        self._window = window
        self._fetcher = MqttFetcher(connection, timeout=timeout, window=window)
        self._folder = Path(folder)
        self._max_retries = max_retries
        self._reconnect_timeout = reconnect_timeout
        self._on_progress = on_progress

    def partial_path(self, sha256: str) -> Path:
        return self._folder / f"{sha256}.partial"

    def progress_path(self, sha256: str) -> Path:
        return self._folder / f"{sha256}.progress"

    def saved_offset(self, sha256: str, length: int) -> int:
        """Bytes already downloaded and synced for this target."""
        return _Progress.load(self.progress_path(sha256), sha256, length).offset

    def download(self, url: str, *, length: int, sha256: str) -> Path:
        """Fetch the target at ``url`` (repository path or ``mqtt://`` URL); return its file.

        Raises:
            exceptions.LengthOrHashMismatchError: the complete file has another
                sha256 (the partial files are removed: the next try starts over).
            exceptions.DownloadHTTPError: the server refused (404, 403, ...).
            exceptions.DownloadError: the transfer failed ``max_retries`` times
                in a row without progress, or the broker stayed away.
        """
        if _SHA256_RE.fullmatch(sha256) is None:
            raise ValueError("sha256 must be 64 lower-case hex digits")
        if not 0 <= length <= MAX_OFFSET:
            raise ValueError("length out of range")
        path = repository_path(url)
        final = self._folder / sha256
        if final.exists() and _sha256_of(final) == sha256:
            return final
        self._folder.mkdir(parents=True, exist_ok=True)
        partial = self.partial_path(sha256)
        progress = _Progress.load(self.progress_path(sha256), sha256, length)
        if progress.offset:
            self.stats.resumes += 1  # picked up after an agent restart
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            # Bytes past the synced offset may be torn by a crash: never trust them.
            os.ftruncate(fd, progress.offset)
            self._fill(fd, path, progress)
        finally:
            os.close(fd)
        if (actual := _sha256_of(partial)) != sha256:
            partial.unlink(missing_ok=True)
            self.progress_path(sha256).unlink(missing_ok=True)
            self.stats.full_restarts += 1
            raise exceptions.LengthOrHashMismatchError(
                f"{path}: downloaded sha256 {actual}, expected {sha256}")
        partial.replace(final)
        self.progress_path(sha256).unlink(missing_ok=True)
        self.stats.completed += 1
        return final

    def _fill(self, fd: int, path: str, progress: _Progress) -> None:
        """Fetch until the partial file holds ``progress.length`` bytes, retrying transfers.

        Progress is made durable once per window (data ``fdatasync``'d, then the
        record replaced), not per chunk: an SD card pays three syncs per save,
        and a crash re-fetches at most one window, which the window bounds anyway.
        """
        expected_id = bytes.fromhex(progress.sha256)
        failures = 0
        saved = progress.offset
        unsaved_frames = 0

        def save() -> None:
            nonlocal saved, unsaved_frames
            unsaved_frames = 0
            if progress.offset != saved:
                os.fdatasync(fd)
                atomic_write(self.progress_path(progress.sha256), progress.to_bytes(),
                             mode=0o600)
                saved = progress.offset

        while progress.offset < progress.length:
            try:
                for frame in self._fetcher.stream(path, offset=progress.offset,
                                                  max_length=progress.length):
                    if frame.total != progress.length or (
                            frame.content_id and frame.file_id != expected_id):
                        raise exceptions.LengthOrHashMismatchError(
                            f"{path}: the server offers another file ({frame.total} bytes)")
                    os.pwrite(fd, frame.payload, frame.offset)
                    self.stats.bytes_fetched += len(frame.payload)
                    progress = _Progress(progress.sha256, progress.length,
                                         frame.offset + len(frame.payload))
                    unsaved_frames += 1
                    if unsaved_frames >= self._window or frame.last:
                        save()
                    failures = 0
                    if self._on_progress is not None:
                        self._on_progress(progress.offset, progress.length)
            except (ConnectionLostError, FrameRejectedError,
                    exceptions.SlowRetrievalError) as e:
                save()  # keep what arrived before the interruption
                failures += 1
                if failures > self._max_retries:
                    raise
                logger.info("download of %s interrupted at %d (%s); resuming",
                            path, progress.offset, e)
                self.stats.resumes += 1
                if not self._connection.wait_ready(self._reconnect_timeout):
                    raise ConnectionLostError(
                        f"broker unreachable for {self._reconnect_timeout}s") from e
        save()


def _sha256_of(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            hasher.update(block)
    return hasher.hexdigest()


def _no_delay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    """Turn off Nagle: a fetch is request/response, and small frames must not wait 40 ms."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
