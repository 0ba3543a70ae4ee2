"""An MQTT broker inside this process, with the same access rules as the Mosquitto setup.

The demo, the simulator and laptops run amqtt in process instead of a system
Mosquitto (DESIGN "Transport"). It must not be a weaker broker: it listens
only with TLS, requires a client certificate from the fleet CA, and enforces
the rules ``edgeota.server.broker_config`` writes into Mosquitto's ACL --
the identity is the certificate CN; the server identity may read and write
every ``{prefix}/devices/#`` topic; device X may only publish on
``devices/X/{fetch,status,telemetry,online}`` and only receive
``devices/X/{notify,rx}``. ``tests/test_broker_acl.py`` runs one suite
against both brokers.

amqtt (0.12) needs these things from us for that, most through its public
API, a few through internals (``pyproject.toml`` pins the amqtt version they
were written for; ``tests/test_dependency_pins.py`` fails, naming the
internal, when an upgrade moves one, and :meth:`EmbeddedBroker.start` and
:class:`_EdgeotaBroker` refuse to run without them):

* **TLS that requires a client certificate.** amqtt's own listeners ask for
  one but accept connections without (``CERT_OPTIONAL``), so the broker
  listens on an amqtt *external* listener: :meth:`EmbeddedBroker.start` runs
  its own asyncio TLS server (``CERT_REQUIRED``, TLS 1.2 or later) and hands
  each verified connection to ``Broker.external_connected``.
* **Its stock ACL plugin is static** (a fixed topic list per user name), so
  :class:`CertificateAclPlugin` -- one amqtt auth plugin and topic plugin --
  decides with :class:`BrokerAcl`, a pure policy with no I/O.
* **The identity is this connection's certificate.** The plugin API has no
  "peer certificate", and the ``ssl_object`` amqtt keeps on a ``Session``
  is the *first* connection's when a client resumes a persistent session (a
  reconnect would be judged by someone else's certificate). The CN the TLS
  layer verified is put in a context variable by the connection's task
  before amqtt reads the CONNECT; amqtt awaits the auth plugins from that
  task (``asyncio.ensure_future`` copies the context), so the plugin reads
  exactly this connection's identity -- never the user name or client id the
  client sends. If amqtt ever ran them elsewhere the variable would be unset
  and every connection refused: fails closed.
* **A client id is bound to the certificate** (issue 21). amqtt drops the
  session holding a client id -- its subscriptions, and with the bridge's
  the whole fleet's fetches -- while it reads the CONNECT, before any auth
  plugin is asked. So the TLS hand-over reads the CONNECT first
  (:func:`parse_connect`), answers another identity's id with CONNACK 2
  itself (:meth:`BrokerAcl.connect_verdict`: a device is its own id, the
  server its identity or ``{identity}-{tag}``) and hands amqtt only the
  connections it accepts, replaying their CONNECT. Nothing changes for
  anyone else.
* **Limits amqtt does not have** (:class:`BrokerLimits`), applied by the
  hand-over's reader and writer (:class:`_GuardedReader`,
  :class:`_GuardedWriter`, amqtt's public adapter interfaces): a packet over
  ``max_packet_size`` is refused from its fixed header, its body never read;
  a device's PUBLISH packets are paced; a client that stops reading is
  disconnected, one that never sends a CONNECT too. The plugin refuses a
  delivery to a client holding ``max_queued`` messages already.
* **Retained messages skip the RECEIVE check** (an internal): amqtt sends them on
  SUBSCRIBE and at connect -- the latter for every filter *any* client holds
  -- without the check live messages get. :class:`_EdgeotaBroker` overrides
  ``_publish_retained_messages_for_subscription`` (no public hook exists)
  and otherwise uses only the broker's public properties.
* **Its subscription table is iterated while it changes** (an internal): a
  client that subscribes during a broadcast ends that broadcast ("dictionary
  changed size during iteration") and the message is lost; the table
  (``Broker._subscriptions``, also what the public ``subscriptions``
  returns) is replaced by one that iterates over a snapshot
  (:class:`_SnapshotSubscriptions`).
* **Its delivery task list keeps what is finished** (an internal): amqtt
  lets go of finished deliveries from the front of ``Broker._tasks_queue``
  only, so one stuck delivery kept every later one and its message; it is
  replaced by :class:`_RunningDeliveries`.
* **It acknowledges a PUBLISH before broadcasting it, into a queue with no
  bound** (an internal, read only): while ``Broker._broadcast_queue`` holds
  ``max_backlog`` messages, the hand-over's readers read no PUBLISH, so
  senders wait in their own bounded queues instead of the broker's memory.
* **It logs a warning per message** in places a client controls (each PUBACK
  never sent): a filter on its loggers lets each kind through once a minute,
  with a count (:class:`_RepeatFilter`), while a broker runs.

Differences from Mosquitto 2.0 that remain, none of which lets data through:
a SUBSCRIBE whose filter can never match a topic the client may read is
refused (SUBACK 0x80) where Mosquitto grants it and then delivers nothing; a
certificate CN that is neither a device id nor the server identity is refused
at CONNECT; a persistent session cannot be resumed under a different
certificate identity (refused; Mosquitto starts it afresh); a CONNECT asking
for another identity's client id is refused (Mosquitto, as ``broker_config``
sets it up, connects the client under its own id instead); amqtt speaks MQTT
3.1.1 and 3.1 only (an MQTT 5 CONNECT is answered 1) and does not implement
shared subscriptions (a ``$share/...`` filter is checked against the ACL like
the filter it wraps, then matches nothing); a client reconnecting with
``clean_session`` false onto the session a clean one left keeps amqtt's
clean-session handling (its offline messages are not kept; agents use clean
sessions).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import functools
import logging
import re
import shutil
import ssl
import struct
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import OutgoingApplicationMessage, Session
from cryptography import x509
from cryptography.x509.oid import NameOID

from edgeota.protocol.errors import EdgeotaError
from edgeota.protocol.files import atomic_write, write_private_file
from edgeota.protocol.identity import (
    SERVER_IDENTITY,
    InvalidDeviceIdError,
    validate_device_id,
)
from edgeota.protocol.topics import DEFAULT_PREFIX, DEVICE_PUBLISHES, DEVICE_RECEIVES, Topics
from edgeota.server.broker_config import MAX_PACKET_SIZE
from edgeota.server.fleet_ca import CA_CERT_FILE, FleetCA, certificate_pem, private_key_pem
from edgeota.server.ratelimit import RepeatLog, TokenBucket

__all__ = [
    "AMQTT_ATTRIBUTES",
    "AMQTT_OVERRIDES",
    "START_TIMEOUT",
    "AclGrants",
    "BrokerAcl",
    "BrokerCounters",
    "BrokerLimits",
    "CertificateAclPlugin",
    "ConnackCode",
    "ConnectRequest",
    "EmbeddedBroker",
    "EmbeddedBrokerError",
    "MalformedPacketError",
    "OversizeHandler",
    "certificate_identity",
    "filters_overlap",
    "parse_connect",
    "topic_matches",
]

logger = logging.getLogger(__name__)

START_TIMEOUT = 10.0  # seconds, for start and for stop
_IDENTITY_ATTRIBUTE = "edgeota.identity"  # Session.attributes key: the certificate CN
_SHARE_PREFIX = "$share/"
_LISTENER = "default"  # the amqtt external listener our TLS server hands connections to
# amqtt Broker internals _EdgeotaBroker relies on: if an upgrade renamed one, its
# fix would silently stop applying, so start() and _EdgeotaBroker check, and
# tests/test_dependency_pins.py checks them (and their signatures) for the pinned amqtt.
AMQTT_OVERRIDES = (
    "_publish_retained_messages_for_subscription",  # the RECEIVE check on retained messages
)
AMQTT_ATTRIBUTES = (
    "_subscriptions",  # the subscription table, replaced by one iterated over a snapshot
    "_tasks_queue",  # the broadcast's delivery tasks, replaced by one that keeps running ones only
    "_broadcast_queue",  # messages received and not yet broadcast: only its length is read
)
# A replica's client id: the server identity, '-' and this (e.g. a random hex tag).
_REPLICA_SUFFIX_RE = re.compile(r"-[A-Za-z0-9_-]{1,48}")
_BACKLOG_POLL = 0.002  # seconds between looks at the broadcast backlog while it is full
_PUBLISH = 3  # MQTT control packet types (the high nibble of the first byte)
_CONNECT = 1
# The certificate identity (CN) of the connection whose task is running: set by
# the TLS server's connection handler before amqtt reads the CONNECT; each
# connection's task has its own copy (asyncio runs each in its own context).
_connection_identity: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "edgeota_mqtt_connection_identity", default=None)


class EmbeddedBrokerError(EdgeotaError):
    """The embedded broker could not start or stop, or amqtt lacks a hook it relies on."""


class MalformedPacketError(EmbeddedBrokerError):
    """A client's first packet is not an MQTT CONNECT this broker can read."""


