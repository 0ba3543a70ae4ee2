"""The ``edgeota-agent`` command run on each device."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import click
import typer

from edgeota.protocol.errors import EdgeotaError

__all__ = ["app", "main"]

app = typer.Typer(
    name="edgeota-agent",
    help=(
        "The edgeota device agent: verifies, decrypts, validates and hot-swaps ONNX models "
        "delivered by an edgeota server, and serves them to local applications."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.command()
def run(
    config: Annotated[
        Path,
        typer.Option(help="The agent.toml written by `edgeota device enroll --out DIR`."),
    ],
    poll: Annotated[float, typer.Option(min=1, help="Seconds between update checks "
                                        "(jittered by 20%).")] = 60.0,
    probation: Annotated[float, typer.Option(min=0, help="Seconds a new model is watched "
                                             "before it is committed.")] = 30.0,
    http_port: Annotated[int, typer.Option(min=0, max=65535, help="Port of the local "
                                           "inference endpoint on 127.0.0.1.")] = 8000,
    transport: Annotated[str, typer.Option(help="How to reach the server: mqtt (the broker "
                                           "in agent.toml, TLS with the device certificate) "
                                           "or http.")] = "mqtt",
) -> None:
    """Run the update cycle and serve models on 127.0.0.1 (Open Inference Protocol v2).

    Checks the server every --poll seconds: verifies both TUF repositories,
    installs what the director assigns (verified, decrypted, validated),
    hot-swaps it, watches it through probation and commits or rolls back.
    Stops cleanly on SIGINT/SIGTERM.
    """
    import signal
    import threading

    from edgeota.agent.config import AgentConfig
    from edgeota.agent.inference_server import InferenceServer
    from edgeota.agent.runner import Agent, AgentSettings, run_forever

    if transport not in ("mqtt", "http"):
        raise typer.BadParameter("transport is mqtt or http", param_hint="--transport")
    agent = Agent(AgentConfig.load(config), AgentSettings(probation_seconds=probation),
                  transport=transport)
    try:
        agent.start()
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        with InferenceServer(agent.host, port=http_port) as endpoint:
            typer.echo(f"edgeota-agent {agent.config.device_id}: serving on {endpoint.url}",
                       err=True)
            run_forever(agent, stop, poll_seconds=poll)
    finally:
        agent.close()


@app.command()
def version() -> None:
    """Print the installed edgeota version."""
    from importlib.metadata import version as dist_version

    typer.echo(dist_version("edgeota"))


def main(argv: list[str] | None = None) -> int:
    try:
        app(args=argv, standalone_mode=False)
    except EdgeotaError as e:
        typer.echo(f"edgeota-agent: error: {e}", err=True)
        return 1
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
