"""``edgeota demo``: the whole flow on this machine, on embedded defaults.

Today the demo covers what exists end to end: building manifests from the
sample models, sealing bundles with both ciphers, wrapping each release's
content key to devices with both KEM suites, and each device unwrapping,
authenticating, decrypting and unpacking its bundle, then measuring the
model's accuracy on the digits test split in onnxruntime. It also shows two
refusals a device must make. The TUF repositories, MQTT transport, hot swap
and staged rollouts join as they land (see the open issues).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from edgeota.protocol.bundle import BundleInfo, generate_content_key, open_bundle, seal_bundle
from edgeota.protocol.errors import BundleIntegrityError, KeyUnwrapError
from edgeota.protocol.identity import DeviceIdentity
from edgeota.protocol.keywrap import KemSuite, unwrap_content_key, wrap_content_key
from edgeota.protocol.stream import AeadSuite
from edgeota.server.cli.progress import byte_progress
from edgeota.server.manifest_builder import build_manifest

_HARDWARE = ("rpi4", "rpi5")


@dataclass(frozen=True)
class _Release:
    key: str
    version: str
    suite: AeadSuite
    info: BundleInfo
    content_key: bytes


def demo(
    workdir: Annotated[
        Path | None,
        typer.Option(help="Keep the demo's files here instead of a temporary folder."),
    ] = None,
) -> None:
    """Seal the sample models, deliver them to two simulated devices and measure what they serve."""
    from edgeota.samples import accuracy, load_catalog, load_test_split, sample_path

    console = Console()
    with tempfile.TemporaryDirectory(prefix="edgeota-demo-") as scratch:
        home = workdir or Path(scratch)
        home.mkdir(parents=True, exist_ok=True)
        console.rule("edgeota demo")
        console.print(f"working folder: {home}")
        catalog = load_catalog()

        console.print("\n[bold]1. Release managers seal two releases of the digits model[/]")
        releases: list[_Release] = []
        for key, suite in (
            ("digits_v1", AeadSuite.CHACHA20_POLY1305),
            ("digits_v2", AeadSuite.AES_256_GCM),
        ):
            sample = catalog[key]
            manifest = build_manifest(
                sample.path,
                name=sample.name,
                version=sample.version,
                hardware=_HARDWARE,
                vectors=sample.vectors_path,
                golden=sample_path("digits_golden.json"),
                min_accuracy=sample.recommended_min_accuracy,
            )
            content_key = generate_content_key()
            target = home / f"{sample.name}-{sample.version}.eotb"
            with byte_progress(f"sealing {target.name}", manifest.model.size) as advance:
                info = seal_bundle(
                    manifest,
                    {"model.onnx": sample.path},
                    target,
                    content_key,
                    suite=suite,
                    progress=advance,
                )
            console.print(
                f"  {target.name}: {info.sealed_size} bytes sealed with {suite.value}, "
                f"sha256 {info.sealed_sha256[:16]}..."
            )
            releases.append(_Release(key, sample.version, suite, info, content_key))

        console.print("\n[bold]2. Two devices are enrolled; each release key is wrapped to each[/]")
        devices = [
            DeviceIdentity.generate("demo-pi-classic", KemSuite.X25519),
            DeviceIdentity.generate("demo-pi-pq", KemSuite.MLKEM768_X25519),
        ]
        wrapped = {
            (device.device_id, release.key): wrap_content_key(
                release.content_key, device.public().kem_public_key, device.device_id
            )
            for device in devices
            for release in releases
        }
        for device in devices:
            console.print(f"  {device.device_id}: key wrap {device.kem_private_key.suite.value}")

        console.print("\n[bold]3. Each device opens each release and serves it[/]")
        x_test, y_test = load_test_split()
        table = Table(title="what each device serves")
        for column in (
            "device",
            "key wrap",
            "release",
            "cipher",
            "plaintext sha256",
            "accuracy (digits test split)",
        ):
            table.add_column(column)
        for device in devices:
            for release in releases:
                content_key = unwrap_content_key(
                    wrapped[(device.device_id, release.key)],
                    device.kem_private_key,
                    device.device_id,
                )
                folder = home / device.device_id / release.version
                opened = open_bundle(
                    release.info.path,
                    content_key,
                    folder,
                    expected_plaintext_sha256=release.info.plaintext_sha256,
                )
                score = accuracy(opened.model_path, x_test, y_test)
                table.add_row(
                    device.device_id,
                    device.kem_private_key.suite.value,
                    f"digits {release.version}",
                    release.suite.value,
                    opened.plaintext_sha256[:16] + "...",
                    f"{score:.4f}",
                )
        console.print(table)

        console.print("\n[bold]4. Two attacks, refused[/]")
        thief, victim = devices
        try:
            unwrap_content_key(
                wrapped[(victim.device_id, "digits_v2")], thief.kem_private_key, thief.device_id
            )
            console.print("  [red]BUG: a key wrapped for another device opened[/]")
            raise typer.Exit(1)
        except KeyUnwrapError as e:
            console.print(
                f"  key wrapped for {victim.device_id} used by {thief.device_id}: "
                f"[green]refused[/] ({type(e).__name__})"
            )
        tampered = home / "tampered.eotb"
        data = bytearray(releases[1].info.path.read_bytes())
        data[len(data) // 2] ^= 0x01
        tampered.write_bytes(bytes(data))
        try:
            open_bundle(tampered, releases[1].content_key, home / "tampered-out")
            console.print("  [red]BUG: a tampered bundle opened[/]")
            raise typer.Exit(1)
        except BundleIntegrityError as e:
            console.print(
                f"  one flipped bit in the bundle: [green]refused[/] ({type(e).__name__}: "
                f"{e}); nothing unpacked: {not (home / 'tampered-out').exists()}"
            )

        console.rule("done")
        console.print(
            "The demo sealed 2 releases, wrapped 4 content keys, opened 4 bundles and refused 2 "
            "attacks.\nComing next (open issues): TUF image and director repositories, the MQTT "
            "transport,\nthe device agent with hot swap and rollback, staged rollouts and the "
            "fleet simulator."
        )
