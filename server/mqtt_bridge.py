"""The server side of the MQTT fetch protocol: repository files served from the blob store.

:class:`FetchBridge` subscribes to every device's ``fetch`` topic (or a shared
subscription, so replicas split the load) and answers each request with at
most one window of chunk frames on that device's ``rx`` topic (wire format:
:mod:`edgeota.protocol.fetch`). It runs beside the HTTP app without ever
blocking it: paho's network loop has its own thread (``loop_start``), and a
small pool of worker threads reads files chunk by chunk, so neither the
network loop nor the HTTP app waits on the disk, and no file is ever held
whole in memory.

Every resource is bounded: concurrent fetches (request ids) per device and
queued windows per fetch (429 beyond), the work queue (503 beyond), frames
queued in paho, the memory of recent requests kept to recognise QoS 1
duplicates and cancels, and the per-(device, path) byte counters. The topic
names the device (the broker's ACL lets device X publish only on
``devices/X/...``), so a device reads
``image/...`` and only its own ``director/X/...``: another device's director
files are answered 403 before the store is even asked whether they exist.

Given an ``on_device_message`` callback, the bridge also subscribes to every
device's ``status``, ``telemetry`` and ``online`` topics (through the same
shared-subscription group) and hands each message on as ``(device id, kind,
payload)``, the device id taken from the topic, which the ACL ties to the
sender's certificate. Payloads above ``max_device_payload`` are dropped and
counted. The network thread only puts messages on a bounded queue; one
dispatcher thread calls the callback, so database work (see
:class:`edgeota.server.mqtt_ingest.DeviceMessageSink`) never stalls the fetch
traffic, and a full queue drops (and counts) instead of blocking. Brokers do
not send retained messages to shared subscriptions, so with ``shared_group``
the retained status and presence of devices are not replayed at start-up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import re
import socket
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import paho.mqtt.client as mqtt

from edgeota.protocol.errors import EdgeotaError
from edgeota.protocol.fetch import (
    MAX_PAYLOAD,
    MAX_WINDOW,
    ChunkFrame,
    ErrorCode,
    ErrorFrame,
    FetchRequest,
    Frame,
    FrameError,
    FrameTooLargeError,
    MqttTls,
    decode_request,
    encode_frame,
)
from edgeota.protocol.topics import DeviceTopic, Topics
from edgeota.server.repo.storage import DIRECTOR, IMAGE, RepoFileNotFoundError, RepoStore

__all__ = [
    "DEVICE_MESSAGE_TOPICS",
    "MAX_DEVICE_PAYLOAD",
    "BridgeCounters",
    "BridgeError",
    "DeviceMessageHandler",
    "FetchBridge",
    "file_identity",
]

logger = logging.getLogger(__name__)

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_FILE_ID_DOMAIN = b"edgeota/fetch/v1 file-id\x00"
_MAX_JOBS_PER_FETCH = 2  # the window being sent and the next one asked for

# What devices report besides fetch requests, handed to ``on_device_message``.
DEVICE_MESSAGE_TOPICS = (DeviceTopic.STATUS, DeviceTopic.TELEMETRY, DeviceTopic.ONLINE)
# A signed status report is at most 16 KiB (edgeota.protocol.reports.MAX_REPORT_SIZE);
# nothing a device legitimately sends on these topics is larger.
MAX_DEVICE_PAYLOAD = 16 * 1024  # bytes

DeviceMessageHandler = Callable[[str, DeviceTopic, bytes], None]


class BridgeError(EdgeotaError):
    """The bridge could not start (broker unreachable, subscription refused) or stop in time."""


@dataclass(frozen=True)
class BridgeCounters:
    """A consistent snapshot of what the bridge did, for tests and Prometheus."""

    requests: int = 0  # accepted requests (one per window)
    chunks_sent: int = 0
    bytes_sent: int = 0  # file bytes in chunk payloads
    frame_bytes_sent: int = 0  # wire bytes, headers included
    errors_sent: Mapping[int, int] = field(default_factory=dict)  # by error code
    rejected: int = 0  # messages that were not valid requests
    duplicates: int = 0  # repeated (request id, offset): QoS 1 redelivery
    cancels: int = 0
    frames_dropped: int = 0  # refused by paho's bounded outgoing queue
    served: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (device, path) -> bytes
    device_messages: int = 0  # status/telemetry/online messages queued for the handler
    device_oversize: int = 0  # dropped: payload above max_device_payload
    device_dropped: int = 0  # dropped: the handler's queue was full
    device_errors: int = 0  # the handler raised (logged; the message is lost)

    def served_bytes(self, device_id: str, path: str) -> int:
        """File bytes sent to ``device_id`` for ``path`` (re-sent windows included)."""
        return self.served.get((device_id, path), 0)


class _BoundedSet:
    """Insertion-ordered set that forgets its oldest members beyond ``capacity``."""

    def __init__(self, capacity: int) -> None:
        self._items: OrderedDict[Hashable, None] = OrderedDict()
        self._capacity = capacity

    def add(self, item: Hashable) -> None:
        self._items[item] = None
        self._items.move_to_end(item)
        while len(self._items) > self._capacity:
            self._items.popitem(last=False)

    def __contains__(self, item: Hashable) -> bool:
        return item in self._items


class _Counters:
    """The mutable side of :class:`BridgeCounters`, guarded by one lock."""

    def __init__(self, max_served_keys: int) -> None:
        self._lock = threading.Lock()
        self._max_served_keys = max_served_keys
        self._values: dict[str, int] = dict.fromkeys(
            ("requests", "chunks_sent", "bytes_sent", "frame_bytes_sent", "rejected",
             "duplicates", "cancels", "frames_dropped", "device_messages", "device_oversize",
             "device_dropped", "device_errors"), 0)
        self._errors: dict[int, int] = {}
        self._served: OrderedDict[tuple[str, str], int] = OrderedDict()

    def bump(self, name: str, by: int = 1) -> None:
        with self._lock:
            self._values[name] += by

    def chunk(self, device_id: str, path: str, payload: int, wire: int, frames: int = 1) -> None:
        with self._lock:
            self._values["chunks_sent"] += frames
            self._values["bytes_sent"] += payload
            self._values["frame_bytes_sent"] += wire
            key = (device_id, path)
            self._served[key] = self._served.get(key, 0) + payload
            self._served.move_to_end(key)
            while len(self._served) > self._max_served_keys:
                self._served.popitem(last=False)

    def error(self, code: int, wire: int, frames: int = 1) -> None:
        with self._lock:
            self._errors[code] = self._errors.get(code, 0) + frames
            self._values["frame_bytes_sent"] += wire

    def snapshot(self) -> BridgeCounters:
        with self._lock:
            return BridgeCounters(errors_sent=dict(self._errors), served=dict(self._served),
                                  **self._values)


@dataclass(frozen=True)
class _Job:
    device_id: str
    request: FetchRequest


@dataclass(frozen=True)
class _DeviceMessage:
    device_id: str
    kind: DeviceTopic
    payload: bytes


def file_identity(request_path: str, opened: BinaryIO) -> tuple[bytes, bool]:
    """The 32-byte ``file_id`` of an open repository file, and whether it is a content hash.

    Targets are stored under their sha256 (``{sha256}.{name}``), so their id is
    the content hash a carousel can share between devices. Metadata files get
    a tag over path, size, mtime and inode: cheap (no hashing of the file per
    window) and different whenever the file is replaced, as the timestamp
    pointer is.
    """
    if request_path.startswith(f"{IMAGE}/targets/"):
        digest = Path(request_path).name.partition(".")[0]
        if _SHA256_RE.fullmatch(digest):
            return bytes.fromhex(digest), True
    st = os.fstat(opened.fileno())
    tag = hashlib.sha256(_FILE_ID_DOMAIN + request_path.encode() + b"\x00")
    tag.update(struct.pack(">QQQ", st.st_size, st.st_mtime_ns, st.st_ino))
    return tag.digest(), False


class FetchBridge:
    """Answer fetch requests from every device over one MQTT connection.

    ``max_window`` caps the chunks per request (a larger window is answered
    400); ``chunk_size`` is the payload per frame; ``shared_group`` subscribes
    through ``$share/{group}/...`` so several replicas split the requests (each
    window is a self-contained request, so any replica can serve any window);
    ``workers`` threads read the store; ``max_requests_per_device`` bounds the
    fetches one device may run at once, ``max_queue`` the windows waiting for a
    worker and ``max_queued_frames`` the frames waiting in paho.

    ``on_device_message(device_id, kind, payload)``, if given, receives every
    ``status``, ``telemetry`` and ``online`` message, called on one dispatcher
    thread in arrival order; ``max_device_queue`` bounds the messages waiting
    for it and ``max_device_payload`` the size of each (larger ones are
    dropped and counted).
    """

    def __init__(
        self,
        store: RepoStore,
        *,
        host: str,
        port: int,
        client_id: str,
        topics: Topics | None = None,
        tls: MqttTls | None = None,
        max_window: int = 16,
        chunk_size: int = MAX_PAYLOAD,
        shared_group: str | None = None,
        workers: int = 4,
        max_requests_per_device: int = 4,
        max_queue: int = 256,
        max_queued_frames: int = 1024,
        keepalive: int = 30,
        reconnect_min_delay: float = 0.5,  # seconds; paho doubles it up to the max
        reconnect_max_delay: float = 30.0,  # seconds
        username: str | None = None,
        password: str | None = None,
        on_device_message: DeviceMessageHandler | None = None,
        max_device_queue: int = 4096,
        max_device_payload: int = MAX_DEVICE_PAYLOAD,  # bytes
    ) -> None:
        if not 1 <= max_window <= MAX_WINDOW:
            raise ValueError(f"max_window must be 1..{MAX_WINDOW}")
        if not 1 <= chunk_size <= MAX_PAYLOAD:
            raise ValueError(f"chunk_size must be 1..{MAX_PAYLOAD}")
        if workers < 1 or max_requests_per_device < 1 or max_queue < 1:
            raise ValueError("workers, max_requests_per_device and max_queue must be positive")
        if max_device_queue < 1 or max_device_payload < 0:
            raise ValueError("max_device_queue must be positive, max_device_payload not negative")
        self._store = store
        self._host, self._port, self._keepalive = host, port, keepalive
        self._topics = topics or Topics()
        self._max_window = max_window
        self._chunk_size = chunk_size
        self._workers_wanted = workers
        self._max_per_device = max_requests_per_device
        kinds = (DeviceTopic.FETCH,) + (DEVICE_MESSAGE_TOPICS if on_device_message else ())
        self._subscriptions = tuple(
            self._topics.shared(shared_group, kind) if shared_group
            else self._topics.all_devices(kind)
            for kind in kinds
        )
        self._on_device_message = on_device_message
        self._max_device_payload = max_device_payload
        self._device_queue: queue.Queue[_DeviceMessage | None] = queue.Queue(
            maxsize=max_device_queue)
        self._dispatcher: threading.Thread | None = None
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()  # guards the four fields below
        # device -> request id -> accepted windows not yet served. A fetch's next
        # window may arrive before the worker has finished the previous one, so
        # the per-device bound counts fetches (request ids), each allowed
        # _MAX_JOBS_PER_FETCH queued windows.
        self._active: dict[str, dict[str, int]] = {}
        self._seen = _BoundedSet(8192)  # (device, rid, offset) already accepted
        self._cancelled = _BoundedSet(4096)  # (device, rid)
        self._connections = 0
        self._counters = _Counters(max_served_keys=65536)
        self._ready = threading.Event()
        self._changed = threading.Condition()
        self._subscribe_mid: int | None = None
        self._threads: list[threading.Thread] = []
        self._started = False

        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        if tls is not None:
            self._client.tls_set(
                ca_certs=str(tls.ca_file),
                certfile=str(tls.cert_file) if tls.cert_file else None,
                keyfile=str(tls.key_file) if tls.key_file else None,
            )
        if username is not None:
            self._client.username_pw_set(username, password)
        self._client.max_queued_messages_set(max_queued_frames)
        self._client.reconnect_delay_set(reconnect_min_delay, reconnect_max_delay)  # type: ignore[arg-type]
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

    def start(self, timeout: float = 10.0) -> None:
        """Connect, subscribe and start the workers; wait at most ``timeout`` seconds.

        Raises:
            BridgeError: not subscribed in time (everything started is stopped again).
        """
        if self._started:
            raise RuntimeError("bridge already started")
        self._started = True
        for n in range(self._workers_wanted):
            thread = threading.Thread(target=self._work, name=f"fetch-bridge-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if self._on_device_message is not None:
            self._dispatcher = threading.Thread(target=self._dispatch, name="device-messages",
                                                daemon=True)
            self._dispatcher.start()
        self._client.connect_async(self._host, self._port, self._keepalive)
        self._client.loop_start()
        if not self._ready.wait(timeout):
            self.stop()
            raise BridgeError(
                f"not subscribed to {', '.join(self._subscriptions)} on {self._host}:{self._port} "
                f"within {timeout}s"
            )

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect and stop the workers; requests still queued are dropped (devices retry).

        Device messages already queued are still handed to ``on_device_message``
        (no new ones arrive once disconnected).
        """
        self._client.disconnect()
        self._client.loop_stop()
        self._ready.clear()
        dispatcher, self._dispatcher = self._dispatcher, None
        if dispatcher is not None:
            with contextlib.suppress(queue.Full):
                self._device_queue.put(None, timeout=timeout)
            dispatcher.join(timeout)
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        for _ in self._threads:
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=timeout)
        for thread in self._threads:
            thread.join(timeout)
        alive = [t.name for t in self._threads if t.is_alive()]
        if dispatcher is not None and dispatcher.is_alive():
            alive.append(dispatcher.name)
        self._threads.clear()
        if alive:
            raise BridgeError(f"workers still busy after {timeout}s: {alive}")

    def __enter__(self) -> FetchBridge:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def connections(self) -> int:
        """How many times the bridge has been connected and subscribed (reconnects included)."""
        with self._lock:
            return self._connections

    def wait_ready(self, timeout: float, *, after: int = 0) -> bool:
        """Wait until subscribed on a connection numbered above ``after`` (see ``connections``)."""
        with self._changed:
            return self._changed.wait_for(
                lambda: self._ready.is_set() and self.connections > after, timeout)

    def counters(self) -> BridgeCounters:
        """A snapshot of the counters."""
        return self._counters.snapshot()

    def notify(self, device_id: str) -> None:
        """Tell a device its director metadata changed (QoS 1; it checks on its own schedule)."""
        payload = json.dumps({"v": 1, "event": "director-changed"}, separators=(",", ":"))
        self._client.publish(self._topics.device(device_id, DeviceTopic.NOTIFY), payload, qos=1)

    # -- paho callbacks (network thread: never block here) -------------------

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any,
                    reason_code: Any, _properties: Any) -> None:
        if reason_code.is_failure:
            logger.warning("broker refused the bridge: %s", reason_code)
            return
        _rc, mid = client.subscribe([(topic, 1) for topic in self._subscriptions])
        self._subscribe_mid = mid

    def _on_subscribe(self, _client: mqtt.Client, _userdata: Any, mid: int,
                      reason_codes: list[Any], _properties: Any) -> None:
        if mid != self._subscribe_mid:
            return
        if any(rc.is_failure for rc in reason_codes):
            logger.error("broker refused a subscription of %s", self._subscriptions)
            return
        with self._changed:
            with self._lock:
                self._connections += 1
            self._ready.set()
            self._changed.notify_all()

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any,
                       reason_code: Any, _properties: Any) -> None:
        with self._changed:
            self._ready.clear()
            self._changed.notify_all()
        logger.info("bridge disconnected (%s); paho reconnects with backoff", reason_code)

    def _on_message(self, _client: mqtt.Client, _userdata: Any,
                    message: mqtt.MQTTMessage) -> None:
        try:
            device_id, kind = self._topics.parse(message.topic)
        except ValueError:
            self._counters.bump("rejected")
            return
        if kind in DEVICE_MESSAGE_TOPICS and self._on_device_message is not None:
            self._queue_device_message(device_id, kind, message.payload)
            return
        if kind is not DeviceTopic.FETCH:
            self._counters.bump("rejected")
            return
        try:
            request = decode_request(message.payload)
        except FrameError as e:
            self._counters.bump("rejected")
            if e.request_id is not None:
                code = ErrorCode.BAD_REQUEST
                if isinstance(e, FrameTooLargeError):
                    code = ErrorCode.TOO_LARGE
                self._send(device_id, ErrorFrame(e.request_id, code, str(e)[:200]))
            return
        self._admit(device_id, request)

    def _queue_device_message(self, device_id: str, kind: DeviceTopic, payload: bytes) -> None:
        """Hand a status/telemetry/online message to the dispatcher, or drop and count it."""
        if len(payload) > self._max_device_payload:
            self._counters.bump("device_oversize")
            # Debug only: a device could flood the log; the counter shows it.
            logger.debug("dropped a %d-byte %s message from %s (limit %d)",
                           len(payload), kind, device_id, self._max_device_payload)
            return
        try:
            self._device_queue.put_nowait(_DeviceMessage(device_id, kind, bytes(payload)))
        except queue.Full:
            self._counters.bump("device_dropped")
            logger.debug("device message queue full: dropped %s from %s", kind, device_id)
            return
        self._counters.bump("device_messages")

    def _admit(self, device_id: str, request: FetchRequest) -> None:
        """Queue a request, or answer at once: cancel, duplicate, too busy, too big a window."""
        rid = request.request_id
        if request.cancel:
            with self._lock:
                self._cancelled.add((device_id, rid))
            self._counters.bump("cancels")
            return
        if request.window > self._max_window:
            self._send(device_id, ErrorFrame(
                rid, ErrorCode.BAD_REQUEST, f"window {request.window} > {self._max_window}"))
            return
        with self._lock:
            outcome = self._enqueue_locked(device_id, request)
        if outcome == "queued":
            self._counters.bump("requests")
        elif outcome == "duplicate":
            self._counters.bump("duplicates")
        elif outcome == "device-busy":
            self._send(device_id, ErrorFrame(
                rid, ErrorCode.BUSY, f"more than {self._max_per_device} requests in flight"))
        else:
            self._send(device_id, ErrorFrame(rid, ErrorCode.UNAVAILABLE, "server busy"))

    def _enqueue_locked(self, device_id: str, request: FetchRequest) -> str:
        """Queue ``request`` unless it is a duplicate or over a bound; say which (lock held)."""
        key = (device_id, request.request_id, request.offset)
        if key in self._seen:
            return "duplicate"
        fetches = self._active.setdefault(device_id, {})
        jobs = fetches.get(request.request_id, 0)
        if (jobs >= _MAX_JOBS_PER_FETCH
                or (jobs == 0 and len(fetches) >= self._max_per_device)):
            if not fetches:
                del self._active[device_id]
            return "device-busy"
        try:
            self._queue.put_nowait(_Job(device_id, request))
        except queue.Full:
            if not fetches:
                del self._active[device_id]
            return "server-busy"
        self._seen.add(key)
        fetches[request.request_id] = jobs + 1
        return "queued"

    # -- workers ------------------------------------------------------------

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                self._serve(job.device_id, job.request)
            except Exception:
                # A worker must survive any one request; the device sees a 503 and retries.
                logger.exception("serving %s to %s failed", job.request.path, job.device_id)
                self._send(job.device_id, ErrorFrame(
                    job.request.request_id, ErrorCode.UNAVAILABLE, "server error"))
            finally:
                with self._lock:
                    self._release(job)

    def _dispatch(self) -> None:
        handler = self._on_device_message
        assert handler is not None  # only started with a handler
        while (item := self._device_queue.get()) is not None:
            try:
                handler(item.device_id, item.kind, item.payload)
            except Exception:
                # One bad message must not end the dispatcher; the handler owns its errors.
                self._counters.bump("device_errors")
                logger.exception("handling %s from %s failed", item.kind, item.device_id)

    def _release(self, job: _Job) -> None:
        """One window of a fetch is done (lock held)."""
        fetches = self._active.get(job.device_id, {})
        left = fetches.get(job.request.request_id, 1) - 1
        if left > 0:
            fetches[job.request.request_id] = left
        else:
            fetches.pop(job.request.request_id, None)
        if not fetches:
            self._active.pop(job.device_id, None)

    def _is_cancelled(self, device_id: str, rid: str) -> bool:
        with self._lock:
            return (device_id, rid) in self._cancelled

    def _authorized(self, device_id: str, path: str) -> bool:
        """``image/...`` for everyone; ``director/{id}/...`` only for that device."""
        parts = path.split("/")
        if parts[0] == DIRECTOR:
            return len(parts) > 1 and parts[1] == device_id
        return True

    def _serve(self, device_id: str, request: FetchRequest) -> None:
        """Send one window of ``request`` (an override point for fault-injecting subclasses)."""
        rid = request.request_id
        if not self._authorized(device_id, request.path):
            self._send(device_id, ErrorFrame(rid, ErrorCode.FORBIDDEN, "not this device's file"))
            return
        try:
            path = self._store.file_for_request(request.path)
            opened = path.open("rb")
        except (RepoFileNotFoundError, FileNotFoundError):
            self._send(device_id, ErrorFrame(rid, ErrorCode.NOT_FOUND, "no such file"))
            return
        with opened:
            size = os.fstat(opened.fileno()).st_size
            if size > request.max_length:
                self._send(device_id, ErrorFrame(
                    rid, ErrorCode.TOO_LARGE, f"file is {size} bytes > max {request.max_length}"))
                return
            if request.offset > size:
                self._send(device_id, ErrorFrame(
                    rid, ErrorCode.BAD_RANGE, f"offset {request.offset} > size {size}"))
                return
            file_id, content_id = file_identity(request.path, opened)
            offset = request.offset
            opened.seek(offset)
            for _ in range(request.window):
                if self._is_cancelled(device_id, rid):
                    return
                want = min(self._chunk_size, size - offset)
                payload = opened.read(want)
                if len(payload) != want:
                    raise OSError(f"{request.path} shrank while being served")
                end = offset + want
                frame = ChunkFrame(rid, file_id, offset, size, payload, last=end == size,
                                   content_id=content_id)
                if not self._send(device_id, frame, path=request.path):
                    return
                if frame.last:
                    return
                offset = end

    def _send(self, device_id: str, frame: Frame, *, path: str = "") -> bool:
        """Publish one frame on the device's ``rx``; ``False`` if paho's queue refused it.

        An override point too: tests corrupt, reorder or relabel frames here.
        """
        data = encode_frame(frame)
        # Counted before publishing: once a device holds the frame, the counters show it.
        self._count(device_id, frame, path, len(data), +1)
        info = self._client.publish(self._topics.device(device_id, DeviceTopic.RX), data, qos=1)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            self._count(device_id, frame, path, len(data), -1)
            self._counters.bump("frames_dropped")
            logger.warning("outgoing queue full: dropping the rest of a window for %s",
                           device_id)
            return False
        # NO_CONN: paho keeps the QoS 1 message and sends it after reconnecting.
        return True

    def _count(self, device_id: str, frame: Frame, path: str, wire: int, sign: int) -> None:
        if isinstance(frame, ChunkFrame):
            self._counters.chunk(device_id, path, sign * len(frame.payload), sign * wire, sign)
        else:
            self._counters.error(frame.code, sign * wire, sign)


def _no_delay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    """Turn off Nagle: a fetch is request/response, and small frames must not wait 40 ms."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
