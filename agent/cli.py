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


class NotYetAvailableError(EdgeotaError):
    """A command whose implementation has not landed yet."""


@app.command()
def run(
    config: Annotated[
        Path,
        typer.Option(help="The agent.toml written by `edgeota device enroll --out DIR`."),
    ],
) -> None:
    """Run the update cycle and the local inference endpoint (not available yet)."""
    raise NotYetAvailableError(
        f"the update cycle is not implemented in this build; {config} was not read "
        "(see the device agent issue)"
    )


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
