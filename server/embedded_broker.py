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

amqtt (0.12) needs five things from us for that, the first three through its
public API, the last two through internals (``pyproject.toml`` pins the amqtt
version they were written for; ``tests/test_dependency_pins.py`` fails, naming
the internal, when an upgrade moves one, and :meth:`EmbeddedBroker.start`
refuses to run without them):

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

Differences from Mosquitto 2.0 that remain, none of which lets data through:
a SUBSCRIBE whose filter can never match a topic the client may read is
refused (SUBACK 0x80) where Mosquitto grants it and then delivers nothing; a
certificate CN that is neither a device id nor the server identity is refused
at CONNECT; a persistent session cannot be resumed under a different
certificate identity (refused; Mosquitto starts it afresh); amqtt speaks MQTT
3.1.1 only, has no ``max_packet_size`` and does not implement shared
subscriptions (a ``$share/...`` filter is checked against the ACL like the
filter it wraps, then matches nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import shutil
import ssl
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
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
from edgeota.server.fleet_ca import CA_CERT_FILE, FleetCA, certificate_pem, private_key_pem

__all__ = [
    "AMQTT_ATTRIBUTES",
    "AMQTT_OVERRIDES",
    "START_TIMEOUT",
    "AclGrants",
    "BrokerAcl",
    "CertificateAclPlugin",
    "EmbeddedBroker",
    "EmbeddedBrokerError",
    "certificate_identity",
    "filters_overlap",
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
)
# The certificate identity (CN) of the connection whose task is running: set by
# the TLS server's connection handler before amqtt reads the CONNECT; each
# connection's task has its own copy (asyncio runs each in its own context).
_connection_identity: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "edgeota_mqtt_connection_identity", default=None)


class EmbeddedBrokerError(EdgeotaError):
    """The embedded broker could not start or stop, or amqtt lacks a hook it relies on."""


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

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self.acl = BrokerAcl(Topics(self.config.prefix))

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
        if not isinstance(identity, str) or not topic:
            return False
        match action:
            case Action.PUBLISH:
                return self.acl.may_publish(identity, topic)
            case Action.SUBSCRIBE:
                return self.acl.may_subscribe(identity, topic)
            case Action.RECEIVE:
                return self.acl.may_receive(identity, topic)
            case _:
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


class _EdgeotaBroker(Broker):
    """amqtt's broker with the two internal fixes described in the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        table = vars(self).get("_subscriptions")
        if not isinstance(table, dict) or self.subscriptions is not table:
            raise EmbeddedBrokerError("this amqtt keeps its subscription table elsewhere than "
                                      "Broker._subscriptions: cannot make its iteration safe")
        self._subscriptions = _SnapshotSubscriptions(table)

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


async def _hand_over(broker: Broker, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
    """One verified TLS connection (its own task): note its identity, let amqtt run it."""
    ssl_object = writer.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    _connection_identity.set(certificate_identity(der) if der else None)
    try:
        await broker.external_connected(StreamReaderAdapter(reader),
                                        StreamWriterAdapter(writer), _LISTENER)
    except (ConnectionError, ssl.SSLError, TimeoutError) as e:
        # A client gone mid-way (often just after a refused CONNECT): its connection only.
        logger.debug("MQTT connection ended: %s", e)
        writer.close()
    except Exception:  # a bug in one connection ends that connection, never the listener
        logger.exception("MQTT connection failed")
        writer.close()


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
        try:
            loop.run_until_complete(self._serve(config, tls))
        except Exception as e:  # handed to start() on the caller's thread
            if self._ready.is_set():
                logger.exception("embedded broker failed while running")
            self._error = e
        finally:
            self._ready.set()
            loop.close()

    async def _serve(self, config: dict[str, Any], tls: ssl.SSLContext) -> None:
        self._stop = asyncio.Event()
        broker = _EdgeotaBroker(config, loop=asyncio.get_running_loop())
        await broker.start()
        try:
            listener = await asyncio.start_server(
                functools.partial(_hand_over, broker), self.host, self._requested_port,
                ssl=tls, reuse_address=True)
        except BaseException:
            await asyncio.wait_for(broker.shutdown(), START_TIMEOUT / 2)
            raise
        try:
            self._port = listener.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()
        finally:
            listener.close()  # no new connections; amqtt's shutdown ends the open ones
            try:
                await asyncio.wait_for(broker.shutdown(), START_TIMEOUT / 2)
            except TimeoutError:
                logger.warning("embedded broker shutdown timed out; closing its loop anyway")