# Called (on the broker's thread) with the sender's certificate identity, the
# topic of a PUBLISH refused for its size (None if unreadable) and its size.
OversizeHandler = Callable[[str, str | None, int], None]


@dataclass(frozen=True)
class BrokerLimits:
    """What one client may cost the embedded broker: Mosquitto's limits, and a few more.

    ``max_packet_size`` is Mosquitto's (``broker_config.MAX_PACKET_SIZE``, the
    whole packet, headers included): a larger packet is refused from its
    fixed header, before its body is read, and the connection is closed. A
    device's PUBLISH packets are paced to ``device_publish_rate`` a second
    (``device_publish_burst`` saved up): beyond it the broker stops reading
    that connection for a while, so TCP slows the sender down and nobody
    else waits (a device fetching 100 MB/s in 256 KiB windows asks 400 times a
    second, twice what the embedded broker carries; the burst is what every device may send at
    once without waiting, so it is also what one device can put in front of
    the others in amqtt's single broadcast queue). QoS 1 messages on their
    way to one client -- sent and not yet acknowledged, waiting to be
    written, or kept for an offline persistent session -- are at most
    ``max_queued`` for a device
    (``server_max_queued`` for the server, which reads every device's
    messages); beyond that new ones are dropped for that client, as
    Mosquitto's ``max_queued_messages`` does, and a device that never
    acknowledges holds at most that many. amqtt acknowledges a PUBLISH
    before it broadcasts it, into a queue with no bound: while
    ``max_backlog`` messages wait there, no client's next PUBLISH is read,
    so a sender (the bridge, pushing windows no device acknowledges) waits
    in its own bounded queue instead of filling the broker's memory. A client that leaves its socket
    unread for ``write_stall_timeout`` seconds while the broker has data for
    it is disconnected, and one that sends no CONNECT within
    ``connect_timeout`` seconds of its TLS handshake too.
    """

    max_packet_size: int = MAX_PACKET_SIZE  # bytes
    device_publish_rate: float = 400.0  # PUBLISH packets per second
    device_publish_burst: int = 200
    max_queued: int = 128  # messages to one device
    server_max_queued: int = 16384  # messages to the server identity
    max_backlog: int = 64  # messages received and not yet broadcast
    connect_timeout: float = 10.0  # seconds
    write_stall_timeout: float = 30.0  # seconds

    def __post_init__(self) -> None:
        if self.max_packet_size < 1024:
            raise ValueError("max_packet_size must allow at least 1 KiB")
        if self.device_publish_rate <= 0 or self.device_publish_burst < 1:
            raise ValueError("the device publish rate and burst must be positive")
        if self.max_queued < 1 or self.server_max_queued < 1 or self.max_backlog < 1:
            raise ValueError("the queue bounds must be positive")
        if self.connect_timeout <= 0 or self.write_stall_timeout <= 0:
            raise ValueError("the timeouts must be positive")


