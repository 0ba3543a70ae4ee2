"""``edgeota serve``: run the update server."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer

from edgeota.server.cli.common import DEFAULT_HOME, HomeOption
from edgeota.server.config import ConfigError, load_server_config, parse_http


def serve(
    home: HomeOption = DEFAULT_HOME,
    http: Annotated[str | None, typer.Option(help="HOST:PORT to listen on (default: from "
                                             "server.toml).")] = None,
    db: Annotated[str | None, typer.Option(help="Database URL (default: from server.toml).")]
    = None,
    broker: Annotated[str | None, typer.Option(
        help="External MQTT broker URL (the MQTT bridge is not available in this build).")]
    = None,
) -> None:
    """Serve the repositories under /repo and the operator API under /api/v1 over HTTP.

    Reads HOME/server.toml, which names only online keys: this process cannot
    sign a release. Runs database migrations first. OpenAPI at /docs.
    """
    import uvicorn

    from edgeota.server.api.app import create_app
    from edgeota.server.context import ServerContext
    from edgeota.server.db.migrate import upgrade

    if broker is not None:
        raise ConfigError("--broker: the MQTT transport is not available in this build yet")
    config = load_server_config(home)
    if db is not None:
        config = dataclasses.replace(config, database_url=db)
    if http is not None:
        host, port = parse_http(http, "--http")
        config = dataclasses.replace(config, http_host=host, http_port=port)
    upgrade(config.database_url)
    ctx = ServerContext.open(config)
    typer.echo(f"edgeota server on http://{config.http_host}:{config.http_port} "
               f"(home {config.home})", err=True)
    try:
        uvicorn.run(create_app(ctx), host=config.http_host, port=config.http_port,
                    log_level="warning")
    finally:
        ctx.close()
