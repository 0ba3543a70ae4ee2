"""The server's MQTT side: a broker (embedded or external) and the fetch bridge.

``edgeota serve`` starts this beside the HTTP app. Without ``--broker`` the
embedded amqtt broker runs in-process with TLS and the per-device ACL; with
``--broker mqtts://host:port`` the bridge connects to that broker (Mosquitto
set up by ``edgeota broker-config``). Either way the bridge authenticates
with the server's own client certificate (CN ``_edgeota-server``), issued
from the fleet CA into a private folder at start.

On an external broker the bridge connects to its *server listener* (see
:mod:`edgeota.server.broker_config`), with a certificate from the services
CA kept beside the fleet CA, which no device holds. There several ``edgeota
serve`` replicas may share the work: each connects with a client id of its
own, ``_edgeota-server-{tag}`` (the broker would otherwise disconnect one
replica whenever another connects with the same id) and
subscribes through the shared-subscription group :data:`REPLICA_GROUP`, so
every fetch request and every device report reaches exactly one replica
(two replicas ingesting the same report would see the second copy as a
replay). The embedded broker lives inside one replica and has no shared
subscriptions, so there the bridge subscribes plainly.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy.orm import Session

from edgeota.protocol.errors import EdgeotaError
from edgeota.protocol.fetch import MqttTls
from edgeota.protocol.files import atomic_write, write_private_file
from edgeota.protocol.identity import CA_CERT_FILE, SERVER_IDENTITY
from edgeota.protocol.topics import Topics
from edgeota.server.broker_config import service_ca
from edgeota.server.embedded_broker import BrokerLimits, EmbeddedBroker
from edgeota.server.fleet_ca import FleetCA, certificate_pem, private_key_pem
from edgeota.server.mqtt_bridge import DEVICE_MESSAGE_TOPICS, FetchBridge
from edgeota.server.mqtt_ingest import DeviceMessageSink
from edgeota.server.repo.storage import RepoStore

__all__ = [
    "REPLICA_GROUP",
    "BrokerAddress",
    "MqttTransport",
    "TransportError",
    "parse_broker_url",
]

logger = logging.getLogger(__name__)

REPLICA_GROUP = "edgeota-replicas"  # the shared-subscription group of the server replicas


class TransportError(EdgeotaError):
    """The broker URL is unusable or the MQTT side did not start."""


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"mqtts://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtts://host:port`` (TLS is mandatory: devices authenticate with certificates)."""
    parts = urlsplit(url)
    if parts.scheme != "mqtts" or not parts.hostname:
        raise TransportError(f"broker URL {url!r} must look like mqtts://HOST:PORT")
    return BrokerAddress(parts.hostname, parts.port or 8883)


class MqttTransport:
    """Broker (if embedded) plus fetch bridge, started and stopped together."""

    def __init__(
        self,
        ca_dir: Path,
        store: RepoStore,
        *,
        broker_url: str | None = None,
        embedded_host: str = "127.0.0.1",
        embedded_port: int = 0,
        sessions: Callable[[], Session] | None = None,
        clock: Callable[[], datetime] | None = None,
        broker_limits: BrokerLimits = BrokerLimits(),  # noqa: B008 - frozen
    ) -> None:
        self._ca_dir = ca_dir
        self._broker_limits = broker_limits
        self._store = store
        self._external = parse_broker_url(broker_url) if broker_url else None
        self._embedded_host = embedded_host
        self._embedded_port = embedded_port
        self.broker: EmbeddedBroker | None = None
        self.bridge: FetchBridge | None = None
        # Status, telemetry and presence go to the database when one is given.
        self.sink = (DeviceMessageSink(sessions, clock=clock or (lambda: datetime.now(UTC)))
                     if sessions is not None else None)
        self._identity_dir: Path | None = None

    @property
    def address(self) -> BrokerAddress:
        if self._external is not None:
            return self._external
        if self.broker is None:
            raise TransportError("the MQTT transport is not running")
        return BrokerAddress(self.broker.host, self.broker.port)

    def _server_identity(self) -> MqttTls:
        """The bridge's client certificate: from the fleet CA (embedded) or the services CA."""
        ca = FleetCA.load(self._ca_dir)
        if self._external is not None:
            ca = service_ca(ca)  # what the generated server listener trusts, alone
        key, cert = ca.issue_service_client_certificate(SERVER_IDENTITY)
        self._identity_dir = Path(tempfile.mkdtemp(prefix="edgeota-bridge-"))  # 0700
        cert_file = self._identity_dir / "bridge.crt.pem"
        key_file = self._identity_dir / "bridge.key.pem"
        atomic_write(cert_file, certificate_pem(cert))
        write_private_file(key_file, private_key_pem(key))
        return MqttTls(ca_file=self._ca_dir / CA_CERT_FILE, cert_file=cert_file,
                       key_file=key_file)

    def start(self) -> None:
        try:
            if self._external is None:
                self.broker = EmbeddedBroker(self._ca_dir, host=self._embedded_host,
                                             port=self._embedded_port,
                                             limits=self._broker_limits,
                                             on_oversize=self._refused_for_size)
                self.broker.start()
            address = self.address
            if self.sink is not None:
                self.sink.start()
            external = self._external is not None
            client_id = (f"{SERVER_IDENTITY}-{secrets.token_hex(4)}" if external
                         else SERVER_IDENTITY)
            self.bridge = FetchBridge(self._store, host=address.host, port=address.port,
                                      client_id=client_id, tls=self._server_identity(),
                                      on_device_message=self.sink,
                                      shared_group=REPLICA_GROUP if external else None)
            self.bridge.start()
        except BaseException:
            self.stop()
            raise
        logger.info("MQTT transport on %s", self.address.url)

    def _refused_for_size(self, identity: str, topic: str | None, size: int) -> None:
        """The embedded broker closed a connection over a packet too large (its thread).

        A device's status report among them is audited as rejected, as the
        bridge does for one above its payload bound (the threat model says
        rejected reports leave a trace); only the size is known.
        """
        if self.sink is None or topic is None:
            return
        try:
            device_id, kind = Topics().parse(topic)
        except ValueError:
            return
        if device_id == identity and kind in DEVICE_MESSAGE_TOPICS:
            self.sink.oversize(device_id, kind, size)

    def notify(self, device_id: str) -> None:
        if self.bridge is not None:
            self.bridge.notify(device_id)

    def stop(self) -> None:
        if self.bridge is not None:
            self.bridge.stop()
            self.bridge = None
        if self.sink is not None:
            self.sink.stop()  # commits what arrived; a no-op when not started
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        if self._identity_dir is not None:
            shutil.rmtree(self._identity_dir, ignore_errors=True)
            self._identity_dir = None

    def __enter__(self) -> MqttTransport:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
