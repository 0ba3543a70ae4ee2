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
that is damaged, inconsistent, a duplicate, off the chunk grid or outside the
windows asked for ends the fetch with :class:`FrameRejectedError` (a frame
merely ahead of its turn, inside what was asked, waits for its turn). All of
them are ``DownloadError`` subclasses.
Whenever a fetch ends early its request id is unregistered (later frames are
dropped) and a cancel is sent, so the server stops too.

:class:`ResumableDownload` fetches a target into ``{sha256}.partial`` with
progress records in the file's tail: one rewritten after every chunk (a
``pwrite``, no sync) and two made durable in turn, once per request, on a
saver thread beside the transfer. A record names an offset and the sha256 of
the file's bytes up to it, so loading believes a record only if the bytes on
disk hash to it. A disconnect (the process lives on) resumes from the last
byte written and a restart of the whole agent from the last chunk written
(the page cache survives a killed process): neither fetches a received byte
again, each costs at most what the server had in flight, one window. A power
cut resumes from the last durable record (at most a request's worth of
chunks older). The sha256 is computed while the bytes arrive (one streaming
pass) and checked at the end.

The *window* is the number of chunks a fetch keeps in flight. It is asked for
as :data:`~edgeota.protocol.fetch.PIPELINE_DEPTH` requests of a share of it
each (see :mod:`edgeota.protocol.fetch`): after the first chunk, the next
request goes out as soon as it fits in the window, so the round trip of a
request does not stall the transfer.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import random
import re
import secrets
import socket
import struct
import tempfile
import threading
import zlib
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
    PIPELINE_DEPTH,
    ChunkFrame,
    ErrorFrame,
    FetchRequest,
    FrameError,
    MqttTls,
    decode_frame,
    encode_request,
)
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
    "saved_offset",
]

logger = logging.getLogger(__name__)

