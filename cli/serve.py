"""``edgeota serve``: run the update server."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer

from edgeota.cli.common import DEFAULT_HOME, HomeOption
from edgeota.server.config import load_server_config, parse_http
from edgeota.server.transport import MqttTransport


def serve(
    home: HomeOption = DEFAULT_HOME,
    http: Annotated[str | None, typer.Option(help="HOST:PORT to listen on (default: from "
                                             "server.toml).")] = None,
    db: Annotated[str | None, typer.Option(help="Database URL (default: from server.toml).")]
    = None,
    broker: Annotated[str | None, typer.Option(
        help="External broker, mqtts://HOST:PORT (set up with `edgeota broker-config`). "
        "Default: server.toml's [mqtt] broker, normally the embedded broker.")] = None,
    mqtt: Annotated[bool, typer.Option(help="Serve devices over MQTT too (--no-mqtt: HTTP "
                                       "only).")] = True,
) -> None:
    """Serve the repositories (HTTP /repo and MQTT) and the operator API under /api/v1.

    Reads HOME/server.toml, which names only online keys: this process cannot
    sign a release. Runs database migrations first. Without --broker the
    embedded MQTT broker listens (TLS, device certificates, per-device ACL) on
    server.toml's [mqtt] bind address. OpenAPI at /docs, metrics at /metrics.
    """
    import uvicorn

    from edgeota.server.api.app import create_app
    from edgeota.server.api.serving import uvicorn_config
    from edgeota.server.context import ServerContext
    from edgeota.server.db.migrate import upgrade

    config = load_server_config(home)
    if db is not None:
        config = dataclasses.replace(config, database_url=db)
    if http is not None:
        host, port = parse_http(http, "--http")
        config = dataclasses.replace(config, http_host=host, http_port=port)
    upgrade(config.database_url)
    ctx = ServerContext.open(config)
    transport = None
    if mqtt:
        external = broker or (None if config.mqtt_broker == "embedded" else config.mqtt_broker)
        bind_host, bind_port = parse_http(config.mqtt_bind, "server.toml mqtt.bind")
        transport = MqttTransport(config.ca_dir, ctx.store, broker_url=external,
                                  embedded_host=bind_host, embedded_port=bind_port,
                                  sessions=ctx.sessions, clock=ctx.clock)
        transport.start()
        ctx.notify = transport.notify
    typer.echo(f"edgeota server on http://{config.http_host}:{config.http_port}"
               + (f" and {transport.address.url}" if transport else "")
               + f" (home {config.home})", err=True)
    typer.echo(f"dashboard: http://{config.http_host}:{config.http_port}/ (sign in with a "
               "viewer token: edgeota token create NAME --role viewer)", err=True)
    # The connection limits of server.toml's [http] (slowloris, header size, connections).
    server = uvicorn.Server(uvicorn_config(create_app(ctx), config.http_limits,
                                           host=config.http_host, port=config.http_port,
                                           log_level="warning"))
    try:
        server.run()
    finally:
        if transport is not None:
            transport.stop()
        ctx.close()
