"""The link emulator: bandwidth and latency on real sockets, bounded buffers, closing, a fleet.

Lower bounds on elapsed time are deterministic (a token bucket cannot let
bytes through faster than its rate, a delay line cannot deliver early), so
they are what these tests assert; upper bounds are loose sanity checks.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgeota.simulator.link import LinkEmulator, LinkShape, burst_bytes, queue_bytes
from edgeota.simulator.run import Simulation
from edgeota.simulator.scenario import parse_scenario

TIMEOUT = 10.0


class Upstream:
    """A TCP server in one thread per connection (a test double for the broker)."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(TIMEOUT)
        self.address = self._server.getsockname()[:2]
        self._handle = handle
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            conn.settimeout(TIMEOUT)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self._handle(conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (Linux)
        self._server.close()
        self._accepting.join(TIMEOUT)
        for thread in self._threads:
            thread.join(TIMEOUT)


@pytest.fixture
def upstream() -> Iterator[Callable[[Callable[[socket.socket], None]], Upstream]]:
    made: list[Upstream] = []

    def make(handle: Callable[[socket.socket], None]) -> Upstream:
        made.append(Upstream(handle))
        return made[-1]

    yield make
    for server in made:
        server.close()


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def connect(emulator: LinkEmulator, profile: str) -> socket.socket:
    sock = socket.create_connection(emulator.address(profile), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def eventually(condition: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes (for states with no event)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    chunks, got = [], 0
    while got < count:
        chunk = sock.recv(min(65536, count - got))
        assert chunk, f"closed after {got} of {count} bytes"
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def test_bytes_cannot_cross_a_shaped_link_faster_than_its_rate(upstream) -> None:
    received: dict[str, object] = {}
    done = threading.Event()

    def sink(conn: socket.socket) -> None:
        digest, count = hashlib.sha256(), 0
        while data := conn.recv(65536):
            digest.update(data)
            count += len(data)
        received.update(count=count, sha256=digest.hexdigest(), at=time.monotonic())
        done.set()

    server = upstream(sink)
    shape = LinkShape(bandwidth_kbps=2000)  # 250,000 bytes a second
    payload = bytes(range(256)) * 1024  # 256 KiB
    with LinkEmulator(server.address, {"slow": shape}) as emulator:
        sock = connect(emulator, "slow")
        started = time.monotonic()
        sock.sendall(payload)
        sock.close()
        assert done.wait(TIMEOUT)
        elapsed = float(received["at"]) - started  # type: ignore[arg-type]
        counters = emulator.counters("slow")
    assert received["count"] == len(payload)
    assert received["sha256"] == hashlib.sha256(payload).hexdigest()
    assert shape.rate is not None
    floor = (len(payload) - burst_bytes(shape)) / shape.rate
    assert elapsed >= floor, f"{elapsed:.3f}s < {floor:.3f}s: faster than the link"
    assert elapsed < floor + 5.0  # sanity: shaped, not stalled
    assert counters.bytes_up == len(payload) and counters.connections == 1


def test_latency_is_added_to_each_direction_of_a_round_trip(upstream) -> None:
    server = upstream(echo)
    with LinkEmulator(server.address, {"far": LinkShape(latency_ms=60),
                                       "lan": LinkShape()}) as emulator:
        assert emulator.profiles == ["far"]  # an unshaped profile gets no port
        sock = connect(emulator, "far")
        with sock:
            trips = []
            for _ in range(3):
                started = time.monotonic()
                sock.sendall(b"ping")
                assert recv_exactly(sock, 4) == b"ping"
                trips.append(time.monotonic() - started)
    # One way is 60 ms, so a round trip is at least 120 ms.
    assert min(trips) >= 0.120, trips
    assert max(trips) < 2.0, trips


def test_the_proxy_closes_both_sides_when_one_closes(upstream) -> None:
    closed_by_client = threading.Event()
    server_side: list[socket.socket] = []
    accepted = threading.Event()
    release = threading.Event()

    def handle(conn: socket.socket) -> None:
        first = conn.recv(16)
        if first == b"client-closes":
            if conn.recv(16) == b"":  # the proxy passed the close on
                closed_by_client.set()
        else:  # "server-closes": the broker side hangs up first
            server_side.append(conn)
            accepted.set()
            release.wait(TIMEOUT)

    server = upstream(handle)
    with LinkEmulator(server.address, {"wan": LinkShape(latency_ms=5)}) as emulator:
        sock = connect(emulator, "wan")
        sock.sendall(b"client-closes")
        sock.close()
        assert closed_by_client.wait(TIMEOUT)

        sock = connect(emulator, "wan")
        with sock:
            sock.sendall(b"server-closes")
            assert accepted.wait(TIMEOUT)
            server_side[0].shutdown(socket.SHUT_RDWR)
            assert sock.recv(16) == b""  # the device sees the close
            release.set()
        assert eventually(lambda: emulator.counters("wan").open == 0)


def test_a_receiver_that_stops_reading_pushes_back_instead_of_filling_memory(
        upstream) -> None:
    stuck = threading.Event()

    def never_read(_conn: socket.socket) -> None:
        stuck.wait(TIMEOUT)

    server = upstream(never_read)
    shape = LinkShape(latency_ms=1)
    with LinkEmulator(server.address, {"wan": shape}) as emulator:
        sock = connect(emulator, "wan")
        sock.settimeout(2.0)
        sent = 0
        block = b"x" * 65536
        with pytest.raises(TimeoutError):
            while sent < 256 * 1024 * 1024:
                sent += sock.send(block)
        stuck.set()
        sock.close()
    # The proxy holds at most its delay line; the rest sits in kernel socket buffers.
    assert sent < 64 * 1024 * 1024
    assert queue_bytes(shape) <= 1024 * 1024


def test_a_fleet_on_a_shaped_link_still_updates(tmp_path: Path) -> None:
    scenario = parse_scenario({
        "devices": 2,
        "fleet": [{"hardware": "rpi4", "link": "wan"}],
        "links": {"wan": {"bandwidth_kbps": 4000, "latency_ms": 20}},
        "agent": {"probation_seconds": 0.3, "probation_min_inferences": 3,
                  "poll_seconds": 2.0},
        "timeline": [
            {"action": "publish", "sample": "digits_v1", "release": "digits@1.0.0"},
            {"action": "deploy", "release": "digits@1.0.0", "latency_factor": 0,
             "error_rate_factor": 0, "timeout_seconds": 120},
        ],
    }, "shaped.toml")
    with Simulation(scenario, tmp_path / "sim", workers=2) as sim:
        result = sim.run()
        links = sim.link_emulator
        assert links is not None
        counters = links.counters("wan")
        urls = {d.config.mqtt_url for d in sim.devices}
    assert result.ok, result.problems
    assert {v.get("digits") for v in result.serving.values()} == {"1.0.0"}
    # Every device went through the proxy, and the bundles crossed it.
    assert urls == {f"mqtts://{links.address('wan')[0]}:{links.address('wan')[1]}"}
    assert counters.connections >= 2
    assert counters.bytes_down > 2 * 10_000
