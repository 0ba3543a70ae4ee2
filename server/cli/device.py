"""``edgeota device``: enrol devices."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgeota.agent.config import AgentConfig
from edgeota.protocol.files import atomic_write, make_private_dir, write_private_file
from edgeota.protocol.identity import (
    CA_CERT_FILE,
    TLS_CERT_FILE,
    TLS_KEY_FILE,
    DeviceIdentity,
    validate_device_id,
)
from edgeota.protocol.keywrap import KemSuite
from edgeota.server.cli.common import (
    DEFAULT_HOME,
    HomeOption,
    JsonOption,
    emit_json,
    operator,
    parse_tags,
)
from edgeota.server.config import ConfigError

app = typer.Typer(help="Enrol devices.", no_args_is_help=True)


@app.command()
def enroll(
    device_id: Annotated[str, typer.Argument(help="Device id: 1-64 of a-z, 0-9, '-'.")],
    hardware: Annotated[str, typer.Option(help="Hardware id, e.g. rpi4; releases name the "
                                          "hardware they run on.")],
    out: Annotated[Path, typer.Option(help="Folder to write the agent's config and keys into "
                                      "(must not exist). Copy it to the device.")],
    tag: Annotated[list[str], typer.Option(help="KEY=VALUE tag for targeting (repeatable).")]
    = [],  # noqa: B006 - typer reads the default, never mutates it
    kem: Annotated[KemSuite, typer.Option(help="Key-wrap suite of the device key.")]
    = KemSuite.X25519,
    home: HomeOption = DEFAULT_HOME,
    as_json: JsonOption = False,
) -> None:
    """Create a device identity, register it with the server and write OUT/agent.toml.

    The private keys are generated here and written only into OUT (0600);
    the server receives the public keys, issues the broker certificate and a
    device API token, and opens the device's director repository. The trust
    roots written to OUT come from this home, not from the server.
    """
    validate_device_id(device_id)
    tags = parse_tags(tag)
    if out.exists():
        raise ConfigError(f"{out} already exists: enrolment writes a fresh folder")
    config, client = operator(home)
    if config.trusted_image_root is None or config.trusted_director_root is None:
        raise ConfigError("operator.toml lacks the trusted roots written by `edgeota init`")
    identity = DeviceIdentity.generate(device_id, kem)
    tls_key = ec.generate_private_key(ec.SECP256R1())
    tls_public = tls_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")
    with client:
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
    )
    path = agent.save()
    if as_json:
        emit_json({"device_id": device_id, "hardware": hardware, "tags": tags,
                   "agent_config": str(path)})
        return
    typer.echo(f"enrolled {device_id} ({hardware}); agent config: {path}")
