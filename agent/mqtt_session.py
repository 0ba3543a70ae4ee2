"""The device's one MQTT session: connection, presence, notify, and frame routing.

:class:`DeviceConnection` is the device's only MQTT client. The agent owns it
(:class:`~edgeota.agent.runner.Agent` opens it when ``agent.toml`` names the
MQTT transport) and everything the device says or hears over MQTT goes
through it: fetch requests and their response frames (for
:mod:`edgeota.agent.mqtt_fetcher`), signed status reports, telemetry,
presence (``online`` with a last will) and the server's ``notify``.

paho runs the network loop in a thread of its own; a process that hosts many
devices (the simulator) hands in a :class:`NetworkLoop` that drives all their
clients instead, and everything else behaves the same. The connection
reconnects with exponential backoff (each device's delays jittered so a fleet
does not reconnect in lock-step after a broker restart), subscribes to the
device's own ``rx`` and ``notify`` topics and routes each incoming frame, by
request id, to the :class:`Inbox` of the fetch waiting for it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import random
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from tuf.api import exceptions

from edgeota.agent.config import AgentConfig, AgentConfigError
from edgeota.protocol.fetch import (
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
    "ConnectionCounters",
    "ConnectionLostError",
    "DeviceConnection",
    "Failure",
    "FrameRejectedError",
    "Inbox",
    "MqttFetchError",
    "NetworkLoop",
]

logger = logging.getLogger(__name__)

_PRESENCE_ONLINE = presence_bytes(online=True)
_PRESENCE_OFFLINE = presence_bytes(online=False)


class MqttFetchError(exceptions.DownloadError):
    """Base of the MQTT transport's own failures; network-side, so callers may retry."""


class ConnectionLostError(MqttFetchError):
    """The broker connection dropped (or never came up) while a fetch needed it."""


class FrameRejectedError(MqttFetchError):
    """A frame that is damaged, out of order, or contradicts the frames before it."""



class NetworkLoop(Protocol):
    """What drives many devices' paho clients on one thread (the simulator's loop).

    A device runs one client and needs none: without one, paho's own thread
    runs the connection. The simulator's
    :class:`~edgeota.simulator.mqtt_loop.SharedNetworkLoop` satisfies this.
    """

    def connect(self, client: mqtt.Client, host: str, port: int, keepalive: int, *,
                min_delay: float, max_delay: float, name: str) -> None:
        """Connect ``client`` and keep it connected, retrying with that backoff."""

    def remove(self, client: mqtt.Client, timeout: float = 5.0) -> bool:
        """Disconnect ``client`` cleanly (bounded by ``timeout``) and stop driving it."""


@dataclass(frozen=True)
class ConnectionCounters:
    """What arrived on ``rx`` and was not delivered to a fetch (snapshot)."""

    frames: int = 0
    corrupt: int = 0  # undecodable frames
    stray: int = 0  # frames for no waiting fetch (another or an old request id)
    connections: int = 0  # times connected and subscribed


class Failure:
    """Something that ends a fetch, queued in order with its frames."""

    def __init__(self, error: exceptions.DownloadError) -> None:
        self.error = error


InboxItem = ChunkFrame | ErrorFrame | Failure


class Inbox:
    """Frames for one request id; bounded, so a flooding sender cannot exhaust memory."""

    def __init__(self, capacity: int) -> None:
        self._items: collections.deque[InboxItem] = collections.deque()
        self._cond = threading.Condition()
        self._capacity = capacity
        self._flooded = False

    def put(self, item: InboxItem) -> None:
        with self._cond:
            if self._flooded:
                return
            if len(self._items) >= self._capacity and not isinstance(item, Failure):
                self._flooded = True
                self._items.append(Failure(FrameRejectedError(
                    f"more than {self._capacity} frames queued for one request")))
            else:
                self._items.append(item)
            self._cond.notify()

    def get(self, timeout: float) -> InboxItem | None:
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
        network: NetworkLoop | None = None,
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
        # Called (on paho's thread) with the topic kind and QoS of every message
        # received, before it is routed: a diagnostics seam (the QoS the broker
        # delivers at is the subscription's, which tests assert).
        self.on_received: Callable[[DeviceTopic, int], None] | None = None
        self._fetch_topic = self._topics.device(device_id, DeviceTopic.FETCH)
        self._host, self._port, self._keepalive = host, port, keepalive
        self._lock = threading.Lock()
        self._streams: dict[str, Inbox] = {}
        self._counts = {"frames": 0, "corrupt": 0, "stray": 0, "connections": 0}
        self._ready = threading.Condition()
        self._is_ready = False
        self._subscribe_mid: int | None = None
        self._started = False
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or device_id,
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

    @classmethod
    def for_device(cls, config: AgentConfig, *, network: NetworkLoop | None = None
                   ) -> DeviceConnection:
        """The session ``agent.toml`` describes: TLS with the device certificate (not started).

        Raises:
            AgentConfigError: no ``[mqtt] url``, or one that is not ``mqtts://HOST[:PORT]``.
        """
        if not config.mqtt_url:
            raise AgentConfigError("agent.toml names no [mqtt] url for the MQTT transport")
        parts = urlsplit(config.mqtt_url)
        if parts.scheme != "mqtts" or not parts.hostname:
            raise AgentConfigError(f"MQTT url {config.mqtt_url!r} must be mqtts://HOST:PORT")
        return cls(
            config.device_id, host=parts.hostname, port=parts.port or 8883,
            tls=MqttTls(ca_file=config.ca_cert, cert_file=config.tls_cert,
                        key_file=config.tls_key),
            network=network,
        )

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

    def open_stream(self, request_id: str, capacity: int) -> Inbox:
        inbox = Inbox(capacity)
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
        # paho types it as its SocketLike protocol (no shutdown); over TCP, the
        # only transport this session configures, it is a socket or an
        # ssl.SSLSocket (a socket subclass), and None when not connected.
        if not isinstance(sock, socket.socket):
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
            inbox.put(Failure(ConnectionLostError(why)))

    def _on_message(self, _client: mqtt.Client, _userdata: Any,
                    message: mqtt.MQTTMessage) -> None:
        observer = self.on_received
        if observer is not None:
            observer(DeviceTopic.NOTIFY if message.topic == self._notify else DeviceTopic.RX,
                     message.qos)
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
                inbox.put(Failure(FrameRejectedError(f"bad frame: {e}")))
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



def _no_delay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    """Turn off Nagle: a fetch is request/response, and small frames must not wait 40 ms."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
