"""The fetch bridge under load: back-pressure instead of dropped frames.

Seen in a 1000-device run: with 128 downloads in flight the bridge's outgoing
queue (1024 frames) overflowed and frames were dropped, so devices stalled
until their timeout. The bridge now waits for the broker's acknowledgements
instead. Here 64 devices on one :class:`SharedNetworkLoop` download the same
target at once, pipelined, through a bridge whose outgoing bound is a few
frames: every download completes, byte for byte, no frame is dropped or
served twice, and the bridge did have to wait. Waits are on conditions with
timeouts, never on sleeps.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from mosquitto_support import MosquittoBroker
from server_support import wait_for

from edgeota.agent.mqtt_fetcher import MqttFetcher
from edgeota.agent.mqtt_session import DeviceConnection
from edgeota.server.mqtt_bridge import FetchBridge
from edgeota.server.repo.storage import RepoStore
from edgeota.simulator.mqtt_loop import SharedNetworkLoop

DEVICES = 64
CHUNK = 4 * 1024  # bytes per frame: many frames from little data
WINDOW = 2  # chunks per request; two requests in flight per download
MAX_QUEUED_FRAMES = 8  # far below DEVICES * WINDOW * 2 frames asked for at once
SIZE = 24 * CHUNK + 77
WAIT = 60.0  # seconds: bound on the whole fleet's downloads (a loaded 2-core machine)


def test_many_concurrent_downloads_complete_without_dropping_a_frame(
        mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    store = RepoStore(tmp_path / "blobs")
    data = os.urandom(SIZE)
    (tmp_path / "bundle.eotb").write_bytes(data)
    sha256 = store.put_target("models/load/1.0.0.eotb", tmp_path / "bundle.eotb").hashes["sha256"]
    target = f"image/targets/models/load/{sha256}.1.0.0.eotb"
    bridge = FetchBridge(store, host=mosquitto.host, port=mosquitto.port, client_id="server",
                         chunk_size=CHUNK, max_window=WINDOW, workers=4,
                         max_queued_frames=MAX_QUEUED_FRAMES, send_timeout=WAIT)
    bridge.start(timeout=10.0)
    loop = SharedNetworkLoop(connect_workers=4).start()
    connections = [DeviceConnection(f"dev-{n}", host=mosquitto.host, port=mosquitto.port,
                                    network=loop) for n in range(DEVICES)]
    results: dict[int, bytes | BaseException] = {}
    lock = threading.Lock()
    go = threading.Event()

    def download(n: int) -> None:
        fetcher = MqttFetcher(connections[n], timeout=WAIT, window=WINDOW)
        go.wait(WAIT)
        try:
            outcome: bytes | BaseException = fetcher.download_bytes(target, SIZE)
        except Exception as e:  # reported by the assertion below
            outcome = e
        with lock:
            results[n] = outcome

    threads = [threading.Thread(target=download, args=(n,), daemon=True)
               for n in range(DEVICES)]
    try:
        for connection in connections:
            connection.start()
        assert all(connection.wait_ready(WAIT) for connection in connections)
        for thread in threads:
            thread.start()
        go.set()  # every device asks at once
        for thread in threads:
            thread.join(WAIT)
        assert not any(thread.is_alive() for thread in threads)
        failed = {n: r for n, r in results.items() if not isinstance(r, bytes)}
        assert not failed
        assert all(results[n] == data for n in range(DEVICES))
        counters = bridge.counters()
        assert counters.frames_dropped == 0
        assert counters.send_stalls == 0
        assert counters.errors_sent == {}  # no 429 or 503 either: everything was accepted
        assert counters.backpressure_waits > 0  # the bound was reached, and waited on
        # Nothing was lost, so nothing was sent twice.
        assert all(counters.served_bytes(f"dev-{n}", target) == SIZE for n in range(DEVICES))
        # A device holds its last frame just before the worker that sent it lets the
        # window go: wait for that, bounded.
        wait_for(lambda: bridge.active_windows() == 0, WAIT, "the bridge to release its windows")
    finally:
        go.set()
        for connection in connections:
            connection.close()
        loop.stop(timeout=5.0)
        bridge.stop()
