"""Options and helpers shared by the operator commands."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from edgeota.server.client import OperatorClient
from edgeota.server.config import OperatorConfig, load_operator_config

HomeOption = Annotated[
    Path,
    typer.Option(
        "--home",
        envvar="EDGEOTA_HOME",
        help="The edgeota home folder (created by `edgeota init`). Env: EDGEOTA_HOME.",
        show_default=True,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
DEFAULT_HOME = Path("edgeota-home")


def operator(home: Path) -> tuple[OperatorConfig, OperatorClient]:
    """The operator config and an API client logged in with its token."""
    config = load_operator_config(home)
    return config, OperatorClient(config.server_url, config.token())


def emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    view = Table(title=title)
    for column in columns:
        view.add_column(column)
    for row in rows:
        view.add_row(*("" if cell is None else str(cell) for cell in row))
    Console().print(view)


def parse_tags(tags: Sequence[str]) -> dict[str, str]:
    """``["site=lab", "ring=canary"]`` -> dict, with a usage error for anything else."""
    parsed: dict[str, str] = {}
    for item in tags:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise typer.BadParameter(f"tag {item!r} is not KEY=VALUE", param_hint="--tag")
        parsed[key] = value
    return parsed


def split_list(values: Sequence[str]) -> list[str]:
    """Accept both ``--x a --x b`` and ``--x a,b``."""
    return [part for value in values for part in value.split(",") if part]
