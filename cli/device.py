"""``edgeota device``: enrol devices."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgeota.cli.common import (
    DEFAULT_HOME,
    HomeOption,
    JsonOption,
    emit_json,
    operator,
    parse_tags,
)
from edgeota.protocol.keywrap import KemSuite
from edgeota.server.enrollment import enroll_device

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
    tags = parse_tags(tag)
    config, client = operator(home)
    with client:
        agent = enroll_device(config, client, device_id, hardware=hardware, tags=tags,
                              out=out, kem=kem)
    path = agent.folder / "agent.toml"
    if as_json:
        emit_json({"device_id": device_id, "hardware": hardware, "tags": tags,
                   "agent_config": str(path)})
        return
    typer.echo(f"enrolled {device_id} ({hardware}); agent config: {path}")
