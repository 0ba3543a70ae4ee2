"""Enrolling a device from the operator's machine (``edgeota device enroll``).

The device's private keys are generated here and written only into the
enrolment folder (0600); the server receives public keys, issues the broker
certificate and a device API token, and opens the device's director
repository. The trust roots written into the folder come from the operator's
home, never from the server's answer.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgeota.protocol.files import atomic_write, make_private_dir, write_private_file
from edgeota.protocol.identity import (
    CA_CERT_FILE,
    TLS_CERT_FILE,
    TLS_KEY_FILE,
    DeviceIdentity,
    validate_device_id,
)
from edgeota.protocol.keywrap import KemSuite
from edgeota.runtime.agent_config import AgentConfig
from edgeota.server.client import OperatorClient
from edgeota.server.config import ConfigError, OperatorConfig

__all__ = ["enroll_device"]


def enroll_device(
    config: OperatorConfig,
    client: OperatorClient,
    device_id: str,
    *,
    hardware: str,
    tags: dict[str, str],
    out: Path,
    kem: KemSuite = KemSuite.X25519,
) -> AgentConfig:
    """Create the identity, register it, write ``out`` (which must not exist)."""
    validate_device_id(device_id)
    if out.exists():
        raise ConfigError(f"{out} already exists: enrolment writes a fresh folder")
    if config.trusted_image_root is None or config.trusted_director_root is None:
        raise ConfigError("operator.toml lacks the trusted roots written by `edgeota init`")
    identity = DeviceIdentity.generate(device_id, kem)
    tls_key = ec.generate_private_key(ec.SECP256R1())
    tls_public = tls_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")
    answer = client.post("/api/v1/devices", {
        "device_id": device_id,
        "hardware": hardware,
        "tags": tags,
        "identity": identity.public(tls_public_key_pem=tls_public).to_dict(),
        "tls_public_key_pem": tls_public,
    })
    folder = make_private_dir(out.resolve())
    identity.save(folder / "identity")
    write_private_file(folder / TLS_KEY_FILE, tls_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    atomic_write(folder / TLS_CERT_FILE, answer["certificate_pem"].encode("ascii"))
    atomic_write(folder / CA_CERT_FILE, answer["ca_pem"].encode("ascii"))
    atomic_write(folder / "image-root.json", config.trusted_image_root.read_bytes())
    atomic_write(folder / "director-root.json", config.trusted_director_root.read_bytes())
    write_private_file(folder / "device.token", (answer["token"] + "\n").encode("ascii"))
    agent = AgentConfig(
        folder=folder,
        device_id=device_id,
        hardware=hardware,
        repository_url=f"{config.server_url}/repo",
        token_file=folder / "device.token",
        identity_dir=folder / "identity",
        image_root=folder / "image-root.json",
        director_root=folder / "director-root.json",
        ca_cert=folder / CA_CERT_FILE,
        tls_cert=folder / TLS_CERT_FILE,
        tls_key=folder / TLS_KEY_FILE,
        state_dir=folder / "state",
        mqtt_url=answer.get("mqtt_url"),
    )
    agent.save()
    return agent
