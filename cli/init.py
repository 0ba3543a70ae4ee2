"""``edgeota init``: create a home."""

from __future__ import annotations

from typing import Annotated

import typer

from edgeota.cli.common import DEFAULT_HOME, HomeOption, JsonOption, emit_json
from edgeota.server.config import DEFAULT_HTTP
from edgeota.server.home import HomeOptions, init_home
from edgeota.server.keystore import KeyAlgorithm
from edgeota.server.repo.image import DEFAULT_BIN_BITS


def init(
    home: HomeOption = DEFAULT_HOME,
    db: Annotated[str | None, typer.Option(help="Database URL (default: SQLite in the home), "
                                           "e.g. postgresql://user@host/db.")] = None,
    http: Annotated[str, typer.Option(help="HOST:PORT the server will listen on.")] = DEFAULT_HTTP,
    mqtt: Annotated[str, typer.Option(help="HOST:PORT of the embedded MQTT broker (TLS); "
                                      "devices are told to connect there.")]
    = "127.0.0.1:8883",
    public_url: Annotated[str | None, typer.Option(
        help="URL devices and the CLI use to reach the server (default http://HOST:PORT).")] = None,
    root_keys: Annotated[int, typer.Option(min=1, max=16, help="Root keys per repository.")] = 1,
    root_threshold: Annotated[int, typer.Option(min=1, help="Root signatures required.")] = 1,
    release_keys: Annotated[int, typer.Option(min=1, max=16,
                                              help="Release-manager keys.")] = 1,
    release_threshold: Annotated[int, typer.Option(
        min=1, help="Release signatures required (k of --release-keys).")] = 1,
    online_algorithm: Annotated[KeyAlgorithm, typer.Option(
        help="Algorithm of the online keys (ecdsa-p256 fits a KMS/HSM).")] = KeyAlgorithm.ED25519,
    bin_bits: Annotated[int, typer.Option(
        min=1, max=14,
        help="Hash bins = 2**bits (succinct delegation), fixed for the repository's life. "
             "Every device verifies a snapshot listing every bin on each update and "
             "fetches one bin holding releases/bins targets: 6 (64 bins) suits up to a "
             "few thousand releases; add a bit per 4x more.")] = DEFAULT_BIN_BITS,
    as_json: JsonOption = False,
) -> None:
    """Create a home: keys, fleet CA, database, both TUF repositories and an admin token.

    Keys land in the production layout: keys/offline (root: move it to an
    offline machine), keys/release (release managers' keys), keys/online (the
    only keys `edgeota serve` reads). The admin API token is written to
    HOME/operator.token (0600).
    """
    server, operator = init_home(
        home,
        HomeOptions(
            database_url=db,
            http=http,
            mqtt=mqtt,
            public_url=public_url,
            root_keys=root_keys,
            root_threshold=root_threshold,
            release_keys=release_keys,
            release_threshold=release_threshold,
            online_algorithm=online_algorithm,
            bin_bits=bin_bits,
        ),
        progress=None if as_json else (lambda message: typer.echo(f"  {message}", err=True)),
    )
    if as_json:
        emit_json({"home": str(server.home), "server_url": operator.server_url,
                   "database": server.database_url})
        return
    typer.echo(f"created edgeota home {server.home}")
    typer.echo(f"  start the server:  edgeota serve --home {server.home}")
    typer.echo(f"  enrol a device:    edgeota device enroll pi-1 --hardware rpi4 "
               f"--home {server.home} --out ./pi-1")
