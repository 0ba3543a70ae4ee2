"""The server side of the MQTT fetch protocol: repository files served from the blob store.

:class:`FetchBridge` subscribes to every device's ``fetch`` topic (or a shared
subscription, so replicas split the load) and answers each request with at
most one window of chunk frames on that device's ``rx`` topic (wire format:
:mod:`edgeota.protocol.fetch`). It runs beside the HTTP app without ever
blocking it: paho's network loop has its own thread (``loop_start``), and a
small pool of worker threads reads files chunk by chunk, so neither the
network loop nor the HTTP app waits on the disk, and no file is ever held
whole in memory. Each chunk is read straight into the buffer of its frame
(:func:`~edgeota.protocol.fetch.pack_chunk`), and the store's answer to "which
file is this target path" is cached (targets are content-addressed, so the
answer only changes when the file goes away), as are the CRC-32s of target
chunks (a bundle served to a fleet is checksummed once, not once per device).

Windows of one request id are served one after another, in the order they
were asked, never by two workers at once: a device keeps two windows
outstanding (pipelining) and must get the frames of one fetch in order.
Windows of different fetches interleave, window by window, and the work
queue is fair between *devices* (:class:`_FairQueue`: each device has its
own line, served round-robin), so neither one large download nor one device
running its four fetches at once can starve the others.

One device cannot flood the bridge either: each device's fetch requests are
bounded (``max_request_rate`` a second, ``request_burst`` saved up, a
:class:`~edgeota.server.ratelimit.RateLimiter` checked before the request is
even decoded); beyond that they are dropped and counted (``rate_limited``),
never answered, so a flood costs the bridge a dictionary lookup per message
and no frame. The bound is far above what a device needs (a request brings
a window of chunks: a device on loopback fetching 200 MB/s in 256 KiB
windows asks 800 times a second), because a legitimate request dropped
costs that device a fetch timeout. The refusals the bridge answers at once
(429 busy, 503, 400) are bounded too, ``max_refusal_rate`` a second per
device; past it they are dropped and counted (``refusals_dropped``): the
device times out instead of hearing "busy" again. A device's status,
telemetry and presence messages are bounded the same way (20 a second, 100
saved up: an agent sends a few per update and one telemetry message per
interval), so one device cannot fill the dispatcher's queue, shared by all,
and crowd the others' reports out (``device_rate_limited``). Warnings a device can
provoke (frames that could not be queued, windows abandoned, a device over
its rate) are written once and then at most once a minute with a count
(:class:`~edgeota.server.ratelimit.RepeatLog`).

Back-pressure instead of loss: a worker publishes a frame only while fewer
than ``max_queued_frames`` frames wait in paho for the broker's PUBACK, and
otherwise waits (at most ``send_timeout`` seconds) for acknowledgements.
While workers wait, windows stay queued; when the work queue is full, new
fetches are answered 503 and devices retry. Nothing already accepted is
dropped: a slow broker or a thousand downloads slow every device down
instead. Error frames, sent from paho's network thread (which must never
block, since it processes the PUBACKs), use a small reserve on top.

Every resource is bounded: concurrent fetches (request ids) per device and
queued windows per fetch (429 beyond), the work queue (503 beyond), frames
queued in paho, the memory of recent requests kept to recognise QoS 1
duplicates and cancels, the path cache, and the per-(device, path) byte
counters. The topic
names the device (the broker's ACL lets device X publish only on
``devices/X/...``), so a device reads
``image/...`` and only its own ``director/X/...``: another device's director
files are answered 403 before the store is even asked whether they exist.

Given an ``on_device_message`` callback, the bridge also subscribes to every
device's ``status``, ``telemetry`` and ``online`` topics (through the same
shared-subscription group) and hands each message on as ``(device id, kind,
payload)``, the device id taken from the topic, which the ACL ties to the
sender's certificate. Payloads above ``max_device_payload`` are dropped and
counted; if the handler has an ``oversize(device_id, kind, size)`` method it
is told the size (never the payload), so a refused report is still audited.
The network thread only puts messages on a bounded queue; one
dispatcher thread calls the callback, so database work (see
:class:`edgeota.server.mqtt_ingest.DeviceMessageSink`) never stalls the fetch
traffic, and a full queue drops (and counts) instead of blocking. Brokers do
not send retained messages to shared subscriptions, so with ``shared_group``
the retained status and presence of devices are not replayed at start-up.
Without it, every (re)subscription replays them (delivered with the MQTT
retain flag set): if the handler has a ``retained`` method, those replays go
there instead, so it can tell "the device's last word, kept by the broker"
from "the device said this now" (:class:`~edgeota.server.mqtt_ingest.DeviceMessageSink`
does not move ``last_seen`` for a replay).

Interception (fault injection, the attack suite's man-in-the-middle) goes
through one public seam, :class:`FrameFilter`, installed with
:meth:`FetchBridge.add_filter`: a filter sees each accepted window before the
bridge serves it (and may answer it itself, with :meth:`FetchBridge.send`,
or drop it), and each encoded chunk frame before it is published (and may
change its bytes or drop it). With no filter installed each of the two
points costs one attribute test.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
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
from typing import Any, BinaryIO, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgeota.protocol.errors import EdgeotaError
from edgeota.protocol.fetch import (
    MAX_PAYLOAD,
    MAX_WINDOW,
    PIPELINE_DEPTH,
    ChunkFrame,
    ErrorCode,
    ErrorFrame,
    FetchRequest,
    Frame,
    FrameError,
    FrameTooLargeError,
    MqttTls,
    chunk_header_size,
    decode_request,
    encode_frame,
    pack_chunk,
)
from edgeota.protocol.topics import DeviceTopic, Topics
from edgeota.server.ratelimit import RateLimiter, RepeatLog
from edgeota.server.repo.storage import DIRECTOR, IMAGE, RepoFileNotFoundError, RepoStore

__all__ = [
    "DEVICE_MESSAGE_TOPICS",
    "MAX_DEVICE_PAYLOAD",
    "BridgeCounters",
    "BridgeError",
    "DeviceMessageHandler",
    "FetchBridge",
    "FrameFilter",
    "file_identity",
]

logger = logging.getLogger(__name__)

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_FILE_ID_DOMAIN = b"edgeota/fetch/v1 file-id\x00"
# Windows of one fetch the bridge accepts at once: the device's pipeline depth,
# plus one because the device may ask for its next window as soon as the last
# frame of the current one reaches it, before the worker has finished with it.
_MAX_JOBS_PER_FETCH = PIPELINE_DEPTH + 1
_ERROR_RESERVE = 64  # frames paho may queue beyond max_queued_frames: errors, notifications
# Request paths whose stored file is remembered: a few metadata files per device
# (~300 bytes an entry), and the targets.
_PATH_CACHE = 16384
_CRC_CACHE = 65536  # chunk CRCs of content-addressed files remembered (~200 bytes each)
_CrcKey = tuple[bytes, tuple[int, int, int, int], int, int]

# What devices report besides fetch requests, handed to ``on_device_message``.
DEVICE_MESSAGE_TOPICS = (DeviceTopic.STATUS, DeviceTopic.TELEMETRY, DeviceTopic.ONLINE)
# A signed status report is at most 16 KiB (edgeota.protocol.reports.MAX_REPORT_SIZE);
# nothing a device legitimately sends on these topics is larger.
MAX_DEVICE_PAYLOAD = 16 * 1024  # bytes

DeviceMessageHandler = Callable[[str, DeviceTopic, bytes], None]


class BridgeError(EdgeotaError):
    """The bridge could not start (broker unreachable, subscription refused) or stop in time."""


class FrameFilter(Protocol):
    """An interception point on what the bridge serves: fault injection and attack labs.

    Installed with :meth:`FetchBridge.add_filter`, removed with
    :meth:`FetchBridge.remove_filter`; both methods are called on the bridge's
    worker threads (several at once) and must not block for long. A class
    that subclasses this protocol inherits the pass-through defaults and
    overrides only the point it needs.
    """

    def on_request(self, device_id: str, request: FetchRequest) -> bool:
        """One accepted window, before the bridge serves it; ``True``: the filter handled it.

        Handled means answered (with :meth:`FetchBridge.send`) or dropped (the
        device times out and asks again); ``False`` lets the bridge serve it
        (or the next filter see it). Cancels, duplicates and requests refused
        for a bound never get here.
        """
        return False

    def on_chunk(self, device_id: str, path: str, frame: bytearray, payload: int) -> bool:
        """One encoded chunk frame before it is published; ``False`` drops it and ends the window.

        ``frame`` is the wire bytes (header, then ``payload`` bytes of file
        data at its end) and may be changed in place: the CRC in the header
        was computed before, so a flipped payload bit reaches the device as
        a damaged chunk.
        """
        return True


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
    frames_dropped: int = 0  # refused by paho's bounded outgoing queue (error frames only)
    served: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (device, path) -> bytes
    device_messages: int = 0  # status/telemetry/online messages queued for the handler
    device_oversize: int = 0  # dropped: payload above max_device_payload
    device_dropped: int = 0  # dropped: the handler's queue was full
    device_errors: int = 0  # the handler raised (logged; the message is lost)
    device_rate_limited: int = 0  # dropped: the device was over its message rate
    backpressure_waits: int = 0  # frames that waited for room in the outgoing queue
    send_stalls: int = 0  # windows abandoned: no room for send_timeout seconds
    rate_limited: int = 0  # fetch requests dropped: their device was over its rate
    refusals_dropped: int = 0  # 429/503/400 answers not sent: the device was over its rate

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
             "device_dropped", "device_errors", "backpressure_waits", "send_stalls",
             "rate_limited", "refusals_dropped", "device_rate_limited"), 0)
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


class _FairQueue:
    """The workers' queue: one line per device, the devices served in turn.

    A device with four fetches queued and another with one each get every
    other turn, instead of four turns in five. ``put_nowait`` refuses beyond
    ``maxsize`` jobs in all (``queue.Full``); ``get`` blocks until a job or a
    stop (``None``, one per :meth:`stop` call) is there. Thread-safe.
    """

    def __init__(self, maxsize: int) -> None:
        self._maxsize = maxsize
        self._lines: dict[str, collections.deque[_Job]] = {}  # insertion order: the turn
        self._size = 0
        self._stops = 0
        self._cond = threading.Condition()

    def put_nowait(self, job: _Job) -> None:
        with self._cond:
            if self._size >= self._maxsize:
                raise queue.Full
            line = self._lines.get(job.device_id)
            if line is None:
                self._lines[job.device_id] = collections.deque((job,))
            else:
                line.append(job)
            self._size += 1
            self._cond.notify()

    def get(self) -> _Job | None:
        with self._cond:
            while not self._size and not self._stops:
                self._cond.wait()
            if self._stops:
                self._stops -= 1
                return None
            device_id, line = next(iter(self._lines.items()))
            job = line.popleft()
            del self._lines[device_id]
            if line:
                self._lines[device_id] = line  # to the back: the others go first
            self._size -= 1
            return job

    def empty(self) -> bool:
        with self._cond:
            return not self._size

    def clear(self) -> None:
        with self._cond:
            self._lines.clear()
            self._size = 0

    def stop(self) -> None:
        """Make one waiting (or the next) ``get`` return ``None``."""
        with self._cond:
            self._stops += 1
            self._cond.notify()


@dataclass
class _FetchState:
    """One request id's accepted windows: one queued or being served, the rest waiting."""

    waiting: collections.deque[FetchRequest] = field(default_factory=collections.deque)

    @property
    def windows(self) -> int:
        return 1 + len(self.waiting)


