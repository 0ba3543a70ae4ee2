"""``edgeota bundle``: look inside sealed bundles."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from edgeota.cli.progress import byte_progress
from edgeota.protocol.bundle import BundleSummary, inspect_bundle, open_bundle
from edgeota.protocol.errors import MalformedKeyError
from edgeota.protocol.files import read_private_file

app = typer.Typer(help="Inspect sealed model bundles.", no_args_is_help=True)

_MAX_KEY_FILE = 4096


def load_content_key(path: Path) -> bytes:
    """Read a content key file: 64 hex characters (one line) or 32 raw bytes, mode 0600."""
    raw = read_private_file(path, _MAX_KEY_FILE)
    if len(raw) == 32:
        return raw
    text = raw.strip()
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as e:
        raise MalformedKeyError(f"{path}: not a hex content key") from e
    if len(key) != 32:
        raise MalformedKeyError(f"{path}: content key must be 32 bytes, found {len(key)}")
    return key


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def _header_facts(path: Path, summary: BundleSummary) -> dict[str, Any]:
    return {
        "file": str(path),
        "format_version": summary.header.version,
        "suite": summary.header.suite.value,
        "chunk_size": summary.header.chunk_size,
        "chunks": summary.chunk_count,
        "sealed_size": summary.sealed_size,
        "plaintext_size": summary.plaintext_size,
        "sealed_sha256": _sha256_file(path),
    }


@app.command()
def inspect(
    file: Annotated[
        Path,
        typer.Argument(help="A sealed bundle (.eotb).", exists=True, dir_okay=False, readable=True),
    ],
    key: Annotated[
        Path | None,
        typer.Option(
            help="Content key file (64 hex characters, mode 0600). With it the whole bundle "
            "is decrypted and authenticated in a scratch folder and its manifest printed.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Print a bundle's header; with --key, authenticate the whole bundle and print its manifest.

    Without a key nothing is authenticated: the header is shown as found. With
    a key every chunk is checked, so a tampered, truncated or reordered bundle
    fails here exactly as it would on a device.
    """
    summary = inspect_bundle(file)
    facts = _header_facts(file, summary)
    manifest: dict[str, Any] | None = None
    if key is not None:
        content_key = load_content_key(key)
        with tempfile.TemporaryDirectory(prefix="edgeota-inspect-") as scratch:
            with byte_progress("verifying", summary.plaintext_size, enabled=not as_json) as advance:
                opened = open_bundle(file, content_key, Path(scratch) / "bundle", progress=advance)
            manifest = opened.manifest.to_dict()
            facts["plaintext_sha256"] = opened.plaintext_sha256
            facts["authenticated"] = True
    if as_json:
        typer.echo(json.dumps({"header": facts, "manifest": manifest}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"bundle {file.name}", show_header=False)
    for name, value in facts.items():
        table.add_row(name.replace("_", " "), str(value))
    console.print(table)
    if manifest is None:
        console.print("header only: pass --key to authenticate the bundle and read its manifest")
        return
    files = [manifest["model"], *manifest.get("external_data", [])]
    details = Table(title=f"manifest: {manifest['name']} {manifest['version']}", show_header=False)
    details.add_row("hardware", ", ".join(manifest["hardware"]))
    details.add_row("opset", str(manifest["opset"]))
    for spec in manifest["inputs"]:
        details.add_row("input", f"{spec['name']} {spec['datatype']} {spec['shape']}")
    for spec in manifest["outputs"]:
        details.add_row("output", f"{spec['name']} {spec['datatype']} {spec['shape']}")
    for item in files:
        details.add_row("file", f"{item['path']} ({item['size']} bytes, sha256 {item['sha256']})")
    vectors = manifest.get("validation")
    details.add_row(
        "validation vectors",
        "none"
        if vectors is None
        else f"{vectors['inputs'][0]['shape'][0]} rows, atol {vectors['atol']}, "
        f"rtol {vectors['rtol']}",
    )
    golden = manifest.get("golden")
    details.add_row(
        "golden set",
        "none"
        if golden is None
        else f"{len(golden['labels'])} rows, min accuracy {golden['min_accuracy']}",
    )
    if manifest.get("latency_budget_ms") is not None:
        details.add_row("latency budget", f"{manifest['latency_budget_ms']} ms")
    console.print(details)
