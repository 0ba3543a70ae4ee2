"""``edgeota fleet status``, ``audit verify`` and ``token create``."""

from __future__ import annotations

from typing import Annotated

import typer

from edgeota.cli.common import (
    DEFAULT_HOME,
    HomeOption,
    JsonOption,
    emit_json,
    operator,
    table,
)
from edgeota.protocol.errors import EdgeotaError

fleet_app = typer.Typer(help="Look at the fleet.", no_args_is_help=True)
audit_app = typer.Typer(help="Check the audit log.", no_args_is_help=True)
token_app = typer.Typer(help="Manage API tokens (admin).", no_args_is_help=True)


class AuditBrokenError(EdgeotaError):
    """``audit verify`` found an edited, deleted or reordered entry."""


@fleet_app.command()
def status(home: HomeOption = DEFAULT_HOME, as_json: JsonOption = False) -> None:
    """Every device with its hardware, assigned models, last report and when it was last seen."""
    _, client = operator(home)
    with client:
        devices = client.get("/api/v1/devices")
    if as_json:
        emit_json(devices)
        return
    table(f"fleet ({len(devices)} devices)",
          ["device", "hardware", "tags", "assigned", "reported", "last seen"],
          [[d["id"], d["hardware"], ",".join(f"{k}={v}" for k, v in d["tags"].items()),
            ", ".join(f"{m}@{v}" for m, v in d["assigned"].items()) or "-",
            (d["reported_state"] or {}).get("state", "-"), d["last_seen"] or "never"]
           for d in devices])


@audit_app.command()
def verify(home: HomeOption = DEFAULT_HOME, as_json: JsonOption = False) -> None:
    """Walk the hash chain of the audit log; exit 1 if any entry was edited, deleted or moved."""
    _, client = operator(home)
    with client:
        result = client.get("/api/v1/audit/verify")
    if as_json:
        emit_json(result)
    else:
        typer.echo(f"audit log: {result['entries']} entries, head {result['head_hash']}")
    if not result["ok"]:
        raise AuditBrokenError(f"audit log broken at entry {result['first_bad_id']}: "
                               f"{result['reason']}")
    if not as_json:
        typer.echo("chain intact")


@token_app.command()
def create(
    name: Annotated[str, typer.Argument(help="Who the token is for.")],
    role: Annotated[str, typer.Option(help="viewer, operator, release-manager or admin.")],
    home: HomeOption = DEFAULT_HOME,
    as_json: JsonOption = False,
) -> None:
    """Issue an API token; it is printed once and cannot be shown again."""
    _, client = operator(home)
    with client:
        answer = client.post("/api/v1/tokens", {"name": name, "role": role})
    if as_json:
        emit_json(answer)
    else:
        typer.echo(answer["token"])