@dataclass(frozen=True)
class BrokerCounters:
    """What the embedded broker refused, for tests and operators."""

    refused_connects: int = 0  # CONNECTs answered with a refusal (no session touched)
    oversize: int = 0  # packets over max_packet_size (connection closed)
    throttled: int = 0  # times a device's PUBLISH packets were paced
    stalled: int = 0  # clients disconnected for not reading
    dropped: int = 0  # messages not queued to a client holding max_queued already


class ConnackCode(enum.IntEnum):
    """MQTT 3.1.1 CONNACK return codes (MQTT-3.2.2.3) the broker answers with."""

    ACCEPTED = 0
    UNACCEPTABLE_PROTOCOL = 1
    IDENTIFIER_REJECTED = 2
    NOT_AUTHORIZED = 5


@dataclass(frozen=True)
class ConnectRequest:
    """The parts of a CONNECT the broker decides on before amqtt sees it."""

    protocol_level: int  # 4: MQTT 3.1.1, 3: MQTT 3.1
    clean_session: bool
    client_id: str


def parse_connect(packet: bytes) -> ConnectRequest:
    """Read protocol level, clean-session flag and client id from a whole CONNECT packet.

    Raises:
        MalformedPacketError: not a CONNECT, or cut short before the client id.
    """
    try:
        if packet[0] >> 4 != _CONNECT:
            raise MalformedPacketError("the first packet is not a CONNECT")
        at = 1
        while packet[at] & 0x80:  # the remaining length (at most 4 bytes, checked by the reader)
            at += 1
        at += 1
        (name_length,) = struct.unpack_from(">H", packet, at)
        at += 2 + name_length
        level, flags = packet[at], packet[at + 1]
        at += 4  # level, flags, keep-alive
        (id_length,) = struct.unpack_from(">H", packet, at)
        at += 2
        if at + id_length > len(packet):
            raise MalformedPacketError("the CONNECT ends inside its client id")
        client_id = packet[at:at + id_length].decode("utf-8")
    except (IndexError, struct.error, UnicodeDecodeError) as e:
        raise MalformedPacketError(f"unreadable CONNECT: {e}") from e
    return ConnectRequest(level, bool(flags & 0x02), client_id)


# --- the policy: pure functions of identity and topic -------------------------------------


def topic_matches(topic: str, topic_filter: str) -> bool:
    """MQTT 3.1.1 matching of a topic name against a filter (``+``, ``#``).

    ``a/#`` also matches ``a`` (MQTT-4.7.1-2), and a filter starting with a
    wildcard never matches a ``$`` topic (MQTT-4.7.2-1), as in Mosquitto.
    """
    if topic.startswith("$") and topic_filter.startswith(("+", "#")):
        return False
    levels = topic.split("/")
    wanted = topic_filter.split("/")
    for i, level in enumerate(wanted):
        if level == "#":
            return i == len(wanted) - 1
        if i >= len(levels) or level not in ("+", levels[i]):
            return False
    return len(levels) == len(wanted)


def filters_overlap(first: str, second: str) -> bool:
    """Whether some topic name matches both filters (used for SUBSCRIBE)."""
    a, b = first.split("/"), second.split("/")
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else None
        y = b[i] if i < len(b) else None
        if x == "#" or y == "#":
            return True  # '#' also matches zero further levels
        if x is None or y is None:
            return False
        if x != y and "+" not in (x, y):
            return False
    return True


@dataclass(frozen=True)
class AclGrants:
    """What one identity may do: filters it may publish to and receive from."""

    write: tuple[str, ...]
    read: tuple[str, ...]


