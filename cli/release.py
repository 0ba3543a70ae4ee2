"""``edgeota release``: publish and co-sign model releases."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from edgeota.cli.common import (
    DEFAULT_HOME,
    HomeOption,
    JsonOption,
    emit_json,
    operator,
    split_list,
    table,
)
from edgeota.cli.progress import byte_progress
from edgeota.protocol.stream import AeadSuite
from edgeota.server.publisher import PublishRequest, publish_release, sign_release

app = typer.Typer(help="Publish, co-sign and list model releases.", no_args_is_help=True)


def _print_release(release: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit_json(release)
        return
    state = release["status"]
    signatures = (f" ({release['signatures']} of {release['threshold']} signatures)"
                  if release.get("threshold") else "")
    typer.echo(f"release {release['id']}: {release['name']} {release['version']} is {state}"
               f"{signatures}; target {release['target_path']}")
    if state == "pending":
        typer.echo(f"  more release managers must run: edgeota release sign {release['id']}")


@app.command()
def publish(
    model: Annotated[Path, typer.Argument(help="The ONNX model file.", exists=True,
                                          dir_okay=False, readable=True)],
    name: Annotated[str, typer.Option(help="Model name, e.g. digits.")],
    version: Annotated[str, typer.Option(help="Semantic version, new for this name.")],
    hardware: Annotated[list[str], typer.Option(help="Hardware ids the release runs on "
                                                "(repeatable or comma-separated).")],
    vectors: Annotated[Path | None, typer.Option(help="Validation vectors (edgeota.vectors/1 "
                                                 "JSON) devices must reproduce.")] = None,
    golden: Annotated[Path | None, typer.Option(help="Golden set (edgeota.golden/1 JSON) for "
                                                "the accuracy floor.")] = None,
    min_accuracy: Annotated[float | None, typer.Option(help="Accuracy floor on the golden "
                                                       "set.")] = None,
    latency_budget_ms: Annotated[float | None, typer.Option(
        help="p95 latency budget devices enforce before going live.")] = None,
    release_counter: Annotated[int | None, typer.Option(
        help="Security floor: devices never go below it. Default: the previous release's.")]
    = None,
    bump_counter: Annotated[bool, typer.Option(
        help="Raise the counter above the previous release's, blocking all older ones.")] = False,
    allow_breaking: Annotated[bool, typer.Option(
        help="Allow an I/O signature incompatible with the previous release.")] = False,
    suite: Annotated[AeadSuite, typer.Option(help="Bundle cipher.")]
    = AeadSuite.CHACHA20_POLY1305,
    key: Annotated[int, typer.Option(help="Which release key of operator.toml signs.")] = 1,
    home: HomeOption = DEFAULT_HOME,
    as_json: JsonOption = False,
) -> None:
    """Validate, seal, sign and upload a model release.

    Runs on the release manager's machine with their release key. The server
    verifies the signature, re-validates the model and publishes it, or holds
    it as pending until enough release managers have signed (`release sign`).
    """
    config, client = operator(home)
    request = PublishRequest(
        model=model, name=name, version=version, hardware=tuple(split_list(hardware)),
        vectors=vectors, golden=golden, min_accuracy=min_accuracy,
        latency_budget_ms=latency_budget_ms, release_counter=release_counter,
        bump_counter=bump_counter, allow_breaking=allow_breaking, suite=suite, key_index=key,
    )
    say = None if as_json else (lambda message: typer.echo(f"  {message}", err=True))
    with client, byte_progress("sealing", model.stat().st_size, enabled=not as_json) as advance:
        release = publish_release(config, client, request, progress=say, byte_progress=advance)
    _print_release(release, as_json)


@app.command(name="sign")
def sign_command(
    release_id: Annotated[int, typer.Argument(help="Id of a pending release.")],
    key: Annotated[int, typer.Option(help="Which release key of operator.toml signs.")] = 1,
    home: HomeOption = DEFAULT_HOME,
    as_json: JsonOption = False,
) -> None:
    """Check a pending release against the verified repository and add a signature (k-of-n)."""
    config, client = operator(home)
    with client:
        release = sign_release(config, client, release_id, key_index=key,
                               progress=None if as_json else
                               (lambda message: typer.echo(f"  {message}", err=True)))
    _print_release(release, as_json)


@app.command(name="list")
def list_command(
    name: Annotated[str | None, typer.Option(help="Only this model.")] = None,
    home: HomeOption = DEFAULT_HOME,
    as_json: JsonOption = False,
) -> None:
    """List releases."""
    _, client = operator(home)
    with client:
        releases = client.get("/api/v1/releases", name=name)
    if as_json:
        emit_json(releases)
        return
    table("releases", ["id", "name", "version", "status", "counter", "size", "by"],
          [[r["id"], r["name"], r["version"], r["status"], r["release_counter"], r["length"],
            r["created_by"]] for r in releases])
