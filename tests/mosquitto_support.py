"""pytest plugin: a private Mosquitto broker per test, never the system one on 1883.

The fixture ``mosquitto`` writes a minimal config (loopback listener on a free
port, anonymous, no persistence, packets big enough for a 64 KiB chunk frame)
into the test's ``tmp_path``, starts ``/usr/sbin/mosquitto -c CONF``, waits
(bounded) until the port accepts connections and yields a
:class:`MosquittoBroker`, which unpacks as ``(host, port, process)``.

``MosquittoBroker.restart()`` kills the broker and starts it again on the same
port: every client connection drops at once, mid-transfer, exactly as when a
real broker crashes, and clients must reconnect by themselves.

Without the binary the tests are skipped with the reason -- except in CI
(``CI=true``), where they fail: CI must exercise the real broker.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgeota.protocol.fetch import MAX_FRAME_SIZE

__all__ = ["MOSQUITTO", "MosquittoBroker", "mosquitto"]

MOSQUITTO = os.environ.get("EDGEOTA_TEST_MOSQUITTO", "/usr/sbin/mosquitto")
START_TIMEOUT = 10.0  # seconds
STOP_TIMEOUT = 5.0  # seconds
# A chunk frame plus the topic name and MQTT's own headers.
MAX_PACKET_SIZE = MAX_FRAME_SIZE + 1024


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class MosquittoBroker:
    """A running private broker; ``host, port, process = broker`` works too."""

    host: str
    port: int
    process: subprocess.Popen[bytes]
    folder: Path

    def __iter__(self) -> Iterator[object]:
        return iter((self.host, self.port, self.process))

    @property
    def config_file(self) -> Path:
        return self.folder / "mosquitto.conf"

    @property
    def log_file(self) -> Path:
        return self.folder / "mosquitto.log"

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """Kill the broker at once (SIGKILL): every connection drops without a goodbye."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(STOP_TIMEOUT)

    def start(self) -> None:
        """Start the broker on this port and wait until it accepts connections."""
        self.process = _spawn(self.config_file, self.log_file)
        deadline = time.monotonic() + START_TIMEOUT
        while not _accepts(self.host, self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.process.returncode}:\n"
                                   f"{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"mosquitto not listening after {START_TIMEOUT}s:\n"
                                   f"{self.log()}")
            time.sleep(0.01)

    def restart(self) -> None:
        """Drop every client connection: kill the broker, start it again on the same port."""
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)


def _spawn(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([MOSQUITTO, "-c", str(config)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def write_config(folder: Path, host: str, port: int) -> Path:
    config = folder / "mosquitto.conf"
    config.write_text(
        f"listener {port} {host}\n"
        "allow_anonymous true\n"
        "persistence false\n"
        f"max_packet_size {MAX_PACKET_SIZE}\n"
        "set_tcp_nodelay true\n"
        "log_dest stdout\n"
        "log_type error\n"
        "log_type warning\n"
    )
    return config


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A private Mosquitto on a free loopback port, killed after the test."""
    if shutil.which(MOSQUITTO) is None:
        reason = f"mosquitto binary not found at {MOSQUITTO}; install the mosquitto package"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    host = "127.0.0.1"
    folder = tmp_path / "mosquitto"
    folder.mkdir()
    last_error: Exception | None = None
    for _ in range(3):  # another process may grab the free port before mosquitto binds it
        port = _free_port(host)
        write_config(folder, host, port)
        broker = MosquittoBroker(host, port, None, folder)  # type: ignore[arg-type]
        try:
            broker.start()
        except RuntimeError as e:
            last_error = e
            continue
        try:
            yield broker
        finally:
            broker.stop()
        return
    raise RuntimeError(f"could not start mosquitto: {last_error}")
