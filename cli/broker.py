"""``edgeota broker-config``: write a Mosquitto config, ACL and certificates for the fleet."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgeota.cli.common import DEFAULT_HOME, HomeOption, JsonOption, emit_json, split_list
from edgeota.server.broker_config import write_mosquitto_config

__all__ = ["broker_config"]

_DEFAULT_HOSTNAMES = ("localhost",)
_DEFAULT_IPS = ("127.0.0.1",)


def broker_config(
    out: Annotated[Path, typer.Option(
        "--out", help="Folder to write into (created 0700; it holds the broker's and the "
                      "server's private keys).")],
    home: HomeOption = DEFAULT_HOME,
    host: Annotated[str, typer.Option(
        help="Address the TLS listener binds (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Device listener port.")] = 8883,
    server_port: Annotated[int | None, typer.Option(
        min=1, max=65535,
        help="Server listener port (edgeota serve --broker; default PORT+1).")] = None,
    hostname: Annotated[list[str] | None, typer.Option(
        "--hostname",
        help="DNS name devices use to reach the broker; repeat or comma-separate. Goes into "
             "the broker certificate, which agents verify. Default: localhost.")] = None,
    ip: Annotated[list[str] | None, typer.Option(
        "--ip",
        help="IP address devices use to reach the broker; repeat or comma-separate. "
             "Default: 127.0.0.1.")] = None,
    user: Annotated[str | None, typer.Option(
        help="When Mosquitto is started as root it switches to this user (Mosquitto's "
             "default: mosquitto); that user must own OUT.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Write a production Mosquitto 2.x setup for this home's fleet into the folder OUT.

    \b
    OUT gets:
      mosquitto.conf   TLS listeners on HOST:PORT for devices (a fleet CA
                       certificate; its CN is the user name and the client id)
                       and HOST:SERVER_PORT for edgeota serve (services CA only)
      acl              the server identity (_edgeota-server) may use every
                       edgeota/v1/devices/# topic; device X may only publish on
                       devices/X/{fetch,status,telemetry,online} and only
                       receive devices/X/{notify,rx}
      ca.crt.pem       the fleet CA (the only CA the broker trusts)
      server.crt.pem   the broker's certificate (SANs: --hostname, --ip)
      server.key.pem
      bridge.crt.pem   the edgeota server's own client identity
      bridge.key.pem   (CN _edgeota-server) for connecting to this broker
      data/            Mosquitto persistence (retained status and presence)

    \b
    Run it in the foreground, as the user who owns OUT:
      mosquitto -c OUT/mosquitto.conf
    As a system service (Mosquitto started as root, switching to `mosquitto`):
      edgeota broker-config --out /etc/mosquitto/edgeota --user mosquitto \\
          --host 0.0.0.0 --hostname broker.example.net
      chown -R mosquitto: /etc/mosquitto/edgeota
      mosquitto -c /etc/mosquitto/edgeota/mosquitto.conf

    Devices get ca.crt.pem and their own certificate at enrolment
    (`edgeota device enroll`). Paths in mosquitto.conf are absolute: run this
    again after moving OUT. Each run issues a new broker certificate and a new
    server-identity certificate; earlier ones stay valid until they expire.
    """
    files = write_mosquitto_config(
        home,
        out,
        host=host,
        port=port,
        server_port=server_port,
        hostnames=split_list(hostname) if hostname else _DEFAULT_HOSTNAMES,
        ips=split_list(ip) if ip else _DEFAULT_IPS,
        run_as=user,
    )
    if as_json:
        emit_json({
            "folder": str(files.folder),
            "config": str(files.config),
            "acl": str(files.acl),
            "ca_cert": str(files.ca_cert),
            "server_cert": str(files.server_cert),
            "server_key": str(files.server_key),
            "bridge_cert": str(files.bridge_cert),
            "bridge_key": str(files.bridge_key),
            "listener": f"{files.host}:{files.port}",
            "server_listener": f"{files.host}:{files.server_port}",
            "serve_broker_url": files.server_url,
            "command": files.command(),
        })
        return
    typer.echo(f"wrote a Mosquitto setup for the fleet CA of {home} into {files.folder}")
    typer.echo(f"  listener:  {files.host}:{files.port} (TLS, client certificate required)")
    typer.echo(f"  server:    edgeota serve --broker {files.server_url} (services CA only)")
    typer.echo(f"  server identity for the broker: {files.bridge_cert} + {files.bridge_key}")
    typer.echo(f"  run it:    mosquitto -c {files.config}")
