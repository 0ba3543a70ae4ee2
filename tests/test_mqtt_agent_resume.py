"""SIGKILL the agent in the middle of a bundle downloaded over MQTT; the restart resumes it.

A real agent runs in its own process (``tests/mqtt_resume_agent.py``) against a
real server with its MQTT side (embedded TLS broker, device ACL, fetch
bridge). The bridge serves small chunks so the bundle spans several windows.
The agent kills itself with SIGKILL once half the bundle has arrived: no
cancel, no clean disconnect. The restarted agent resumes from the durable
progress record (rewritten after every chunk; SIGKILL keeps the page cache):
it had lost nothing it had received, the server sends again only what it had
not delivered (its own byte counters say so): at most one window, the chunks
that were in flight. The update completes. Waits are on conditions with timeouts.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from server_support import RunningServer, running_mqtt_server, wait_for

from edgeota.agent.mqtt_fetcher import DEFAULT_WINDOW
from edgeota.agent.resumable import saved_offset
from edgeota.server import transport as server_transport
from edgeota.server.mqtt_bridge import FetchBridge
from edgeota.server.transport import MqttTransport

AGENT_SCRIPT = Path(__file__).with_name("mqtt_resume_agent.py")
CHILD_TIMEOUT = 90.0  # seconds per agent process
SIGKILLED = -9
CHUNK = 32  # bytes per frame: the digits bundle spans many windows
WINDOW_BYTES = DEFAULT_WINDOW * CHUNK  # chunks in flight: ResumableDownload's default


@pytest.fixture
def mqtt_server_small_chunks(tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[RunningServer,
                                                                                MqttTransport]]:
    monkeypatch.setattr(server_transport, "FetchBridge",
                        functools.partial(FetchBridge, chunk_size=CHUNK))
    with running_mqtt_server(tmp_path, f"sqlite:///{tmp_path / 'edgeota.db'}") as pair:
        yield pair


def run_agent(config: Path, *args: str) -> tuple[int, dict[str, Any] | None, str]:
    process = subprocess.run(
        [sys.executable, str(AGENT_SCRIPT), "--config", str(config), *args],
        capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False)
    lines = process.stdout.strip().splitlines()
    return process.returncode, (json.loads(lines[-1]) if lines else None), process.stderr


def test_agent_killed_mid_bundle_resumes_over_mqtt(
        mqtt_server_small_chunks: tuple[RunningServer, MqttTransport], tmp_path: Path) -> None:
    server, transport = mqtt_server_small_chunks
    bridge = transport.bridge
    assert bridge is not None
    device = server.enroll("pi-1")
    assert server.publish("digits_v1", "1.0.0").code == 0
    assert server.cli("deploy", "digits@1.0.0", "--devices", "pi-1").code == 0
    stored = next((server.ctx.store.root / "image" / "targets").rglob("*.eotb"))
    length = stored.stat().st_size
    assert length > 4 * WINDOW_BYTES, "the bundle must span several windows"
    target = f"image/targets/{stored.relative_to(server.ctx.store.root / 'image' / 'targets')}"
    killed_file = tmp_path / "killed.json"

    code, result, stderr = run_agent(device / "agent.toml", "--kill-at-bytes", str(length // 2),
                                     "--killed-file", str(killed_file))
    assert code == SIGKILLED, f"rc {code}, {result}, {stderr[-2000:]}"
    killed_at = json.loads(killed_file.read_text())["offset"]
    assert length // 2 <= killed_at < length
    # The bridge finishes the windows that were in flight (nobody cancelled them).
    wait_for(lambda: bridge.active_windows() == 0, 20, "the bridge to finish the in-flight windows")
    served_before = bridge.counters().served_bytes("pi-1", target)
    assert killed_at <= served_before <= killed_at + WINDOW_BYTES
    (partial,) = device.rglob("*.partial")
    # The latest progress record names the last chunk written before the kill.
    assert saved_offset(partial, length) == killed_at
    saved = killed_at

    code, result, stderr = run_agent(device / "agent.toml")
    assert code == 0, f"rc {code}, {result}, {stderr[-2000:]}"
    assert result is not None
    assert result["serving"] == "1.0.0", result
    assert result["completed"] == 1 and result["resumes"] >= 1, result
    # Only what had not been written was fetched again: the bytes past the kill.
    assert result["bytes_fetched"] == length - saved, result
    served = bridge.counters().served_bytes("pi-1", target)
    # At least that much was served since; more only for requests the killed agent had
    # sent that reached the bridge late, which are part of the window in flight.
    assert served - served_before >= length - saved
    # In all, the kill cost at most one window: the chunks that were in flight.
    assert length <= served <= length + WINDOW_BYTES
    assert not list(device.rglob("*.progress")) and not list(device.rglob("*.partial"))
