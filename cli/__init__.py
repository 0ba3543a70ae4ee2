"""The ``edgeota`` command line: one typer app, one module per command group.

Every command fails the same way: an ``EdgeotaError`` (or an ``OSError`` on a
path the user named) becomes one line on stderr and exit status 1, never a
traceback, so scripts can rely on the exit code and people on the message.
"""

from __future__ import annotations

import logging
import sys

import click
import typer

from edgeota.cli import broker as broker_cli
from edgeota.cli import bundle as bundle_cli
from edgeota.cli import demo as demo_cli
from edgeota.cli import device as device_cli
from edgeota.cli import init as init_cli
from edgeota.cli import keys as keys_cli
from edgeota.cli import operate as operate_cli
from edgeota.cli import release as release_cli
from edgeota.cli import rollout as rollout_cli
from edgeota.cli import serve as serve_cli
from edgeota.cli import sim as sim_cli
from edgeota.protocol.errors import EdgeotaError

__all__ = ["app", "main"]

app = typer.Typer(
    name="edgeota",
    help=(
        "Signed, encrypted over-the-air updates of ONNX models for edge fleets.\n\n"
        "Operators publish releases and roll them out; devices verify, decrypt and "
        "hot-swap them. Run `edgeota demo` to see the whole flow on this machine."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command(name="init")(init_cli.init)
app.command(name="serve")(serve_cli.serve)
app.command(name="broker-config")(broker_cli.broker_config)
app.add_typer(device_cli.app, name="device")
app.add_typer(release_cli.app, name="release")
app.command(name="deploy")(rollout_cli.deploy)
app.add_typer(rollout_cli.app, name="rollout")
app.add_typer(operate_cli.fleet_app, name="fleet")
app.add_typer(operate_cli.audit_app, name="audit")
app.add_typer(operate_cli.token_app, name="token")
app.add_typer(keys_cli.app, name="keys")
app.add_typer(bundle_cli.app, name="bundle")
app.add_typer(sim_cli.app, name="sim")
app.command(name="demo")(demo_cli.demo)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: run the app and turn known failures into one line."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app(args=argv, standalone_mode=False)
    except EdgeotaError as e:
        typer.echo(f"edgeota: error: {e}", err=True)
        return 1
    except OSError as e:
        typer.echo(f"edgeota: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), err=True)
        return 1
    except (click.exceptions.Exit, typer.Exit) as e:
        return e.exit_code
    except (click.Abort, typer.Abort):
        typer.echo("edgeota: aborted", err=True)
        return 1
    except (click.ClickException, typer.TyperException) as e:
        # Usage errors (typer vendors its own click): printed with a hint, exit 2.
        show = getattr(e, "show", None)
        if show is None:
            typer.echo(f"edgeota: error: {e}", err=True)
            return 2
        show()
        return int(getattr(e, "exit_code", 2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
