"""A private Mosquitto with the production TLS setup, for tests that connect many devices.

The fixture ``tls_mosquitto`` creates a fleet CA in the test's ``tmp_path``
(``running_fleet_mosquitto`` does the same for a given CA, e.g. a server home's),
writes the broker files exactly as ``edgeota broker-config`` does
(``write_mosquitto_files``: TLS, client certificates required, the fleet ACL)
and runs them through ``mosquitto_support.MosquittoBroker``, so ``restart()``
and ``kill()`` work as for the plain broker. Device identities are issued on
demand with ``write_device_tls`` and connect to ``port`` (the device
listener); the server identity is the bridge certificate the broker files
hold (from the services CA) and connects to ``server_port``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mosquitto_support import MOSQUITTO, MosquittoBroker, _free_port

from edgeota.protocol.fetch import MqttTls
from edgeota.server.broker_config import BrokerFiles, write_mosquitto_files
from edgeota.server.fleet_ca import TLS_CERT_FILE, TLS_KEY_FILE, FleetCA, write_device_tls

__all__ = ["TlsFleetBroker", "running_fleet_mosquitto", "tls_mosquitto"]

HOST = "127.0.0.1"


@dataclass
class TlsFleetBroker:
    """A running TLS broker with the fleet ACL, and the identities that may use it."""

    broker: MosquittoBroker
    ca: FleetCA
    files: BrokerFiles

    @property
    def host(self) -> str:
        return self.broker.host

    @property
    def port(self) -> int:
        """The device listener."""
        return self.broker.port

    @property
    def server_port(self) -> int:
        """The server listener (services CA certificates only): where bridges connect."""
        return self.files.server_port

    @property
    def server_tls(self) -> MqttTls:
        """The edgeota server identity (what the FetchBridge connects with)."""
        return MqttTls(self.files.ca_cert, self.files.bridge_cert, self.files.bridge_key)

    def device_tls(self, device_id: str) -> MqttTls:
        """A device identity (certificate CN = ``device_id``), issued on first use."""
        folder = self.files.folder.parent / "devices" / device_id
        if not (folder / TLS_CERT_FILE).exists():
            write_device_tls(folder, device_id, self.ca)
        return MqttTls(self.files.ca_cert, folder / TLS_CERT_FILE, folder / TLS_KEY_FILE)


@contextlib.contextmanager
def running_fleet_mosquitto(ca: FleetCA, folder: Path) -> Iterator[TlsFleetBroker]:
    """Mosquitto on a free loopback port with the files ``edgeota broker-config`` writes
    for ``ca`` (TLS, client certificates required, the fleet ACL), under ``folder``."""
    if shutil.which(MOSQUITTO) is None:
        reason = f"mosquitto binary not found at {MOSQUITTO}; install the mosquitto package"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    # Started as root, Mosquitto switches to another user, who cannot read our 0600 files.
    run_as = "root" if os.geteuid() == 0 else None
    last_error: Exception | None = None
    for attempt in range(3):  # another process may take the free port first
        port, server_port = _free_port(HOST), _free_port(HOST)
        if server_port == port:
            continue
        files = write_mosquitto_files(ca, folder / f"tls-broker-{attempt}", host=HOST,
                                      port=port, server_port=server_port, run_as=run_as)
        broker = MosquittoBroker(HOST, port, None, files.folder)  # type: ignore[arg-type]
        try:
            broker.start()
        except RuntimeError as e:
            last_error = e
            continue
        try:
            yield TlsFleetBroker(broker, ca, files)
        finally:
            broker.stop()
        return
    raise RuntimeError(f"could not start the TLS mosquitto: {last_error}")


@pytest.fixture
def tls_mosquitto(tmp_path: Path) -> Iterator[TlsFleetBroker]:
    """Mosquitto on a free loopback port with the production TLS + ACL files."""
    with running_fleet_mosquitto(FleetCA.create(tmp_path / "fleet-ca"), tmp_path) as broker:
        yield broker