@dataclass(frozen=True)
class BrokerAcl:
    """The broker access rules, the same grants ``broker_config.render_acl`` writes for Mosquitto.

    Identities are certificate CNs. Service and device names come from
    disjoint alphabets (``edgeota.protocol.identity``), so no device id can
    be the server's, and none holds ``/``, ``+`` or ``#``.
    """

    topics: Topics = field(default_factory=Topics)
    server_identity: str = SERVER_IDENTITY

    def grants(self, identity: str) -> AclGrants | None:
        """The grants of ``identity``; ``None`` if it is neither the server nor a device id."""
        if identity == self.server_identity:
            everything = f"{self.topics.prefix}/devices/#"
            return AclGrants(write=(everything,), read=(everything,))
        try:
            validate_device_id(identity)
        except InvalidDeviceIdError:
            return None
        return AclGrants(
            write=tuple(self.topics.device(identity, kind) for kind in DEVICE_PUBLISHES),
            read=tuple(self.topics.device(identity, kind) for kind in DEVICE_RECEIVES),
        )

    def may_use_client_id(self, identity: str, client_id: str) -> bool:
        """Whether ``identity`` may connect as ``client_id``: a client id is bound to its identity.

        MQTT lets a client pick its id, and a broker drops the session of
        whoever held that id before; so a device connects as its own id only,
        and the server as its identity or ``{identity}-{suffix}`` (each
        replica its own). No device id starts with the server's ``_``.
        """
        if self.grants(identity) is None:
            return False
        if client_id == identity:
            return True
        return (identity == self.server_identity and client_id.startswith(identity)
                and _REPLICA_SUFFIX_RE.fullmatch(client_id, len(identity)) is not None)

    def connect_verdict(self, identity: str | None, request: ConnectRequest) -> ConnackCode:
        """What to answer a CONNECT from a connection whose certificate names ``identity``."""
        if identity is None or self.grants(identity) is None:
            return ConnackCode.NOT_AUTHORIZED
        if request.protocol_level not in (3, 4):
            return ConnackCode.UNACCEPTABLE_PROTOCOL
        if not self.may_use_client_id(identity, request.client_id):
            return ConnackCode.IDENTIFIER_REJECTED
        return ConnackCode.ACCEPTED

    def may_publish(self, identity: str, topic: str) -> bool:
        grants = self.grants(identity)
        if grants is None or "+" in topic or "#" in topic:
            return False
        return any(topic_matches(topic, allowed) for allowed in grants.write)

    def may_receive(self, identity: str, topic: str) -> bool:
        grants = self.grants(identity)
        if grants is None:
            return False
        return any(topic_matches(topic, allowed) for allowed in grants.read)

    def may_subscribe(self, identity: str, topic_filter: str) -> bool:
        """Allowed if the filter can match at least one topic the identity may receive.

        Delivery is still checked per message (``may_receive``), so a broad
        filter such as ``#`` only ever brings the identity's own topics.
        """
        grants = self.grants(identity)
        if grants is None:
            return False
        if topic_filter.startswith(_SHARE_PREFIX):  # $share/{group}/{filter}
            parts = topic_filter.split("/", 2)
            if len(parts) < 3 or not parts[1]:
                return False
            topic_filter = parts[2]
        return any(filters_overlap(topic_filter, allowed) for allowed in grants.read)


def certificate_identity(der: bytes) -> str | None:
    """The single CN of a DER certificate, or ``None`` if it has none, several or is unreadable."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        return None
    return names[0].value


# --- amqtt glue ------------------------------------------------------------------------------


class CertificateAclPlugin(BaseAuthPlugin, BaseTopicPlugin):
    """amqtt auth + topic plugin: identity from the client certificate, rules from ``BrokerAcl``.

    Loaded by amqtt from its dotted path with ``{"prefix": ...}`` as config.
    """

    @dataclass
    class Config:
        """Plugin settings (amqtt builds this from the broker config)."""

        prefix: str = DEFAULT_PREFIX
        max_queued: int = BrokerLimits.max_queued
        server_max_queued: int = BrokerLimits.server_max_queued

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self.acl = BrokerAcl(Topics(self.config.prefix))
        self.dropped = 0  # deliveries refused to a client holding its queue bound (broker thread)
        self._repeats = RepeatLog(logger)

    async def authenticate(self, *, session: Session) -> bool | None:
        """Accept a connection only with a fleet certificate whose CN the ACL knows.

        The CN is this connection's, as the TLS server verified it (see the
        module docstring): not the session's, which a resumed session keeps
        from its first connection.
        """
        identity = _connection_identity.get()
        if identity is None or self.acl.grants(identity) is None:
            logger.warning("refused MQTT client %r: no usable client certificate identity",
                           session.client_id)
            return False
        pinned = session.attributes.get(_IDENTITY_ATTRIBUTE)
        if pinned is not None and pinned != identity:
            # A persistent session (same client id) holds subscriptions and
            # queued messages checked against its first identity.
            logger.warning("refused MQTT client %r as %r: its session belongs to %r",
                           session.client_id, identity, pinned)
            return False
        if session.will_flag and not self.acl.may_publish(identity, session.will_topic or ""):
            # amqtt publishes a last will without a topic check; Mosquitto
            # drops a will its ACL forbids, and so do we.
            logger.warning("dropping last will of %r on forbidden topic %r",
                           identity, session.will_topic)
            session.will_flag = False
            session.will_topic = None
            session.will_message = None
        session.attributes[_IDENTITY_ATTRIBUTE] = identity
        session.username = identity  # like use_identity_as_username: the CN, not the claim
        return True

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None,
        action: Action | None = None,
    ) -> bool | None:
        """Publish, subscribe and receive checks for the session's certificate identity."""
        identity = session.attributes.get(_IDENTITY_ATTRIBUTE) if session is not None else None
        if session is None or not isinstance(identity, str) or not topic:
            return False
        match action:
            case Action.PUBLISH:
                return self.acl.may_publish(identity, topic)
            case Action.SUBSCRIBE:
                return self.acl.may_subscribe(identity, topic)
            case Action.RECEIVE:
                if not self.acl.may_receive(identity, topic):
                    return False
                return self._has_room(session, identity)
            case _:
                return False

    def _has_room(self, session: Session, identity: str) -> bool:
        """Whether ``session`` holds fewer messages than its bound (see :class:`BrokerLimits`).

        In flight counts what was sent and not acknowledged and what waits to
        be written (amqtt records a QoS 1 message there before writing it);
        an offline persistent session's queue counts too.
        """
        bound = (self.config.server_max_queued if identity == self.acl.server_identity
                 else self.config.max_queued)
        if session.inflight_out_count + session.retained_messages.qsize() < bound:
            return True
        self.dropped += 1
        self._repeats.log(("full", identity), "dropping messages for %r: %d already queued "
                          "to it (a client that does not read or acknowledge)", identity, bound)
        return False


