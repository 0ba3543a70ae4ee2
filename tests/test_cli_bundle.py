"""``edgeota bundle inspect`` and ``edgeota demo`` through the real console scripts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import SealedFixture

from edgeota.cli import main

EDGEOTA = shutil.which("edgeota", path=str(Path(sys.executable).parent))


def write_key(folder: Path, key: bytes, mode: int = 0o600) -> Path:
    path = folder / "content.key"
    path.write_text(key.hex() + "\n")
    path.chmod(mode)
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    assert EDGEOTA, "the edgeota console script is not installed in this environment"
    env = {**os.environ, "COLUMNS": "200"}  # rich wraps at 80 columns without a terminal
    return subprocess.run([EDGEOTA, *args], capture_output=True, text=True, timeout=300,
                          check=False, env=env)


def test_inspect_header_without_a_key(seal_random: Callable[..., SealedFixture]) -> None:
    sealed = seal_random(200_000)
    result = run("bundle", "inspect", str(sealed.info.path), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    header = report["header"]
    assert header["suite"] == "chacha20-poly1305"
    assert header["chunk_size"] == 65536
    assert header["sealed_size"] == sealed.info.sealed_size
    assert header["plaintext_size"] == sealed.info.plaintext_size
    assert header["sealed_sha256"] == sealed.info.sealed_sha256
    assert report["manifest"] is None


def test_inspect_with_key_prints_the_manifest(
    seal_random: Callable[..., SealedFixture], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sealed = seal_random(5000)
    key_file = write_key(tmp_path, sealed.content_key)
    assert main(["bundle", "inspect", str(sealed.info.path), "--key", str(key_file), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["manifest"]["name"] == "digits"
    assert report["manifest"]["model"]["sha256"] == sealed.manifest.model.sha256
    assert report["header"]["authenticated"] is True
    assert report["header"]["plaintext_sha256"] == sealed.info.plaintext_sha256


def test_inspect_table_output(seal_random: Callable[..., SealedFixture], tmp_path: Path) -> None:
    sealed = seal_random(5000)
    key_file = write_key(tmp_path, sealed.content_key)
    result = run("bundle", "inspect", str(sealed.info.path), "--key", str(key_file))
    assert result.returncode == 0, result.stderr
    assert "chacha20-poly1305" in result.stdout
    assert "manifest: digits 1.0.0" in result.stdout


def test_tampered_bundle_fails_with_one_line(
    seal_random: Callable[..., SealedFixture], tmp_path: Path
) -> None:
    sealed = seal_random(5000)
    data = bytearray(sealed.info.path.read_bytes())
    data[-3] ^= 0x10
    sealed.info.path.write_bytes(bytes(data))
    key_file = write_key(tmp_path, sealed.content_key)
    result = run("bundle", "inspect", str(sealed.info.path), "--key", str(key_file))
    assert result.returncode == 1
    assert result.stderr.startswith("edgeota: error: chunk 0")
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_world_readable_key_file_is_refused(
    seal_random: Callable[..., SealedFixture], tmp_path: Path
) -> None:
    sealed = seal_random(10)
    key_file = write_key(tmp_path, sealed.content_key, mode=0o644)
    result = run("bundle", "inspect", str(sealed.info.path), "--key", str(key_file))
    assert result.returncode == 1
    assert "edgeota: error:" in result.stderr and "Traceback" not in result.stderr


def test_not_a_bundle(tmp_path: Path) -> None:
    junk = tmp_path / "junk.eotb"
    junk.write_bytes(os.urandom(100))
    result = run("bundle", "inspect", str(junk))
    assert result.returncode == 1
    assert "not a sealed edgeota bundle" in result.stderr


def test_help_teaches(tmp_path: Path) -> None:
    result = run("bundle", "inspect", "--help")
    assert result.returncode == 0
    assert "--key" in result.stdout and "authenticate" in result.stdout
    assert run("--help").returncode == 0


def test_demo_runs_and_reports_real_accuracies(tmp_path: Path) -> None:
    """What `make demo` runs: 20 devices, two hardware classes, a staged rollout to 2.0.0."""
    from edgeota.samples import load_catalog

    catalog = load_catalog()
    report = tmp_path / "report"
    result = run("demo", "--workdir", str(tmp_path / "demo"), "--report", str(report))
    assert result.returncode == 0, result.stderr + result.stdout
    out = result.stdout
    v2 = f"{catalog['digits_v2'].test_accuracy:.4f}"
    assert "dashboard: http://127.0.0.1:" in out and "viewer token eot_" in out
    assert "deployment 2: digits@2.0.0 to 20 devices in phases 10, 50, 100 %" in out
    assert out.count(f"digits 2.0.0 │ {v2}") == 20  # the final table: every device, v2's accuracy
    assert out.count("│ rpi4     │ digits 2.0.0") == 10
    assert out.count("│ rpi5     │ digits 2.0.0") == 10
    assert "problem" not in out
    summary = json.loads((report / "summary.json").read_text())
    staged = summary["waves"][-1]
    assert staged["devices_updated"] == 20 and staged["time_to_100"] is not None
    assert (report / "states.png").stat().st_size > 10_000
    assert len(list((report / "timeline").glob("*.csv"))) == 20
    devices = tmp_path / "demo" / "devices"
    serving = {p.relative_to(devices).parts[0]
               for p in devices.glob("*/state/models/digits/2.0.0-*/model.onnx")}
    assert len(serving) == 20
