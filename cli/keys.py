"""``edgeota keys``: key ceremonies."""

from __future__ import annotations

from typing import Annotated

import typer

from edgeota.cli.common import DEFAULT_HOME, HomeOption, JsonOption, emit_json
from edgeota.server.keystore import KeyAlgorithm
from edgeota.server.rotation import RotatableRole, rotate_key

app = typer.Typer(help="Rotate repository keys.", no_args_is_help=True)


@app.command()
def rotate(
    role: Annotated[RotatableRole, typer.Argument(help="Which key to replace.")],
    algorithm: Annotated[KeyAlgorithm, typer.Option(
        help="Algorithm of a new online key (ecdsa-p256 fits a KMS/HSM).")]
    = KeyAlgorithm.ED25519,
    home: HomeOption = DEFAULT_HOME,
    as_json: JsonOption = False,
) -> None:
    """Replace ROLE's key through a new root version that devices follow.

    Needs the offline root keys named in operator.toml (they sign the new
    root). Online roles (image-snapshot, image-timestamp, director) get a new
    key in the server's keystore; restart `edgeota serve` afterwards so it
    signs with it. Root roles get fresh root keys (same count and threshold);
    the home's trusted root is updated for new enrolments.
    """
    result = rotate_key(home, role, algorithm=algorithm)
    if as_json:
        emit_json({"role": str(result.role), "root_version": result.root_version,
                   "new_key": result.new_key_uri, "restart_server": result.restart_server})
        return
    typer.echo(f"rotated {result.role}: root is now version {result.root_version}; "
               f"new key {result.new_key_uri}")
    if result.restart_server:
        typer.echo("restart `edgeota serve` so the server signs with the new key")