class _SnapshotSubscriptions(dict[str, list[tuple[Session, int]]]):
    """amqtt's subscription table, iterated over a snapshot.

    amqtt 0.12 loops over this dict while awaiting inside the loop (and
    deletes from it while iterating), so a client subscribing during a
    broadcast ends that broadcast with "dictionary changed size during
    iteration" and the message is lost. Seen here with ten agents connecting
    at once; iterating a snapshot makes both loops safe.
    """

    def __iter__(self) -> Iterator[str]:
        return iter(list(super().keys()))

    def items(self) -> list[tuple[str, list[tuple[Session, int]]]]:  # type: ignore[override]
        return list(super().items())


# amqtt's loggers whose warnings a client can provoke once per message (a PUBACK
# that never comes, a refused publish, a takeover): the broker filters them.
_AMQTT_LOGGERS = ("amqtt.broker", "amqtt.mqtt.protocol.handler", "amqtt.session")
_VARYING = re.compile(r"\d+|'[^']*'|\"[^\"]*\"")  # ids, packet numbers, topics


class _RepeatFilter(logging.Filter):
    """Lets an amqtt warning through once a minute per kind, with a count of the held ones.

    amqtt writes a warning per message in several places (each PUBACK a
    device never sends is one), and formats the ids into the text, so the
    kind is the text with numbers and quoted parts blanked. Records below
    WARNING pass untouched. Installed on amqtt's loggers while a broker runs.
    """

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        self._interval = interval
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, _VARYING.sub("#", str(record.msg))[:120])
        now = record.created
        with self._lock:
            when, held = self._seen.get(key, (None, 0))
            if when is not None and now - when < self._interval:
                self._seen[key] = (when, held + 1)
                return False
            if len(self._seen) > 1024:
                self._seen.clear()
            self._seen[key] = (now, 0)
        if held and when is not None:
            record.msg = f"{record.msg} ({held} more like this in the last {now - when:.0f} s)"
        return True