@dataclass(frozen=True)
class _DeviceMessage:
    device_id: str
    kind: DeviceTopic
    payload: bytes
    retained: bool = False  # replayed by the broker from its retained store
    oversize: int | None = None  # dropped for this size: ``payload`` is empty


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
    worker and ``max_queued_frames`` the frames waiting in paho for their
    PUBACK; a worker finding that many waits at most ``send_timeout`` seconds
    for room (then abandons the window: the device times out and asks again).

    ``on_device_message(device_id, kind, payload)``, if given, receives every
    ``status``, ``telemetry`` and ``online`` message, called on one dispatcher
    thread in arrival order; ``max_device_queue`` bounds the messages waiting
    for it and ``max_device_payload`` the size of each (larger ones are
    dropped and counted).

    ``max_request_rate`` (``request_burst`` saved up) bounds each device's
    fetch requests; beyond it they are dropped unanswered and counted, as
    are refusals (429, 503, 400) beyond ``max_refusal_rate`` a second, and
    status, telemetry and presence messages beyond
    ``max_device_message_rate`` (``device_message_burst`` saved up; the
    broker's retained replays are not counted).
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
        max_queued_frames: int = 512,  # ~34 MiB of chunk frames; paho has 20 on the wire
        send_timeout: float = 30.0,  # seconds a worker waits for room in paho's queue
        keepalive: int = 30,
        reconnect_min_delay: float = 0.5,  # seconds; paho doubles it up to the max
        reconnect_max_delay: float = 30.0,  # seconds
        username: str | None = None,
        password: str | None = None,
        on_device_message: DeviceMessageHandler | None = None,
        max_device_queue: int = 4096,
        max_device_payload: int = MAX_DEVICE_PAYLOAD,  # bytes
        max_request_rate: float = 2000.0,  # fetch requests per second and device
        request_burst: int = 2000,
        max_refusal_rate: float = 50.0,  # 429/503/400 answers per second and device
        max_device_message_rate: float = 20.0,  # status/telemetry/online per second and device
        device_message_burst: int = 100,
    ) -> None:
        if not 1 <= max_window <= MAX_WINDOW:
            raise ValueError(f"max_window must be 1..{MAX_WINDOW}")
        if not 1 <= chunk_size <= MAX_PAYLOAD:
            raise ValueError(f"chunk_size must be 1..{MAX_PAYLOAD}")
        if workers < 1 or max_requests_per_device < 1 or max_queue < 1:
            raise ValueError("workers, max_requests_per_device and max_queue must be positive")
        if max_queued_frames < 1 or send_timeout <= 0:
            raise ValueError("max_queued_frames and send_timeout must be positive")
        if max_device_queue < 1 or max_device_payload < 0:
            raise ValueError("max_device_queue must be positive, max_device_payload not negative")
        if (max_request_rate <= 0 or request_burst < 1 or max_refusal_rate <= 0
                or max_device_message_rate <= 0 or device_message_burst < 1):
            raise ValueError("the request, refusal and device message rates and bursts must "
                             "be positive")
        self._store = store
        self._client_id = client_id
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
        self._oversize_hook: Callable[[str, DeviceTopic, int], None] | None = getattr(
            on_device_message, "oversize", None)
        self._max_device_payload = max_device_payload
        self._device_queue: queue.Queue[_DeviceMessage | None] = queue.Queue(
            maxsize=max_device_queue)
        self._dispatcher: threading.Thread | None = None
        self._queue = _FairQueue(max_queue)
        self._request_rate = RateLimiter(max_request_rate, request_burst)
        self._refusal_rate = RateLimiter(max_refusal_rate, 2 * max_refusal_rate)
        self._message_rate = RateLimiter(max_device_message_rate, device_message_burst)
        self._repeats = RepeatLog(logger)
        self._lock = threading.Lock()  # guards the five fields below
        # device -> request id -> accepted windows not yet served. The per-device
        # bound counts fetches (request ids), each allowed _MAX_JOBS_PER_FETCH
        # windows; only the first is on the work queue (or being served), the
        # others wait in order behind it, so no two workers serve one fetch.
        self._active: dict[str, dict[str, _FetchState]] = {}
        # target path -> (stored file, its (device, inode) when the store checked it)
        self._paths: OrderedDict[str, tuple[Path, tuple[int, int]]] = OrderedDict()
        # (content sha256, file version, offset, length) -> CRC-32 of those bytes: a
        # bundle served to a fleet is checksummed once per chunk, not once per device.
        # The file version (device, inode, mtime, size) keeps a file rewritten in
        # place (a repaired store, an attack lab) from reusing the old CRCs.
        self._crcs: OrderedDict[_CrcKey, int] = OrderedDict()
        self._seen = _BoundedSet(8192)  # (device, rid, offset) already accepted
        self._cancelled = _BoundedSet(4096)  # (device, rid)
        self._connections = 0
        self._counters = _Counters(max_served_keys=65536)
        self._ready = threading.Event()
        self._changed = threading.Condition()
        self._subscribe_mid: int | None = None
        self._threads: list[threading.Thread] = []
        self._started = False
        # Frames published and not yet acknowledged by the broker (PUBACK).
        self._room = threading.Condition()
        self._unacked = 0
        self._max_unacked = max_queued_frames
        self._send_timeout = send_timeout
        self._stopping = False
        # Replaced whole (never mutated) under _lock, so the hot path reads it without one.
        self._filters: tuple[FrameFilter, ...] = ()

        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True,
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
        # paho's own bound stays as a backstop above ours; only frames sent
        # without waiting (from the network thread) can ever reach it.
        self._client.max_queued_messages_set(max_queued_frames + _ERROR_RESERVE)
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
        self._client.on_publish = self._on_publish

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
        with self._room:
            self._stopping = True  # workers waiting for room give up their window
            self._room.notify_all()
        self._client.disconnect()
        self._client.loop_stop()
        self._ready.clear()
        dispatcher, self._dispatcher = self._dispatcher, None
        if dispatcher is not None:
            with contextlib.suppress(queue.Full):
                self._device_queue.put(None, timeout=timeout)
            dispatcher.join(timeout)
        self._queue.clear()
        for _ in self._threads:
            self._queue.stop()
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
    def client_id(self) -> str:
        """The MQTT client id the bridge connects with."""
        return self._client_id

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

    def active_windows(self) -> int:
        """Windows accepted and not yet finished (queued, waiting or being sent); 0 when idle."""
        with self._lock:
            return sum(state.windows for fetches in self._active.values()
                       for state in fetches.values())

    def add_filter(self, frame_filter: FrameFilter) -> None:
        """Install ``frame_filter`` after those already installed (see :class:`FrameFilter`)."""
        with self._lock:
            if any(f is frame_filter for f in self._filters):
                raise ValueError("this filter is already installed")
            self._filters = (*self._filters, frame_filter)

    def remove_filter(self, frame_filter: FrameFilter) -> None:
        """Uninstall ``frame_filter``; a window it is handling right now runs to its end.

        Raises:
            ValueError: it is not installed.
        """
        with self._lock:
            kept = tuple(f for f in self._filters if f is not frame_filter)
            if len(kept) == len(self._filters):
                raise ValueError("this filter is not installed")
            self._filters = kept

    def send(self, device_id: str, frame: Frame, *, path: str = "") -> bool:
        """Publish ``frame`` on the device's ``rx`` topic, as the bridge's own frames go.

        What a :class:`FrameFilter` answers a window with. Chunk frames are
        counted as served for ``(device_id, path)``, pass the installed
        filters' :meth:`~FrameFilter.on_chunk` and wait for room in the
        outgoing queue (call this from a worker thread, as ``on_request``
        is); error frames never wait. ``False``: the frame could not be
        queued (or a filter dropped it).
        """
        return self._send(device_id, frame, path=path)

    def notify(self, device_id: str) -> None:
        """Tell a device its director metadata changed (QoS 1; it checks on its own schedule)."""
        payload = json.dumps({"v": 1, "event": "director-changed"}, separators=(",", ":"))
        self._publish(self._topics.device(device_id, DeviceTopic.NOTIFY), payload.encode(),
                      wait=False)

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

    def _on_publish(self, _client: mqtt.Client, _userdata: Any, _mid: int,
                    _reason_code: Any, _properties: Any) -> None:
        # Every publish of the bridge is QoS 1: this is its PUBACK.
        with self._room:
            self._unacked = max(0, self._unacked - 1)
            self._room.notify()

    def _on_message(self, _client: mqtt.Client, _userdata: Any,
                    message: mqtt.MQTTMessage) -> None:
        try:
            device_id, kind = self._topics.parse(message.topic)
        except ValueError:
            self._counters.bump("rejected")
            return
        if kind in DEVICE_MESSAGE_TOPICS and self._on_device_message is not None:
            self._queue_device_message(device_id, kind, message.payload,
                                       retained=bool(message.retain))
            return
        if kind is not DeviceTopic.FETCH:
            self._counters.bump("rejected")
            return
        if not self._request_rate.allow(device_id):
            # Dropped unanswered: an answer per flooded request is what a flood wants.
            self._counters.bump("rate_limited")
            self._repeats.log(("rate", device_id), "device %s sends fetch requests beyond its "
                              "rate: dropped", device_id)
            return
        try:
            request = decode_request(message.payload)
        except FrameError as e:
            self._counters.bump("rejected")
            if e.request_id is not None:
                code = ErrorCode.BAD_REQUEST
                if isinstance(e, FrameTooLargeError):
                    code = ErrorCode.TOO_LARGE
                self._refuse(device_id, ErrorFrame(e.request_id, code, str(e)[:200]))
            return
        self._admit(device_id, request)

    def _queue_device_message(self, device_id: str, kind: DeviceTopic,
                              payload: bytes | bytearray, *,
                              retained: bool = False) -> None:
        """Hand a status/telemetry/online message to the dispatcher, or drop and count it."""
        if not retained and not self._message_rate.allow(device_id):
            # The dispatcher's queue (and the sink's) is every device's: one device
            # sending without end must not crowd the others' reports out of it.
            self._counters.bump("device_rate_limited")
            self._repeats.log(("messages", device_id), "device %s sends status, telemetry "
                              "or presence beyond its rate: dropped", device_id)
            return
        if len(payload) > self._max_device_payload:
            self._counters.bump("device_oversize")
            # Debug only: a device could flood the log; the counter shows it.
            logger.debug("dropped a %d-byte %s message from %s (limit %d)",
                         len(payload), kind, device_id, self._max_device_payload)
            if self._oversize_hook is not None:
                with contextlib.suppress(queue.Full):
                    self._device_queue.put_nowait(
                        _DeviceMessage(device_id, kind, b"", oversize=len(payload)))
            return
        try:
            self._device_queue.put_nowait(_DeviceMessage(device_id, kind, bytes(payload),
                                                         retained))
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
                state = self._active.get(device_id, {}).get(rid)
                if state is not None:
                    state.waiting.clear()  # the one being served stops at its next frame
            self._counters.bump("cancels")
            return
        if request.window > self._max_window:
            self._refuse(device_id, ErrorFrame(
                rid, ErrorCode.BAD_REQUEST, f"window {request.window} > {self._max_window}"))
            return
        with self._lock:
            outcome = self._enqueue_locked(device_id, request)
        if outcome == "queued":
            self._counters.bump("requests")
        elif outcome == "duplicate":
            self._counters.bump("duplicates")
        elif outcome == "device-busy":
            self._refuse(device_id, ErrorFrame(
                rid, ErrorCode.BUSY, f"more than {self._max_per_device} requests in flight"))
        else:
            self._refuse(device_id, ErrorFrame(rid, ErrorCode.UNAVAILABLE, "server busy"))

    def _refuse(self, device_id: str, frame: ErrorFrame) -> None:
        """Answer a request refused at once, within the device's refusal rate (network thread)."""
        if self._refusal_rate.allow(device_id):
            self._send(device_id, frame)
        else:
            self._counters.bump("refusals_dropped")

    def _enqueue_locked(self, device_id: str, request: FetchRequest) -> str:
        """Queue ``request`` unless it is a duplicate or over a bound; say which (lock held)."""
        key = (device_id, request.request_id, request.offset)
        if key in self._seen:
            return "duplicate"
        fetches = self._active.setdefault(device_id, {})
        state = fetches.get(request.request_id)
        if state is not None:
            # Another window of this fetch is queued or being served: wait behind it.
            if state.windows >= _MAX_JOBS_PER_FETCH:
                return "device-busy"
            state.waiting.append(request)
            self._seen.add(key)
            return "queued"
        if len(fetches) >= self._max_per_device:
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
        fetches[request.request_id] = _FetchState()
        return "queued"

    # -- workers ------------------------------------------------------------

    def _work(self) -> None:
        job: _Job | None = None
        while job is not None or (job := self._queue.get()) is not None:
            try:
                filters = self._filters
                if not filters or not any(f.on_request(job.device_id, job.request)
                                          for f in filters):
                    self._serve(job.device_id, job.request)
            except Exception:
                # A worker must survive any one request; the device sees a 503 and retries.
                logger.exception("serving %s to %s failed", job.request.path, job.device_id)
                self._send(job.device_id, ErrorFrame(
                    job.request.request_id, ErrorCode.UNAVAILABLE, "server error"))
            finally:
                with self._lock:
                    job = self._release(job)

    def _release(self, job: _Job) -> _Job | None:
        """One window of a fetch is done (lock held); returns the next one to serve at once, if any.

        The next window goes to the back of the work queue, so windows of
        other fetches get their turn; if no other window waits, or the queue is
        full, this worker serves it right away (no hand-over to another thread;
        and an accepted window must not be lost).
        """
        fetches = self._active.get(job.device_id, {})
        rid = job.request.request_id
        state = fetches.get(rid)
        if state is not None and state.waiting:
            following = _Job(job.device_id, state.waiting.popleft())
            if self._queue.empty():
                return following  # nobody else waits: no hand-over to another worker
            try:
                self._queue.put_nowait(following)
            except queue.Full:
                return following
            return None
        fetches.pop(rid, None)
        if not fetches:
            self._active.pop(job.device_id, None)
        return None

    def _dispatch(self) -> None:
        handler = self._on_device_message
        assert handler is not None  # only started with a handler
        replayed: DeviceMessageHandler = getattr(handler, "retained", handler)
        while (item := self._device_queue.get()) is not None:
            try:
                if item.oversize is not None:
                    if self._oversize_hook is not None:
                        self._oversize_hook(item.device_id, item.kind, item.oversize)
                    continue
                (replayed if item.retained else handler)(item.device_id, item.kind, item.payload)
            except Exception:
                # One bad message must not end the dispatcher; the handler owns its errors.
                self._counters.bump("device_errors")
                logger.exception("handling %s from %s failed", item.kind, item.device_id)

    def _is_cancelled(self, device_id: str, rid: str) -> bool:
        with self._lock:
            return (device_id, rid) in self._cancelled

    def _authorized(self, device_id: str, path: str) -> bool:
        """``image/...`` for everyone; ``director/{id}/...`` only for that device."""
        parts = path.split("/")
        if parts[0] == DIRECTOR:
            return len(parts) > 1 and parts[1] == device_id
        return True

    def _open(self, request_path: str) -> io.FileIO:
        """Open the stored file for ``request_path``, unbuffered (chunks are read into frames).

        Where a request path's file lives is cached, with the identity
        (device, inode) of the file the store vouched for. A cached path is
        opened without following a symlink, and used only if it is still that
        same file: a file gone (garbage-collected, a removed device's folder),
        replaced (a new ``timestamp.json`` is a new inode: metadata is written
        by rename), or a symlink or directory planted since, goes back through
        the store's checks. The store's lookup resolves every component of the
        path, which for the metadata round trips of a fleet update was a fifth
        of the bridge's CPU.

        Raises:
            RepoFileNotFoundError, FileNotFoundError: no such file.
        """
        with self._lock:
            cached = self._paths.get(request_path)
        if cached is not None:
            path, identity = cached
            opened = _open_no_follow(path)
            if opened is not None:
                st = os.fstat(opened.fileno())
                if (st.st_dev, st.st_ino) == identity:
                    return opened
                opened.close()
            with self._lock:
                self._paths.pop(request_path, None)
        path = self._store.file_for_request(request_path)
        opened = path.open("rb", buffering=0)
        if path.name != request_path.rpartition("/")[2]:
            # Found under another name (a link followed): a newer file put under
            # the requested name would not be seen by the identity check.
            return opened
        st = os.fstat(opened.fileno())
        with self._lock:
            self._paths[request_path] = (path, (st.st_dev, st.st_ino))
            self._paths.move_to_end(request_path)
            while len(self._paths) > _PATH_CACHE:
                self._paths.popitem(last=False)
        return opened

    def _serve(self, device_id: str, request: FetchRequest) -> None:
        """Send one window of ``request`` from the store (interception: :class:`FrameFilter`)."""
        rid = request.request_id
        if not self._authorized(device_id, request.path):
            self._send(device_id, ErrorFrame(rid, ErrorCode.FORBIDDEN, "not this device's file"))
            return
        try:
            opened = self._open(request.path)
        except (RepoFileNotFoundError, FileNotFoundError):
            self._send(device_id, ErrorFrame(rid, ErrorCode.NOT_FOUND, "no such file"))
            return
        with opened:
            st = os.fstat(opened.fileno())
            size = st.st_size
            # Which version of the file: a CRC remembered for its bytes is only
            # reused while the file is the same one, unmodified.
            version = (st.st_dev, st.st_ino, st.st_mtime_ns, size)
            if size > request.max_length:
                self._send(device_id, ErrorFrame(
                    rid, ErrorCode.TOO_LARGE, f"file is {size} bytes > max {request.max_length}"))
                return
            if request.offset > size:
                self._send(device_id, ErrorFrame(
                    rid, ErrorCode.BAD_RANGE, f"offset {request.offset} > size {size}"))
                return
            file_id, content_id = file_identity(request.path, opened)
            topic = self._topics.device(device_id, DeviceTopic.RX)
            header = chunk_header_size(rid)
            offset = request.offset
            opened.seek(offset)
            for _ in range(request.window):
                if self._is_cancelled(device_id, rid):
                    return
                want = min(self._chunk_size, size - offset)
                # The chunk is read straight into its frame: no copy to build it.
                frame = bytearray(header + want)
                with memoryview(frame) as view:
                    got = opened.readinto(view[header:])
                if got != want:
                    raise OSError(f"{request.path} shrank while being served")
                key = (file_id, version, offset, want)
                known = self._crc(key) if content_id else None
                crc = pack_chunk(frame, request_id=rid, file_id=file_id, offset=offset,
                                 total=size, content_id=content_id, crc=known)
                if content_id and known is None:
                    self._remember_crc(key, crc)
                if not self._send_chunk(device_id, topic, request.path, frame, want):
                    return
                offset += want
                if offset == size:
                    return

    def _crc(self, key: _CrcKey) -> int | None:
        with self._lock:
            return self._crcs.get(key)

    def _remember_crc(self, key: _CrcKey, crc: int) -> None:
        with self._lock:
            self._crcs[key] = crc  # oldest forgotten first
            while len(self._crcs) > _CRC_CACHE:
                self._crcs.popitem(last=False)

    def _send_chunk(self, device_id: str, topic: str, path: str, frame: bytearray,
                    payload: int) -> bool:
        """Publish one encoded data frame, waiting for room; ``False`` ends the window.

        Installed filters see (and may change or drop) the frame first.
        """
        filters = self._filters
        if filters and not all(f.on_chunk(device_id, path, frame, payload) for f in filters):
            return False
        # Counted before publishing: once a device holds the frame, the counters show it.
        self._counters.chunk(device_id, path, payload, len(frame))
        if self._publish(topic, frame, wait=True):
            return True
        self._counters.chunk(device_id, path, -payload, -len(frame), -1)
        return False

    def _send(self, device_id: str, frame: Frame, *, path: str = "") -> bool:
        """Publish one frame on the device's ``rx``; ``False`` if it could not be queued.

        Error frames never wait (they may come from paho's network thread);
        chunk frames wait for room like :meth:`_send_chunk`.
        """
        data = encode_frame(frame)
        topic = self._topics.device(device_id, DeviceTopic.RX)
        if isinstance(frame, ChunkFrame):
            return self._send_chunk(device_id, topic, path, bytearray(data), len(frame.payload))
        self._counters.error(frame.code, len(data))
        if self._publish(topic, data, wait=False):
            return True
        self._counters.error(frame.code, -len(data), -1)
        return False

    def _publish(self, topic: str, data: bytes | bytearray, *, wait: bool) -> bool:
        """Publish at QoS 1 within the outgoing bound; ``False`` if it could not be queued.

        With ``wait`` (workers), wait for the broker to acknowledge earlier
        frames while ``max_queued_frames`` are unacknowledged: back-pressure,
        not loss. Without it (the network thread, notifications) the frame
        uses the reserve above that bound, and is dropped and counted if even
        that is full.
        """
        with self._room:
            if wait and self._unacked >= self._max_unacked:
                self._counters.bump("backpressure_waits")
                if not self._room.wait_for(
                        lambda: self._unacked < self._max_unacked or self._stopping,
                        self._send_timeout) or self._stopping:
                    self._counters.bump("send_stalls")
                    self._repeats.log("stall", "outgoing queue full for %.0fs: abandoning "
                                      "a window", self._send_timeout)
                    return False
            self._unacked += 1
        info = self._client.publish(topic, data, qos=1)
        if info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            # NO_CONN: paho keeps the QoS 1 message and sends it after reconnecting.
            return True
        with self._room:
            self._unacked -= 1
            self._room.notify()
        self._counters.bump("frames_dropped")
        self._repeats.log(("not queued", info.rc), "outgoing frame not queued (%s)",
                          mqtt.error_string(info.rc))
        return False


def _open_no_follow(path: Path) -> io.FileIO | None:
    """``path`` opened for reading, unbuffered, unless it is gone or is now a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:  # gone, or a symlink (ELOOP): look it up again
        return None
    return os.fdopen(fd, "rb", buffering=0)


def _no_delay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    """Turn off Nagle: a fetch is request/response, and small frames must not wait 40 ms."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
