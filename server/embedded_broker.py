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

amqtt (0.12) needs four things from us for that:

* **Its stock ACL plugin is static** (a fixed topic list per user name), so
  :class:`CertificateAclPlugin` -- one amqtt auth plugin and topic plugin --
  decides with :class:`BrokerAcl`, a pure policy with no I/O.
* **The plugin API has no "peer certificate"**, but every ``Session`` carries
  ``ssl_object``: amqtt sets it at CONNECT from the stream writer's
  ``get_extra_info("ssl_object")`` (``amqtt/mqtt/protocol/broker_handler.py``),
  and ``SSLObject.getpeercert(binary_form=True)`` gives the DER certificate
  the TLS layer verified. The CN is read from that, never from the user name
  or client id the client sends.
* **Some of its behaviour is unsafe for us**, fixed in :class:`_EdgeotaBroker`:
  its TLS context asks for client certificates but accepts connections
  without one (``CERT_OPTIONAL``); when a client resumes a persistent session
  the old session object keeps the *previous* connection's ``ssl_object``
  (so a reconnect would be judged by someone else's certificate); and
  retained messages are sent on SUBSCRIBE and at connect -- the latter for
  every filter *any* client holds -- without the RECEIVE check that live
  messages get. The subclass overrides exactly those three methods, and
  :meth:`EmbeddedBroker.start` refuses to run if an amqtt upgrade moved them.
* **Its subscription table is iterated while it changes**: a client that
  subscribes during a broadcast ends that broadcast ("dictionary changed size
  during iteration") and the message is lost; the table is replaced by one
  that iterates over a snapshot (:class:`_SnapshotSubscriptions`).

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
import logging
import shutil
import ssl
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
# amqtt Broker internals _EdgeotaBroker overrides or calls: if an upgrade
# renamed one, an override would silently stop applying, so start() checks.
_AMQTT_HOOKS = (
    "_create_ssl_context",
    "_initialize_client_session",
    "_publish_retained_messages_for_subscription",
    "_get_handler",
    "_matches",
    "_topic_filtering",
)


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
        """Accept a connection only with a fleet certificate whose CN the ACL knows."""
        ssl_object = session.ssl_object
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        identity = certificate_identity(der) if der else None
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


class _SnapshotSubscriptions(dict):  # type: ignore[type-arg]
    """amqtt's subscription table, iterated over a snapshot.

    amqtt 0.12 loops over this dict while awaiting inside the loop (and
    deletes from it while iterating), so a client subscribing during a
    broadcast ends that broadcast with "dictionary changed size during
    iteration" and the message is lost. Seen here with ten agents connecting
    at once; iterating a snapshot makes both loops safe.
    """

    def __iter__(self):
        return iter(list(super().keys()))

    def items(self):
        return list(super().items())


class _EdgeotaBroker(Broker):
    """amqtt's broker with the fixes described in the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._subscriptions = _SnapshotSubscriptions(self._subscriptions)

    @staticmethod
    def _create_ssl_context(listener: Any) -> ssl.SSLContext:
        context = Broker._create_ssl_context(listener)
        context.verify_mode = ssl.CERT_REQUIRED  # amqtt sets CERT_OPTIONAL
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[Any, Session]:
        handler, session = await super()._initialize_client_session(
            reader, writer, remote_address, remote_port
        )
        # A resumed session is the old object: give it this connection's TLS state.
        session.ssl_object = writer.get_ssl_info()
        return handler, session

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        topic_filter, qos = subscription
        holders = self._subscriptions.get(topic_filter, [])
        if not any(held.client_id == session.client_id for held, _ in holders):
            return  # amqtt calls this at connect for every client's filters
        handler = self._get_handler(session)
        if handler is None:
            return
        tasks = []
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter):
                continue
            if not await self._topic_filtering(session, topic, Action.RECEIVE):
                continue
            tasks.append(asyncio.ensure_future(handler.mqtt_publish(
                retained.topic, retained.data, min(qos, retained.qos or qos), retain=True)))
        if tasks:
            await asyncio.wait(tasks)


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

    def _broker_config(self, cert_file: Path, key_file: Path) -> dict[str, Any]:
        return {
            "listeners": {
                "default": {
                    "type": "tcp",
                    "bind": f"{self.host}:{self._requested_port}",
                    "ssl": True,
                    "cafile": str(self.ca_cert),
                    "certfile": str(cert_file),
                    "keyfile": str(key_file),
                },
            },
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
        missing = [name for name in _AMQTT_HOOKS if not hasattr(Broker, name)]
        if missing:
            raise EmbeddedBrokerError(f"this amqtt version lacks {missing}: the embedded broker "
                                      "cannot enforce the broker ACL with it")
        cert_file, key_file = self._write_listener_files()
        config = self._broker_config(cert_file, key_file)
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, args=(config,), daemon=True,
                                        name="edgeota-broker")
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

    def _run(self, config: dict[str, Any]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(config))
        except Exception as e:  # handed to start() on the caller's thread
            if self._ready.is_set():
                logger.exception("embedded broker failed while running")
            self._error = e
        finally:
            self._ready.set()
            loop.close()

    async def _serve(self, config: dict[str, Any]) -> None:
        self._stop = asyncio.Event()
        broker = _EdgeotaBroker(config, loop=asyncio.get_running_loop())
        await broker.start()
        try:
            sockets = broker._servers["default"].instance.sockets
            self._port = sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()
        finally:
            try:
                await asyncio.wait_for(broker.shutdown(), START_TIMEOUT / 2)
            except TimeoutError:
                logger.warning("embedded broker shutdown timed out; closing its loop anyway")