class _RunningDeliveries(deque[asyncio.Task[OutgoingApplicationMessage]]):
    """amqtt's list of delivery tasks, holding only those still running.

    amqtt 0.12 appends every delivery it starts and lets go of finished ones
    from the front only, so one delivery that never ends (a client that does
    not read: it waits to be written) kept every later delivery, and the
    message each carries, for as long as it lasted: memory grew with the
    whole fleet's traffic. A finished task leaves at once here, its error
    logged (bounded) as amqtt would have.
    """

    def __init__(self) -> None:
        super().__init__()
        self._repeats = RepeatLog(logger)

    def append(self, task: asyncio.Task[OutgoingApplicationMessage]) -> None:
        super().append(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[OutgoingApplicationMessage]) -> None:
        with contextlib.suppress(ValueError):  # amqtt's own loop may have taken it already
            self.remove(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            self._repeats.log(type(error).__name__, "an MQTT delivery failed: %s", error)


class _EdgeotaBroker(Broker):
    """amqtt's broker with the internal fixes described in the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        table = vars(self).get("_subscriptions")
        if not isinstance(table, dict) or self.subscriptions is not table:
            raise EmbeddedBrokerError("this amqtt keeps its subscription table elsewhere than "
                                      "Broker._subscriptions: cannot make its iteration safe")
        self._subscriptions = _SnapshotSubscriptions(table)
        tasks = vars(self).get("_tasks_queue")
        if not isinstance(tasks, deque) or tasks:
            raise EmbeddedBrokerError("this amqtt keeps its delivery tasks elsewhere than "
                                      "Broker._tasks_queue: cannot bound what they hold")
        self._tasks_queue = _RunningDeliveries()
        if not isinstance(vars(self).get("_broadcast_queue"), asyncio.Queue):
            raise EmbeddedBrokerError("this amqtt keeps its broadcast queue elsewhere than "
                                      "Broker._broadcast_queue: cannot bound its backlog")

    def broadcast_backlog(self) -> int:
        """Messages received (and acknowledged to their sender) and not yet broadcast."""
        return self._broadcast_queue.qsize()

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        topic_filter, qos = subscription
        holders = self.subscriptions.get(topic_filter, [])
        if not any(held.client_id == session.client_id for held, _ in holders):
            return  # amqtt calls this at connect for every client's filters
        handler = self.sessions.get(session.client_id or "", (None, None))[1]
        if handler is None:
            return
        tasks = []
        for topic, retained in list(self.retained_messages.items()):
            if not topic_matches(topic, topic_filter):
                continue
            verdicts = await self.plugins_manager.map_plugin_topic(
                session=session, topic=topic, action=Action.RECEIVE)
            if not verdicts or not all(verdicts.values()):
                continue
            tasks.append(asyncio.ensure_future(handler.mqtt_publish(
                retained.topic, retained.data, min(qos, retained.qos or qos), retain=True)))
        if tasks:
            await asyncio.wait(tasks)


def _server_tls(ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """The listener's TLS: a fleet client certificate required, TLS 1.2 or later."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca_file))
    context.load_cert_chain(str(cert_file), str(key_file))
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class _GuardedReader(ReaderAdapter):
    """amqtt's view of one client's byte stream, read packet by packet with the limits applied.

    Each packet's fixed header is read here first: a packet over
    ``max_packet_size`` is refused before a byte of its body is read (the
    connection is closed, amqtt sees the end of the stream), and a device's
    PUBLISH waits for a token of its rate (so the kernel's TCP window, not
    the broker's memory, holds what a flooding device sends). Then amqtt
    reads the header and the body as it always does; the body goes straight
    from the stream to amqtt, no copy.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: _GuardedWriter, *,
                 identity: str | None, limits: BrokerLimits, bucket: TokenBucket | None,
                 counters: dict[str, int], on_oversize: OversizeHandler | None,
                 repeats: RepeatLog, backlog: Callable[[], int]) -> None:
        self._reader, self._writer = reader, writer
        self._identity, self._limits, self._bucket = identity, limits, bucket
        self._counters, self._on_oversize, self._repeats = counters, on_oversize, repeats
        self._backlog = backlog
        self._pending = b""  # header bytes of the current packet not yet handed to amqtt
        self._left = 0  # body bytes of the current packet not yet handed to amqtt
        self._ended = False

    async def read(self, n: int = -1) -> bytes:
        if self._ended or n == 0:
            return b""
        if not self._pending and not self._left and not await self._next_packet():
            self._ended = True
            return b""
        if n < 0:
            n = len(self._pending) + self._left
        out, self._pending = self._pending[:n], self._pending[n:]
        want = min(n - len(out), self._left)
        if want:
            body = await self._reader.readexactly(want)
            self._left -= want
            out = out + body if out else body
        return out

    def feed_eof(self) -> None:
        self._reader.feed_eof()

    async def first_packet(self) -> bytes:
        """Read the whole first packet (the CONNECT) and keep it to hand to amqtt again."""
        if not await self._next_packet():
            raise MalformedPacketError("the connection ended before a whole first packet")
        body = await self._reader.readexactly(self._left)
        self._pending += body
        self._left = 0
        return self._pending

    async def _next_packet(self) -> bool:
        """Read the next fixed header and apply the limits; ``False``: the stream ends here."""
        try:
            first = await self._reader.readexactly(1)
            header, length, shift = bytearray(first), 0, 0
            while True:
                byte = (await self._reader.readexactly(1))[0]
                header.append(byte)
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    break
                shift += 7
                if shift > 21:  # MQTT-2.2.3: at most four bytes
                    self._writer.abort()
                    return False
        except (asyncio.IncompleteReadError, ConnectionError):
            return False
        kind, total = first[0] >> 4, len(header) + length
        if total > self._limits.max_packet_size:
            await self._refuse_oversize(kind, length, total)
            return False
        if kind == _PUBLISH:
            if self._bucket is not None:
                loop = asyncio.get_running_loop()
                if delay := self._bucket.wait(loop.time()):
                    self._counters["throttled"] += 1
                    while delay:
                        await asyncio.sleep(delay)
                        delay = self._bucket.wait(loop.time())
            while self._backlog() >= self._limits.max_backlog:
                await asyncio.sleep(_BACKLOG_POLL)
        self._pending, self._left = bytes(header), length
        return True

    async def _refuse_oversize(self, kind: int, length: int, total: int) -> None:
        """Close the connection over a packet too large; tell the owner which topic it was for."""
        self._counters["oversize"] += 1
        topic = None
        if kind == _PUBLISH and length >= 2:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError,
                                     UnicodeDecodeError, TimeoutError):
                async with asyncio.timeout(self._limits.connect_timeout):
                    (size,) = struct.unpack(">H", await self._reader.readexactly(2))
                    if size <= min(1024, length - 2):
                        topic = (await self._reader.readexactly(size)).decode("utf-8")
        self._repeats.log(("oversize", self._identity),
                          "refused a %d-byte MQTT packet (limit %d) from %r on %r: disconnected",
                          total, self._limits.max_packet_size, self._identity, topic)
        self._writer.abort()
        if self._on_oversize is not None and self._identity is not None:
            try:
                self._on_oversize(self._identity, topic, total)
            except Exception:  # the owner's bug must not keep the connection open
                logger.exception("the oversize handler failed")


class _GuardedWriter(WriterAdapter):
    """amqtt's writer for one client; a client that stops reading is disconnected.

    amqtt waits for each packet to be written (``drain``) with no time
    limit: a client that never reads held its deliveries, and their
    messages, forever. Here a drain that does not end within
    ``write_stall_timeout`` closes the connection, which ends them.
    """

    def __init__(self, writer: asyncio.StreamWriter, *, identity: str | None,
                 limits: BrokerLimits, counters: dict[str, int], repeats: RepeatLog) -> None:
        self._writer, self._identity, self._limits = writer, identity, limits
        self._counters, self._repeats = counters, repeats
        self.is_closed = False

    def write(self, data: bytes) -> None:
        if not self.is_closed:
            self._writer.write(data)

    async def drain(self) -> None:
        if self.is_closed:
            return
        try:
            async with asyncio.timeout(self._limits.write_stall_timeout):
                await self._writer.drain()
        except TimeoutError:
            self._counters["stalled"] += 1
            self._repeats.log(("stalled", self._identity),
                              "MQTT client %r read nothing for %.0f s: disconnected",
                              self._identity, self._limits.write_stall_timeout)
            self.abort()
            raise ConnectionResetError("the client stopped reading") from None

    def get_peer_info(self) -> tuple[str, int] | None:
        peer = self._writer.get_extra_info("peername")
        if not peer or len(peer) < 2:
            return None
        return peer[0], peer[1]

    def get_ssl_info(self) -> ssl.SSLObject | None:
        return cast("ssl.SSLObject | None", self._writer.get_extra_info("ssl_object"))

    def abort(self) -> None:
        """Drop the connection now, unsent data included (the refusals and the stalled)."""
        self.is_closed = True
        self._writer.transport.abort()

    async def close(self) -> None:
        if self.is_closed:
            return
        self.is_closed = True
        with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
            async with asyncio.timeout(self._limits.write_stall_timeout):
                await self._writer.drain()
        self._writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
            async with asyncio.timeout(self._limits.write_stall_timeout):
                await self._writer.wait_closed()


@dataclass
class _Gatekeeper:
    """What every connection's hand-over shares: the policy, the limits, the counters."""

    acl: BrokerAcl
    limits: BrokerLimits
    on_oversize: OversizeHandler | None
    counters: dict[str, int] = field(default_factory=lambda: {
        name: 0 for name in ("refused_connects", "oversize", "throttled", "stalled")})
    repeats: RepeatLog = field(default_factory=lambda: RepeatLog(logger))
    # The hand-over tasks running (each a connection), so a stop can end them all.
    running: dict[asyncio.Task[None], _GuardedWriter] = field(default_factory=dict)

    async def close_all(self, timeout: float) -> None:
        """Drop every connection and wait (at most ``timeout``) for their tasks to end."""
        for writer in list(self.running.values()):
            writer.abort()
        if self.running:
            _done, pending = await asyncio.wait(list(self.running), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=timeout)

    async def refuse(self, writer: _GuardedWriter, code: ConnackCode, identity: str | None,
                     request: ConnectRequest) -> None:
        """Answer CONNACK ``code`` and close: amqtt never sees this connection."""
        self.counters["refused_connects"] += 1
        self.repeats.log(("refused", identity, code),
                         "refused MQTT CONNECT of %r as client id %r: %s", identity,
                         request.client_id[:80], code.name.lower())
        writer.write(bytes((0x20, 0x02, 0x00, code)))
        await writer.close()


async def _hand_over(broker: _EdgeotaBroker, gate: _Gatekeeper, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
    """One verified TLS connection (its own task): check its CONNECT, then let amqtt run it.

    The client id is checked against the certificate here, before amqtt
    reads the CONNECT: amqtt drops the session holding a client id (its
    subscriptions, and with them a device's or the whole fleet's fetches)
    before it asks any plugin who is connecting, so a refusal there would
    come too late. A refused CONNECT is answered here and changes nothing.
    """
    ssl_object = writer.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    identity = certificate_identity(der) if der else None
    limits = gate.limits
    guarded_writer = _GuardedWriter(writer, identity=identity, limits=limits,
                                    counters=gate.counters, repeats=gate.repeats)
    paced = identity is not None and identity != gate.acl.server_identity
    guarded_reader = _GuardedReader(
        reader, guarded_writer, identity=identity, limits=limits,
        bucket=TokenBucket(limits.device_publish_rate, limits.device_publish_burst)
        if paced else None, counters=gate.counters, on_oversize=gate.on_oversize,
        repeats=gate.repeats, backlog=broker.broadcast_backlog)
    task = asyncio.current_task()
    if task is not None:
        gate.running[task] = guarded_writer
    try:
        async with asyncio.timeout(limits.connect_timeout):
            request = parse_connect(await guarded_reader.first_packet())
        verdict = gate.acl.connect_verdict(identity, request)
        if verdict is not ConnackCode.ACCEPTED:
            await gate.refuse(guarded_writer, verdict, identity, request)
            return
        _connection_identity.set(identity)
        await broker.external_connected(guarded_reader, guarded_writer, _LISTENER)
    except (ConnectionError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError,
            MalformedPacketError) as e:
        # A client gone mid-way, silent, or not speaking MQTT: its connection only.
        logger.debug("MQTT connection ended: %s", e)
        guarded_writer.abort()
    except Exception:  # a bug in one connection ends that connection, never the listener
        logger.exception("MQTT connection failed")
        guarded_writer.abort()
    finally:
        if task is not None:
            gate.running.pop(task, None)


# --- the broker on its own thread -------------------------------------------------------------


class EmbeddedBroker:
    """amqtt on a thread with its own event loop, TLS with client certificates, our ACL.

    ``port=0`` lets the kernel pick a free port; ``port`` tells which after
    :meth:`start`. The broker's server certificate is issued from the fleet
    CA in ``ca_dir`` at start (so the CA key must be there) for
    ``hostnames``/``ips``, and lives in a private temporary folder removed
    at :meth:`stop`. Clients trust ``ca_cert``.
    """

    def __init__(
        self,
        ca_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        topics: Topics = Topics(),  # noqa: B008 - Topics is frozen
        hostnames: Sequence[str] = ("localhost",),
        ips: Sequence[str] = ("127.0.0.1",),
        limits: BrokerLimits = BrokerLimits(),
        on_oversize: OversizeHandler | None = None,
    ) -> None:
        if ":" in host:
            # amqtt's bind parser keeps the brackets of "[::1]:port".
            raise EmbeddedBrokerError(f"the embedded broker binds IPv4 or host names, not {host!r}")
        if isinstance(port, bool) or not 0 <= port < 65536:
            raise EmbeddedBrokerError(f"invalid port {port!r}")
        self.ca_dir = Path(ca_dir)
        self.host = host
        self.topics = topics
        self.hostnames = tuple(hostnames)
        self.ips = tuple(ips)
        self._requested_port = port
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._workdir: Path | None = None
        self.limits = limits
        self._gate = _Gatekeeper(BrokerAcl(topics), limits, on_oversize)
        self._amqtt: Broker | None = None

    def counters(self) -> BrokerCounters:
        """What the broker refused so far (read from another thread: a snapshot, not a lock)."""
        plugin = (self._amqtt.plugins_manager.get_plugin(CertificateAclPlugin.__name__)
                  if self._amqtt is not None else None)
        dropped = plugin.dropped if isinstance(plugin, CertificateAclPlugin) else 0
        return BrokerCounters(dropped=dropped, **self._gate.counters)

    @property
    def ca_cert(self) -> Path:
        """The fleet CA certificate clients verify the broker with."""
        return self.ca_dir / CA_CERT_FILE

    @property
    def port(self) -> int:
        if self._port is None:
            raise EmbeddedBrokerError("the embedded broker is not running")
        return self._port

    @property
    def url(self) -> str:
        return f"mqtts://{self.host}:{self.port}"

    def _write_listener_files(self) -> tuple[Path, Path]:
        ca = FleetCA.load(self.ca_dir)
        key, cert = ca.issue_server_certificate(list(self.hostnames), list(self.ips))
        self._workdir = Path(tempfile.mkdtemp(prefix="edgeota-broker-"))  # 0700
        cert_file, key_file = self._workdir / "server.crt.pem", self._workdir / "server.key.pem"
        write_private_file(key_file, private_key_pem(key))
        atomic_write(cert_file, certificate_pem(cert))
        return cert_file, key_file

    def _broker_config(self) -> dict[str, Any]:
        return {
            # Connections come from our own TLS server (_serve), not from amqtt's.
            "listeners": {_LISTENER: {"type": "external"}},
            # Only our plugin: no anonymous auth, no $SYS tree, no packet logger.
            "plugins": {
                f"{CertificateAclPlugin.__module__}.{CertificateAclPlugin.__qualname__}": {
                    "prefix": self.topics.prefix,
                    "max_queued": self.limits.max_queued,
                    "server_max_queued": self.limits.server_max_queued,
                },
            },
        }

    def start(self) -> None:
        """Start serving; returns once the listener is bound (or raises ``EmbeddedBrokerError``)."""
        if self._thread is not None:
            raise EmbeddedBrokerError("the embedded broker is already running")
        missing = [name for name in AMQTT_OVERRIDES if not hasattr(Broker, name)]
        if missing:
            raise EmbeddedBrokerError(f"this amqtt version lacks {missing}: the embedded broker "
                                      "cannot enforce the broker ACL with it")
        cert_file, key_file = self._write_listener_files()
        tls = _server_tls(self.ca_cert, cert_file, key_file)
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, args=(self._broker_config(), tls),
                                        daemon=True, name="edgeota-broker")
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            self._abandon()
            raise EmbeddedBrokerError(f"the embedded broker did not start within {START_TIMEOUT}s")
        if self._error is not None:
            error = self._error
            self._abandon()
            raise EmbeddedBrokerError(f"the embedded broker failed to start: {error}") from error

    def stop(self) -> None:
        """Disconnect every client and close the listener; bounded by ``START_TIMEOUT``."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stop.set)
        thread.join(START_TIMEOUT)
        alive = thread.is_alive()
        self._abandon()
        if alive:
            raise EmbeddedBrokerError(f"the embedded broker did not stop within {START_TIMEOUT}s")

    def _abandon(self) -> None:
        self._thread = self._loop = self._stop = None
        self._port = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _run(self, config: dict[str, Any], tls: ssl.SSLContext) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        repeats = _RepeatFilter()
        for name in _AMQTT_LOGGERS:
            logging.getLogger(name).addFilter(repeats)
        try:
            loop.run_until_complete(self._serve(config, tls))
        except Exception as e:  # handed to start() on the caller's thread
            if self._ready.is_set():
                logger.exception("embedded broker failed while running")
            self._error = e
        finally:
            for name in _AMQTT_LOGGERS:
                logging.getLogger(name).removeFilter(repeats)
            self._ready.set()
            loop.close()

    async def _serve(self, config: dict[str, Any], tls: ssl.SSLContext) -> None:
        self._stop = asyncio.Event()
        broker = _EdgeotaBroker(config, loop=asyncio.get_running_loop())
        await broker.start()
        self._amqtt = broker
        try:
            listener = await asyncio.start_server(
                functools.partial(_hand_over, broker, self._gate), self.host,
                self._requested_port, ssl=tls, reuse_address=True)
        except BaseException:
            await asyncio.wait_for(broker.shutdown(), START_TIMEOUT / 2)
            raise
        try:
            self._port = listener.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()
        finally:
            listener.close()  # no new connections
            # Every connection dropped first: amqtt's shutdown waits on sessions a
            # paced, stalled or never-reading client would keep busy.
            await self._gate.close_all(START_TIMEOUT / 4)
            try:
                await asyncio.wait_for(broker.shutdown(), START_TIMEOUT / 2)
            except TimeoutError:
                logger.warning("embedded broker shutdown timed out; closing its loop anyway")