_PRESENCE_ONLINE = presence_bytes(online=True)
_PRESENCE_OFFLINE = presence_bytes(online=False)
MQTT_REPOSITORY_URL = "mqtt://edgeota"  # AgentConfig.repository_url for the MQTT transport
_URL_SCHEMES = ("mqtt", "mqtts")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_RECORD_MAGIC = b"EOTP"
_RECORD_VERSION = 2
_RECORD = struct.Struct(">4sBQ32s")  # magic, version, offset, sha256 of the bytes before it
_CHECK = struct.Struct(">I")  # CRC-32 of the record: a torn slot is ignored
_SLOT = 64  # bytes per progress record slot, after the file's bytes
_DURABLE_SLOTS = (0, 1)  # written in turn by the saver, each followed by an fdatasync
_LATEST_SLOT = 2  # rewritten after every chunk, never synced
_SLOTS = 3
_HASH_BLOCK = 1024 * 1024  # bytes read at a time when hashing a file
DEFAULT_WINDOW = 32  # chunks in flight: PIPELINE_DEPTH (4) requests of 8


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
            if not self._items and not self._cond.wait_for(lambda: bool(self._items), timeout):
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
        # device's director metadata changed, and on every reconnection (a
        # notify sent while the link was down is lost: QoS 1 to a clean
        # session); the agent uses it to check now instead of at its next poll.
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
        # Frames come at QoS 0 (the broker downgrades the server's QoS 1): the fetch
        # protocol acknowledges by asking for the next window, and a frame lost with a
        # dropped link is lost at QoS 1 too (clean session), so a PUBACK per 64 KiB
        # chunk would be a second acknowledgement that buys nothing. Mosquitto 2.0 drops
        # QoS 0 to a connected client only past max_queued_messages packets queued for it
        # (1000 in the config edgeota writes), far above a device's window (32 frames).
        # A notify stays QoS 1: it is small, rare and has no other acknowledgement.
        _rc, self._subscribe_mid = client.subscribe([(self._rx, 0), (self._notify, 1)])

    def _on_subscribe(self, _client: mqtt.Client, _userdata: Any, mid: int,
                      reason_codes: list[Any], _properties: Any) -> None:
        if mid != self._subscribe_mid:
            return
        if any(rc.is_failure for rc in reason_codes):
            logger.error("broker refused %s the subscription to %s", self.device_id, self._rx)
            return
        with self._lock:
            self._counts["connections"] += 1
            reconnected = self._counts["connections"] > 1
        with self._ready:
            self._is_ready = True
            self._ready.notify_all()
        callback = self.on_notify
        if reconnected and callback is not None:
            callback()

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
        window: int = DEFAULT_WINDOW,  # chunks in flight, asked for in PIPELINE_DEPTH requests
        max_length: int = MAX_OFFSET,  # bound for plain fetch(); download_* pass their own
    ) -> None:
        if not 1 <= window <= PIPELINE_DEPTH * MAX_WINDOW:
            raise ValueError(f"window must be 1..{PIPELINE_DEPTH * MAX_WINDOW}")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._connection = connection
        self._timeout = timeout
        self._window = window
        # Chunks per request: the window's share (rounded up), so that a request
        # goes out while the one before it is still arriving.
        self._request_window = -(-window // PIPELINE_DEPTH)
        self._max_length = max_length

    @property
    def request_window(self) -> int:
        """Chunks asked for per request (what a server's ``max_window`` must allow)."""
        return self._request_window

    def stream(self, path: str, *, offset: int = 0,
               max_length: int = MAX_OFFSET) -> Iterator[ChunkFrame]:
        """Yield the frames of ``path`` from ``offset`` on, checked and in order.

        Pipelined: once the first chunk has told the chunk size and the file's
        size, the next request goes out whenever it fits in the window, so at
        most ``window`` chunks are ever asked for and not yet yielded; frames
        that arrive ahead of their turn (requests served by different replicas)
        wait in a buffer bounded by what was asked for. Closing the generator
        early (the consumer stopped) cancels the request.

        Raises:
            exceptions.DownloadHTTPError: the server answered an error frame.
            exceptions.SlowRetrievalError: no frame for ``timeout`` seconds.
            exceptions.DownloadLengthMismatchError: the file exceeds ``max_length``.
            FrameRejectedError: a damaged, out-of-order or inconsistent frame.
            ConnectionLostError: the broker connection dropped.
        """
        rid = secrets.token_hex(8)
        step = self._request_window
        try:
            request = FetchRequest(rid, path, offset, step, max_length)
        except FrameError as e:
            raise exceptions.DownloadError(f"cannot request {path[:200]!r}: {e}") from e
        inbox = self._connection.open_stream(rid, capacity=self._window + 4)
        finished = False
        try:
            if not self._connection.wait_ready(self._timeout):
                raise ConnectionLostError(f"not connected within {self._timeout}s")
            self._connection.send(request)
            expected = offset  # the next byte to yield
            asked = -1  # end of the windows asked for, once the chunk size is known
            chunk = 0
            first: ChunkFrame | None = None
            ahead: dict[int, ChunkFrame] = {}  # frames that came before their turn
            while True:
                frame = ahead.pop(expected, None)
                if frame is None:
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
                    self._check(item, first, expected, max_length, path, chunk, asked)
                    if first is None:
                        first = item
                        if not item.last:
                            chunk = len(item.payload)
                            asked = offset + step * chunk
                    if item.offset != expected:
                        if item.offset in ahead:
                            raise FrameRejectedError(
                                f"chunk of {path} at offset {item.offset} received twice")
                        ahead[item.offset] = item
                        continue
                    frame = item
                expected += len(frame.payload)
                if frame.last:
                    finished = True
                    yield frame
                    return
                # Keep the pipeline full: ask for the next request as soon as it
                # fits in the window, never beyond the end of the file; before
                # handing the frame on, so that what the consumer does with it (a
                # write, waiting for a progress save) does not delay the ask.
                span, budget = step * chunk, self._window * chunk
                lost: ConnectionLostError | None = None
                try:
                    while asked < frame.total and asked + span - expected <= budget:
                        self._connection.send(FetchRequest(rid, path, asked, step, max_length))
                        asked += span
                except ConnectionLostError as e:
                    lost = e  # after the frame: a received byte is never fetched again
                yield frame
                if lost is not None:
                    raise lost
        finally:
            self._connection.close_stream(rid)
            if not finished:
                self._cancel(rid, path, max_length)

    @staticmethod
    def _check(frame: ChunkFrame, first: ChunkFrame | None, expected: int, max_length: int,
               path: str, chunk: int, asked: int) -> None:
        """Refuse a frame that is not a next piece of what was asked for.

        Before the chunk size is known (``chunk`` 0) the frame must be the very
        next one; after, it may be ahead of its turn, but it must sit on a chunk
        boundary inside the windows asked for, and only the file's last chunk
        may be shorter than the others.
        """
        if frame.total > max_length:
            raise exceptions.DownloadLengthMismatchError(
                f"{path} is {frame.total} bytes, more than the {max_length} allowed")
        if first is not None and (frame.total, frame.file_id) != (first.total, first.file_id):
            raise FrameRejectedError(f"{path} changed during the download")
        if frame.offset == expected and not chunk:
            return
        end = frame.offset + len(frame.payload)
        if (not chunk or frame.offset < expected or end > asked
                or (frame.offset - expected) % chunk
                or (len(frame.payload) != chunk and not frame.last)):
            raise FrameRejectedError(
                f"chunk of {path} at offset {frame.offset} ({len(frame.payload)} bytes), "
                f"expected {expected}")

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
class _Record:
    """A progress record, kept in a slot in the tail of ``{sha256}.partial``.

    ``offset`` bytes of the target are in the file, and ``digest`` is their
    sha256. Loading hashes the file's bytes (which resuming does anyway, to go
    on with the target's streaming sha256) and believes the largest record
    they match, so no write order between data and records matters: a record
    whose bytes did not reach the disk, or was written over a torn tail, does
    not match and a smaller one is used. Each slot carries a CRC-32 of its own,
    so a torn record is ignored. The records live in the partial file itself:
    one ``fdatasync`` makes data and record durable, where a record file of
    its own costs three syncs per save (data, temp file, folder).
    """

    offset: int
    digest: bytes  # sha256 of the file's bytes [0, offset)

    def to_bytes(self) -> bytes:
        body = _RECORD.pack(_RECORD_MAGIC, _RECORD_VERSION, self.offset, self.digest)
        return (body + _CHECK.pack(zlib.crc32(body))).ljust(_SLOT, b"\x00")

    @classmethod
    def parse(cls, slot: bytes, length: int) -> _Record | None:
        if len(slot) < _RECORD.size + _CHECK.size:
            return None
        body = slot[:_RECORD.size]
        (check,) = _CHECK.unpack_from(slot, _RECORD.size)
        if zlib.crc32(body) != check:
            return None
        magic, version, offset, digest = _RECORD.unpack(body)
        if magic != _RECORD_MAGIC or version != _RECORD_VERSION or not 0 < offset <= length:
            return None
        return cls(offset, digest)


def saved_offset(partial: Path, length: int) -> int:
    """Bytes of the ``{sha256}.partial`` of a ``length``-byte target that a resume keeps.

    Hashes what the records claim (at most ``length`` bytes) to check it.
    """
    try:
        fd = os.open(partial, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return 0
    try:
        return _load_progress(fd, length)[0]
    finally:
        os.close(fd)


def _load_progress(fd: int, length: int) -> tuple[int, Any]:
    """The largest recorded offset whose bytes on disk match, with their sha256 object.

    Nothing matching (no record, torn records, bytes lost in a power cut, a
    file from an earlier version or of another size) is a fresh start: offset
    0. A complete file whose records were dropped but which was not renamed
    yet is recognised by :meth:`ResumableDownload.download` by its hash first.
    """
    hasher = hashlib.sha256()
    if os.fstat(fd).st_size < length + _SLOT:
        return 0, hasher
    slots = os.pread(fd, _SLOTS * _SLOT, length)
    records = [r for i in range(_SLOTS)
               if (r := _Record.parse(slots[i * _SLOT:(i + 1) * _SLOT], length)) is not None]
    if not records and any(slots):
        logger.warning("ignoring unusable progress records")
    best, best_hasher, position = 0, hasher.copy(), 0
    for record in sorted(records, key=lambda r: r.offset):
        _hash_range(fd, hasher, position, record.offset)
        position = record.offset
        if hasher.digest() == record.digest:
            best, best_hasher = record.offset, hasher.copy()
    return best, best_hasher


@dataclass
class DownloadStats:
    """What resumable downloads did, summed over a device's life (read by the simulator)."""

    completed: int = 0
    bytes_fetched: int = 0  # payload bytes received, re-fetched ones included
    resumes: int = 0  # continuations from a saved offset: after a drop, or a restart
    full_restarts: int = 0  # downloads thrown away (wrong digest) to begin again


class ResumableDownload:
    """Download targets into ``folder`` so that no finished chunk is ever fetched twice.

    Layout: ``{sha256}.partial`` (the file's bytes so far, then three progress
    record slots, see :class:`_Record`) and ``{sha256}`` once complete and
    verified. ``{sha256}.progress`` was the record of earlier versions; it is
    removed (such a download starts over, as one with records of an earlier
    layout does).

    ``window`` is the number of chunks in flight (see :class:`MqttFetcher`);
    an interruption of any kind re-fetches at most that many.
    """

    def __init__(
        self,
        connection: DeviceConnection,
        folder: Path,
        *,
        timeout: float = 30.0,  # seconds without a frame
        window: int = DEFAULT_WINDOW,  # chunks in flight
        max_retries: int = 5,  # consecutive failed attempts without progress
        reconnect_timeout: float = 120.0,  # seconds to wait for the broker per attempt
        on_progress: Callable[[int, int], None] | None = None,  # (offset, length)
        stats: DownloadStats | None = None,
        save_timeout: float = 60.0,  # seconds one durable progress save may take
    ) -> None:
        self._connection = connection
        self._save_timeout = save_timeout
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
        """The separate progress record of earlier versions (never written now)."""
        return self._folder / f"{sha256}.progress"

    def saved_offset(self, sha256: str, length: int) -> int:
        """Bytes already downloaded for this target that a resume keeps (checked, see above)."""
        return saved_offset(self.partial_path(sha256), length)

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
        self.progress_path(sha256).unlink(missing_ok=True)  # an earlier version's record
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            # One streaming pass: the bytes kept from before are hashed once (which
            # also checks the records), the new ones as they arrive, so the file is
            # not read again at the end.
            complete = None
            if os.fstat(fd).st_size == length:  # complete; killed before the rename?
                complete = _hash_range(fd, hashlib.sha256(), 0, length)
            if complete is not None and complete.hexdigest() == sha256:
                kept, hasher = length, complete
            else:
                kept, hasher = _load_progress(fd, length)
            if kept:
                self.stats.resumes += 1  # picked up after an agent restart
            else:
                os.ftruncate(fd, 0)  # nothing matched: nothing kept
            # Bytes past the kept offset may be torn by a crash: never trusted,
            # only overwritten.
            self._fill(fd, path, length, sha256, kept, hasher)
            if (actual := hasher.hexdigest()) == sha256:
                os.ftruncate(fd, length)  # drop the records: the file is complete
                os.fdatasync(fd)
        finally:
            os.close(fd)
        if actual != sha256:
            partial.unlink(missing_ok=True)
            self.stats.full_restarts += 1
            raise exceptions.LengthOrHashMismatchError(
                f"{path}: downloaded sha256 {actual}, expected {sha256}")
        partial.replace(final)
        self.stats.completed += 1
        return final

    def _fill(self, fd: int, path: str, length: int, sha256: str, offset: int,
              hasher: Any) -> None:
        """Fetch until the partial file holds ``length`` bytes, retrying transfers.

        Frames come in file order, so each is written and added to ``hasher``
        as it arrives, and the latest record slot then names the new offset (a
        ``pwrite``: what a killed process wrote stays in the page cache). Once
        per request's worth of chunks a record is made durable on a thread of
        its own (:class:`_ProgressSaver`: one ``fdatasync``), so the transfer
        goes on while the data is synced. A disconnect, which keeps the
        process, continues from the last byte written.
        """
        expected_id = bytes.fromhex(sha256)
        latest_slot = length + _LATEST_SLOT * _SLOT
        save_every = self._fetcher.request_window
        stats, on_progress = self.stats, self._on_progress
        failures = 0
        unsaved_frames = 0
        record = b""
        saver = _ProgressSaver(fd, length, timeout=self._save_timeout)
        try:
            while offset < length:
                try:
                    for frame in self._fetcher.stream(path, offset=offset, max_length=length):
                        payload = frame.payload
                        if frame.total != length or (
                                frame.content_id and frame.file_id != expected_id):
                            raise exceptions.LengthOrHashMismatchError(
                                f"{path}: the server offers another file ({frame.total} bytes)")
                        _pwrite_all(fd, payload, frame.offset)
                        hasher.update(payload)
                        stats.bytes_fetched += len(payload)
                        offset = frame.offset + len(payload)
                        if not frame.last:  # complete: the caller drops the records
                            record = _Record(offset, hasher.digest()).to_bytes()
                            _pwrite_all(fd, record, latest_slot)
                            unsaved_frames += 1
                            if unsaved_frames >= save_every:
                                unsaved_frames = 0
                                saver.save(record)
                        failures = 0
                        if on_progress is not None:
                            on_progress(offset, length)
                except (ConnectionLostError, FrameRejectedError,
                        exceptions.SlowRetrievalError) as e:
                    if record:
                        saver.save(record)  # durable too, in case the wait ends in a power cut
                    failures += 1
                    if failures > self._max_retries:
                        raise
                    logger.info("download of %s interrupted at %d (%s); resuming",
                                path, offset, e)
                    self.stats.resumes += 1
                    if not self._connection.wait_ready(self._reconnect_timeout):
                        raise ConnectionLostError(
                            f"broker unreachable for {self._reconnect_timeout}s") from e
            # Complete: the caller checks the hash and syncs the file before renaming
            # it, so no record is needed for the end, only the saves still running.
            saver.flush()
        finally:
            saver.close()


class _ProgressSaver:
    """Makes download progress durable on its own thread: a :class:`_Record`, one ``fdatasync``.

    The two durable slots are written in turn by one thread, one save at a
    time: so while a save runs, the other slot holds a record whose
    ``fdatasync`` had completed, which a power cut in the middle of this save
    leaves usable. Asking for a save never waits: a record asked for while a
    save runs waits its turn, replacing any older one still waiting (the
    latest slot covers a killed process meanwhile; a power cut falls back at
    most to the save running), so a slow disk never stalls the transfer.
    """

    def __init__(self, fd: int, length: int, *, timeout: float) -> None:
        self._fd = fd
        self._length = length
        self._timeout = timeout
        self._cond = threading.Condition()
        self._wanted: bytes | None = None
        self._asked = b""  # the latest record asked for
        self._saves = 0
        self._busy = False
        self._closed = False
        self._error: OSError | None = None
        self._thread: threading.Thread | None = None

    def save(self, record: bytes) -> None:
        """Queue an encoded record for saving (replacing one not yet started); never waits.

        Raises:
            OSError: an earlier save failed.
        """
        with self._cond:
            if self._error is not None:
                raise self._error
            if record == self._asked:
                return
            self._wanted = self._asked = record
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="download-saver",
                                                daemon=True)
                self._thread.start()

    def flush(self) -> None:
        """Wait until every queued save is on disk.

        Raises:
            OSError: a save failed, or did not finish within the timeout.
        """
        with self._cond:
            self._wait_idle()

    def close(self) -> None:
        """Stop the thread once the save in progress (if any) is done (bounded wait)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(self._timeout)

    def _wait_idle(self) -> None:
        if not self._cond.wait_for(
                lambda: self._error is not None or (self._wanted is None and not self._busy),
                self._timeout):
            raise OSError(f"saving download progress took more than {self._timeout}s")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._wanted is not None or self._closed)
                record, self._wanted = self._wanted, None
                if record is None:
                    return
                self._busy = True
            try:
                slot = _DURABLE_SLOTS[self._saves % len(_DURABLE_SLOTS)]
                _pwrite_all(self._fd, record, self._length + slot * _SLOT)
                os.fdatasync(self._fd)
                self._saves += 1
            except OSError as e:
                with self._cond:
                    self._error, self._busy = e, False
                    self._cond.notify_all()
                return
            with self._cond:
                self._busy = False
                self._cond.notify_all()


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``os.pwrite`` may write less than asked)."""
    written = os.pwrite(fd, data, offset)
    if written == len(data):
        return
    view, position = memoryview(data)[written:], offset + written
    while view:
        written = os.pwrite(fd, view, position)
        if written <= 0:
            raise OSError(f"wrote nothing at offset {position}")
        view, position = view[written:], position + written


def _hash_range(fd: int, hasher: Any, start: int, end: int) -> Any:
    """Feed the bytes ``[start, end)`` of the open file ``fd`` to ``hasher``; return it.

    Raises:
        OSError: the file ends before ``end``.
    """
    position = start
    while position < end:
        block = os.pread(fd, min(_HASH_BLOCK, end - position), position)
        if not block:
            raise OSError("partial download shorter than its progress record")
        hasher.update(block)
        position += len(block)
    return hasher


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
