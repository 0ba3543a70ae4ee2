"""The tuf-conformance adapter over the device's repository client, against a real server.

``make conformance`` runs the whole tuf-conformance suite (113 tests) when a
checkout of it is at hand; this test keeps the adapter honest in every
``make test``: the three commands of its CLI protocol against the image
repository of a real ``edgeota`` server, the device's clock floor, and the
refusals (exit 1 with a reason on stderr).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from server_support import RunningServer

from edgeota.agent.clock import TimeFloor
from edgeota.agent.config import AgentConfig
from edgeota.agent.conformance import TIME_FLOOR_FILE, main


def test_init_refresh_download_and_the_clock_floor(
        server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = AgentConfig.load(server.enroll("pi-1") / "agent.toml")
    release = json.loads(server.publish("digits_v1", "1.0.0").out)
    target = release["target_path"]
    metadata = tmp_path / "metadata"
    url = f"{config.repository_url}/image/metadata"
    targets = ["--target-base-url", f"{config.repository_url}/image/targets",
               "--target-dir", str(tmp_path / "targets")]

    assert main(["--metadata-dir", str(metadata), "init", str(config.image_root)]) == 0
    assert sorted(p.name for p in metadata.iterdir()) == ["root.json"]  # no request yet
    assert main(["--metadata-dir", str(metadata), "--metadata-url", url, "refresh"]) == 0
    trusted = {p.name for p in metadata.glob("*.json")}
    assert {"root.json", "timestamp.json", "snapshot.json", "targets.json"} <= trusted
    floor = TimeFloor(metadata / TIME_FLOOR_FILE, clock=lambda: datetime.now(UTC))
    assert floor.floor > datetime.now(UTC) - timedelta(minutes=1)  # raised by the refresh

    assert main(["--metadata-dir", str(metadata), "--metadata-url", url,
                 "--target-name", target, *targets, "download"]) == 0
    (downloaded,) = [p for p in (tmp_path / "targets").rglob("*") if p.is_file()]
    assert downloaded.stat().st_size > 0
    stamp = downloaded.stat().st_mtime_ns
    assert main(["--metadata-dir", str(metadata), "--metadata-url", url,
                 "--target-name", target, *targets, "download"]) == 0
    assert downloaded.stat().st_mtime_ns == stamp  # cached: not fetched again

    capsys.readouterr()
    assert main(["--metadata-dir", str(metadata), "--metadata-url", url,
                 "--target-name", "no/such/target", *targets, "download"]) == 1
    assert "not a target" in capsys.readouterr().err

    # A clock set back below the floor: the refresh is refused, nothing trusted changes.
    before = {p.name: p.read_bytes() for p in metadata.glob("*.json")}
    floor.advance(datetime.now(UTC) + timedelta(days=30))
    assert main(["--metadata-dir", str(metadata), "--metadata-url", url, "refresh"]) == 1
    assert "Clock" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in metadata.glob("*.json")} == before


def test_a_refresh_without_a_trusted_root_fails(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--metadata-dir", str(tmp_path), "--metadata-url",
                 "http://127.0.0.1:9/metadata", "refresh"]) == 1
    assert "refresh" in capsys.readouterr().err
