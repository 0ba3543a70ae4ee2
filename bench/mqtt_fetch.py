"""Bundle download throughput over the MQTT fetch protocol against raw paho through the same broker.

A blob store (``RepoStore.put_target``) holds one target of random bytes.
For each broker the script measures, best of N, in the same run:

* **fetch**: what a device does to download a target: a ``FetchBridge``
  serving the store and a ``DeviceConnection`` + ``ResumableDownload``
  fetching it into ``{sha256}.partial``, a window of chunks in flight asked
  for as four pipelined requests, the sha256 computed as the bytes arrive, a
  progress record rewritten after every chunk and made durable (one
  ``fdatasync``) once per request, ending with the download's own sha256
  check. The bench hashes the finished
  file again (outside the timing) to verify it.
* **stream** (diagnostic): the same protocol without the disk: frames from
  ``MqttFetcher.stream`` hashed in memory. fetch/stream separates the cost of
  the resumable download's durability from the cost of the protocol itself.
* **raw** (the reference): the same bytes, pre-read into memory, published by
  one paho client as 64 KiB QoS 1 messages on a device's ``rx`` topic and
  received by another paho client subscribed to it. Same broker, same TLS and
  certificate identities as the fetch (server identity publishes, device
  identity receives), same listeners, same TCP_NODELAY.

Client ids are bound to certificate identities on both TLS brokers, as in
production: each device connects as its own device id (the fetching device
``bench-device``, the raw subscriber ``bench-raw``), and the serving side as
the server identity with a replica suffix of its own
(``_edgeota-server-bench-bridge-{tag}`` for the bridge,
``_edgeota-server-bench-raw-pub`` for the raw publisher: one id each, so
neither drops the other's session). On ``mosquitto-tls`` the server identity
is issued by the services CA (``broker_config.service_ca``) and connects to
the server listener (``BrokerFiles.server_port``), the devices to the device
listener, as ``edgeota serve --broker`` and the agents do. The figures
measured before that change (2026-11-26, below) had the bridge and the raw
publisher on the device listener, with a fleet CA certificate: both sides of
the ratio moved to the server listener together, a second listener of the
same Mosquitto process with the same TLS settings, so the ratio should not
move; the absolute rates were not re-measured at full size since.

Process shape, as in production: the serving side runs in a child process
(this script with a hidden ``--serve-child`` flag), the receiving side in
this one. The child holds the ``FetchBridge`` on the store and the raw
publisher (server identity); this process holds the device
(``DeviceConnection`` with ``ResumableDownload`` or ``MqttFetcher.stream``)
and the raw subscriber (device identity). In production the server and the
device are different processes on different machines; with everything in
one process (the earlier version of this bench) the fetch's five Python
threads shared one GIL against raw's two, which measured the GIL more than
the protocol. Each side now has its own GIL, for fetch and raw alike. The
child is driven over its stdin/stdout, one line each way (JSON config ->
``ready``, ``publish`` -> ``published``, ``stop`` -> ``stopped`` with the
bridge counters), every wait bounded; it stops when its stdin closes and is
killed if it does not, so no child outlives the bench (SIGTERM included).
Raw is timed from the moment this process tells the child to publish until
the subscriber holds every byte: one hop to the serving side, as the fetch's
first request makes one.

Brokers:

* ``mosquitto``: a private ``/usr/sbin/mosquitto`` on a free loopback port
  with a minimal plain-TCP config (as ``tests/mosquitto_support.py``);
* ``mosquitto-tls`` (skipped with ``--no-tls``): the production setup written by
  ``broker_config.write_mosquitto_files`` from a temporary fleet CA (TLS,
  client certificates, ACL, persistence; a device listener and a server
  listener on two free ports);
* ``embedded``: ``EmbeddedBroker`` (amqtt, TLS with client certificates and
  the ACL plugin) on a thread of the server child, beside the bridge, as the
  server runs it: the broker shares the serving side's GIL, for the raw
  publisher as for the bridge.

Rates are MB/s of target bytes (10**6 bytes). The target is fetch/raw >= 0.6
on Mosquitto (the embedded broker is reported, without a target). Windows
(chunks in flight) 16 and 32 (the agent's default: four pipelined requests
of 8) are tried and the best is reported. When a
Mosquitto ratio is below target (or with ``--profile``) one extra download
is run under cProfile, one profiler per thread on both sides (device
consumer, network thread and progress saver here; bridge workers and network
thread, and the embedded broker, in a profiled child, whose CRC cache is
cold), timing each thread's CPU (``--profile-clock wall`` for wall time),
and the hot spots are printed.

Measured 2026-11-26 on the project's machine (2 cores shared with other
work, so single rounds vary by +-20 %; compare ratios of one run), 32 MiB,
best of 3, three runs, windows in chunks in flight::

    broker         window  fetch MB/s  stream MB/s  raw MB/s  ratio
    mosquitto      16      206-217     248-292      450-498   0.42-0.46
    mosquitto      32      235-261     287-307      450-498   0.48-0.54
    mosquitto-tls  16      158-163     188-192      268-285   0.56-0.60
    mosquitto-tls  32      190-197     202-221      268-285   0.67-0.72
    embedded       16      42-44       44           50-52     0.83-0.85
    embedded       32      46          46-48        50-52     0.89-0.91

The target holds on Mosquitto as ``edgeota broker-config`` sets it up (TLS,
client certificates, ACL): 0.67-0.72 with the agent's default window. On a
plain-TCP Mosquitto, which edgeota never deploys, raw gets the cheaper
transport alone and the ratio is 0.48-0.54: below.

Before, with every client in one process and two windows of 8 chunks
pipelined: mosquitto 172 fetch / 411 raw = 0.42 (stream 191). What moved it:
the process shape (raw and fetch both gain; fetch/raw went to ~0.48 with
the device code unchanged); then the device's per-chunk work
(``agent/mqtt_fetcher.py``): progress records that hold the sha256 of the
bytes before them, so saving reads nothing back (the record CRC-32 was
recomputed from the file), a durable save that never makes the transfer
wait for an ``fdatasync``, the next request asked for before the consumer
writes the frame; and the window: 32 chunks in flight as four requests of
8, so the next request goes out while three are still arriving.

What is left is CPU: on two cores the run is CPU-bound (about 1.7 cores busy
for raw, stream and fetch alike). Fetch over stream is the download's
durability (the write, the progress records, the syncs: ~15 %); stream over
raw is the protocol's own work, which raw does not do: a request per 8
chunks, each frame's header, CRC-32 and routing to its fetch on the device,
the reading and framing on the bridge (its workers spend ~35 ms per 32 MiB
where the raw publisher spends ~7), and the sha256 of every byte.

Usage::

    python bench/mqtt_fetch.py [--size-mib 32] [--repeat 3] [--window 8 --window 16]
                               [--broker mosquitto --broker embedded] [--no-tls]
                               [--quick] [--profile] [--profile-clock cpu|wall]
                               [--json] [--dir DIR]

Exits 0 whatever the result: it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import hashlib
import itertools
import json
import logging
import os
import pstats
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from bench_support import accepts, free_port

from edgeota.agent.mqtt_fetcher import MqttFetcher
from edgeota.agent.mqtt_session import DeviceConnection
from edgeota.agent.resumable import ResumableDownload
from edgeota.protocol.fetch import (
    MAX_FRAME_SIZE,
    MAX_PAYLOAD,
    MAX_WINDOW,
    PIPELINE_DEPTH,
    MqttTls,
)
from edgeota.protocol.files import write_private_file
from edgeota.protocol.identity import SERVER_IDENTITY
from edgeota.protocol.topics import DeviceTopic, Topics
from edgeota.server.broker_config import service_ca, write_mosquitto_files
from edgeota.server.embedded_broker import EmbeddedBroker
from edgeota.server.fleet_ca import (
    CA_CERT_FILE,
    TLS_CERT_FILE,
    TLS_KEY_FILE,
    FleetCA,
    certificate_pem,
    private_key_pem,
    write_device_tls,
)
from edgeota.server.mqtt_bridge import FetchBridge
from edgeota.server.repo.storage import RepoStore

TARGET_RATIO = 0.6  # fetch/raw, on Mosquitto
MOSQUITTO = os.environ.get("EDGEOTA_TEST_MOSQUITTO", "/usr/sbin/mosquitto")
DEVICE_ID = "bench-device"  # the fetching device (and its client id: bound to its certificate)
RAW_DEVICE_ID = "bench-raw"  # the raw subscriber: its own rx topic, so neither sees the other's
# The serving side's client ids: the server identity with a replica suffix each (the brokers
# accept ``_edgeota-server-{tag}`` from the server identity only).
BRIDGE_CLIENT_ID = f"{SERVER_IDENTITY}-bench-bridge"  # + "-{tag}"
RAW_PUBLISHER_CLIENT_ID = f"{SERVER_IDENTITY}-bench-raw-pub"
TARGET_NAME = "models/bench/1.0.0.eotb"
CHUNK = MAX_PAYLOAD  # 64 KiB: the fetch chunk and the raw message size
HOST = "127.0.0.1"
START_TIMEOUT = 10.0  # seconds: broker start, client connect and subscribe
RUN_TIMEOUT = 120.0  # seconds: one transfer, so a stalled broker cannot hang the bench
FRAME_TIMEOUT = 10.0  # seconds without a frame before a fetch fails (no retries here)
_MIB = 1024 * 1024
_TOPICS = Topics()
_RAW_TOPIC = _TOPICS.device(RAW_DEVICE_ID, DeviceTopic.RX)


# -- brokers ---------------------------------------------------------------------------------


@dataclass
class Endpoint:
    """How the clients reach one running broker, and with which identities."""

    name: str
    port: int  # the devices' listener
    server_port: int = 0  # the server's listener (Mosquitto-TLS: its own; else = port)
    server_tls: MqttTls | None = None  # the bridge and the raw publisher
    device_tls: MqttTls | None = None  # the device
    raw_tls: MqttTls | None = None  # the raw subscriber (a device identity too)
    target: float | None = None  # ratio to reach, None: reported only
    embedded_ca: Path | None = None  # set: the server child runs the amqtt broker with this CA


def _identities(ca: FleetCA, folder: Path, endpoint: Endpoint, server_ca: FleetCA) -> None:
    """Client TLS for the server identity (issued by ``server_ca``) and both device identities
    (by ``ca``, the fleet CA that also issued the broker's certificate)."""
    server = folder / "server-identity"
    server.mkdir(mode=0o700)
    key, cert = server_ca.issue_service_client_certificate(SERVER_IDENTITY)
    write_private_file(server / "key.pem", private_key_pem(key))
    (server / "crt.pem").write_bytes(certificate_pem(cert))
    ca_file = ca.folder / CA_CERT_FILE
    endpoint.server_tls = MqttTls(ca_file, server / "crt.pem", server / "key.pem")
    devices = []
    for device_id in (DEVICE_ID, RAW_DEVICE_ID):
        device = folder / f"{device_id}-identity"
        write_device_tls(device, device_id, ca)
        devices.append(MqttTls(ca_file, device / TLS_CERT_FILE, device / TLS_KEY_FILE))
    endpoint.device_tls, endpoint.raw_tls = devices


def _plain_mosquitto_config(folder: Path, port: int) -> Path:
    config = folder / "mosquitto.conf"
    config.write_text(
        f"listener {port} {HOST}\n"
        "allow_anonymous true\n"
        "persistence false\n"
        f"max_packet_size {MAX_FRAME_SIZE + 1024}\n"
        "set_tcp_nodelay true\n"
        "log_dest stdout\n"
        "log_type error\n"
        "log_type warning\n"
    )
    return config


@contextlib.contextmanager
def _mosquitto(folder: Path, tls: bool) -> Iterator[Endpoint]:
    """A private Mosquitto (plain minimal config, or the production TLS setup)."""
    if shutil.which(MOSQUITTO) is None:
        raise RuntimeError(f"mosquitto binary not found at {MOSQUITTO}")
    folder.mkdir()
    endpoint = Endpoint("mosquitto-tls" if tls else "mosquitto", 0, target=TARGET_RATIO)
    ca = FleetCA.create(folder / "ca") if tls else None
    if ca is not None:
        # The server listener trusts only the services CA: the server identity comes from it.
        _identities(ca, folder, endpoint, server_ca=service_ca(ca))
    log = folder / "mosquitto.log"
    for _ in range(3):  # another process may take a free port before mosquitto binds it
        port = free_port()
        if ca is not None:
            server_port = free_port()
            if server_port == port:
                continue
            run_as = "root" if os.geteuid() == 0 else None  # else it drops to "mosquitto"
            files = write_mosquitto_files(ca, folder / f"broker-{port}", host=HOST, port=port,
                                          server_port=server_port, run_as=run_as)
            config = files.config
        else:
            server_port = port
            config = _plain_mosquitto_config(folder, port)
        with log.open("ab") as out:
            process = subprocess.Popen([MOSQUITTO, "-c", str(config)], stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def listening(ports: tuple[int, ...] = (port, server_port)) -> bool:
            return all(accepts(p) for p in ports)

        deadline = time.monotonic() + START_TIMEOUT
        while process.poll() is None and not listening() and time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(0.01)  # returns at once if mosquitto exits (bad config)
        if process.poll() is None and listening():
            break
        _stop_process(process)
    else:
        raise RuntimeError(f"mosquitto did not start:\n{log.read_text(errors='replace')[-2000:]}")
    endpoint.port, endpoint.server_port = port, server_port
    try:
        yield endpoint
    finally:
        _stop_process(process)


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@contextlib.contextmanager
def _embedded(folder: Path) -> Iterator[Endpoint]:
    """A fleet CA and identities for the amqtt broker, which each server child starts itself.

    In production the embedded broker runs inside the server process, beside
    the bridge, so here it runs in the server child (port chosen there). It
    has one listener, trusting the fleet CA, which issues the server identity
    too (as ``edgeota serve`` does for its embedded broker).
    """
    folder.mkdir()
    ca = FleetCA.create(folder / "ca")
    endpoint = Endpoint("embedded", 0, embedded_ca=ca.folder)
    _identities(ca, folder, endpoint, server_ca=ca)
    yield endpoint


# -- the serving side: a child process -----------------------------------------------------------

CHILD_FLAG = "--serve-child"  # hidden: run as the server child (see _child_main)


def _tls_json(tls: MqttTls | None) -> list[str | None] | None:
    if tls is None:
        return None
    return [str(tls.ca_file), str(tls.cert_file) if tls.cert_file else None,
            str(tls.key_file) if tls.key_file else None]


def _tls_from_json(value: list[str | None] | None) -> MqttTls | None:
    if value is None:
        return None
    ca, cert, key = value
    assert ca is not None
    return MqttTls(Path(ca), Path(cert) if cert else None, Path(key) if key else None)


class ServerChild:
    """The serving side in a child process: ``FetchBridge`` on the store and the raw publisher.

    Controlled over its stdin/stdout, one line each way: the parent writes a
    JSON config, the child answers ``ready {"port": N}`` (the devices' listener:
    the embedded broker's is only known there); then ``publish``
    (answer ``published {...}`` once every raw message is handed to paho) and
    ``stop`` (answer ``stopped {"counters": ..., "profile": ...}``). The child
    answers ``error ...`` and exits on any failure, and stops when its stdin
    closes (the bench died). Every wait here is bounded; :meth:`close` kills a
    child that does not stop in time.
    """

    def __init__(self, endpoint: Endpoint, store: RepoStore, target: Target, *, max_window: int,
                 tag: str, workdir: Path, profile: bool = False, profile_clock: str = "cpu",
                 top: int = 8) -> None:
        self.log_path = workdir / f"server-{tag}.log"
        self._buffer = b""
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), CHILD_FLAG],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        try:
            self._write(json.dumps({
                "store": str(store.root), "target_path": target.path, "length": target.length,
                "port": endpoint.port, "server_port": endpoint.server_port,
                "embedded_ca": str(endpoint.embedded_ca) if endpoint.embedded_ca else None,
                "server_tls": _tls_json(endpoint.server_tls), "max_window": max_window,
                "tag": tag, "profile": profile, "profile_clock": profile_clock, "top": top}))
            # Python start-up and imports, the broker (embedded), bridge and publisher.
            self.port = int(self._expect("ready", 3 * START_TIMEOUT)["port"])  # for devices
        except BaseException:
            self.close()
            raise

    def publish(self) -> None:
        """Tell the child to publish the raw messages (does not wait)."""
        self._write("publish")

    def published(self, timeout: float) -> dict[str, Any]:
        return self._expect("published", timeout)

    def failed(self) -> bool:
        """The child has exited (it only exits on ``stop``, EOF or an error)."""
        return self._process.poll() is not None

    def stop(self) -> dict[str, Any]:
        """Stop the child cleanly; its bridge counters (and profile, if asked for)."""
        try:
            self._write("stop")
            reply = self._expect("stopped", 2 * START_TIMEOUT)
            self._process.wait(START_TIMEOUT)
            return reply
        finally:
            self.close()

    def close(self) -> None:
        """Make sure the child is gone: closed stdin, then kill (bounded)."""
        process = self._process
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        if process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(1.0)  # EOF on stdin: it stops by itself
        if process.poll() is None:
            process.kill()
            process.wait(5)
        if process.stdout is not None:
            process.stdout.close()

    def describe_failure(self) -> str:
        tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
        return f"server child exit code {self._process.poll()}; its log:\n{tail}"

    def _write(self, line: str) -> None:
        assert self._process.stdin is not None
        try:
            self._process.stdin.write(line.encode() + b"\n")
            self._process.stdin.flush()
        except OSError as e:
            raise RuntimeError(f"server child gone: {self.describe_failure()}") from e

    def _expect(self, word: str, timeout: float) -> dict[str, Any]:
        line = self._read_line(timeout)
        got, _, rest = line.partition(" ")
        if got != word:
            raise RuntimeError(f"server child answered {line[:300]!r}, expected {word!r}; "
                               f"{self.describe_failure()}")
        return json.loads(rest) if rest else {}

    def _read_line(self, timeout: float) -> str:
        assert self._process.stdout is not None
        fd = self._process.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise RuntimeError(f"server child silent for {timeout}s; "
                                   f"{self.describe_failure()}")
            data = os.read(fd, 65536)
            if not data:
                raise RuntimeError(f"server child ended; {self.describe_failure()}")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode(errors="replace")


class _RawPublisher:
    """Server identity, publishing the target's bytes on the raw subscriber's ``rx`` (child)."""

    def __init__(self, port: int, tls: MqttTls | None) -> None:
        connected = threading.Event()
        self.client = _client(RAW_PUBLISHER_CLIENT_ID, tls)
        self.client.on_connect = lambda *_a: connected.set()
        self.client.connect(HOST, port, keepalive=60)
        self.client.loop_start()
        if not connected.wait(START_TIMEOUT):
            self.close()
            raise RuntimeError("raw publisher did not connect in time")

    def run(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            info = self.client.publish(_RAW_TOPIC, chunk, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise RuntimeError(f"raw publish failed: {mqtt.error_string(info.rc)}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _child_main() -> int:
    """The server child: broker (embedded), FetchBridge and raw publisher; see ServerChild."""
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # nothing but replies on the pipe
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    _quiet_paho_shutdown_race()

    def reply(word: str, body: dict[str, Any] | None = None) -> None:
        replies.write(word + (" " + json.dumps(body) if body is not None else "") + "\n")

    try:
        config = json.loads(sys.stdin.readline() or "null")
        if not isinstance(config, dict):
            return 0  # the parent went away before configuring us
        with contextlib.ExitStack() as stack:
            profiles = (stack.enter_context(_profiled_threads("server main thread (commands)",
                                                              config["profile_clock"]))
                        if config["profile"] else None)
            port, server_port = config["port"], config["server_port"]
            if config["embedded_ca"]:
                broker = EmbeddedBroker(Path(config["embedded_ca"]), host=HOST, port=0)
                broker.start()
                stack.callback(broker.stop)
                port = server_port = broker.port  # one listener for devices and server
            store = RepoStore(Path(config["store"]))
            data = store.file_for_request(config["target_path"]).read_bytes()
            if len(data) != config["length"]:
                raise RuntimeError("the stored target has another length")
            chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]
            del data
            tls = _tls_from_json(config["server_tls"])
            bridge = FetchBridge(store, host=HOST, port=server_port,
                                 client_id=f"{BRIDGE_CLIENT_ID}-{config['tag']}", tls=tls,
                                 max_window=config["max_window"])
            bridge.start(timeout=START_TIMEOUT)
            stack.callback(bridge.stop)
            publisher = _RawPublisher(server_port, tls)
            stack.callback(publisher.close)
            reply("ready", {"port": port})
            for line in sys.stdin:
                command = line.strip()
                if command == "publish":
                    start = time.perf_counter()
                    publisher.run(chunks)
                    reply("published", {"queue_s": round(time.perf_counter() - start, 4)})
                elif command == "stop":
                    break
                else:
                    raise RuntimeError(f"unknown command {command!r}")
            c = bridge.counters()
            counters = {"requests": c.requests, "chunks_sent": c.chunks_sent,
                        "duplicates": c.duplicates, "frames_dropped": c.frames_dropped,
                        "errors_sent": dict(c.errors_sent)}
        # Every thread has ended (bridge stopped): the profiles are complete.
        summary = _profile_summary(profiles, config["top"]) if profiles is not None else None
        reply("stopped", {"counters": counters, "profile": summary})
    except BaseException as e:  # reported to the parent (KeyboardInterrupt too), then exit
        with contextlib.suppress(OSError):
            reply("error", {"error": f"{type(e).__name__}: {e}"})
        logging.getLogger(__name__).exception("server child failed")
        return 1
    return 0


# -- raw paho publish -> subscribe -------------------------------------------------------------


def _no_delay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _client(client_id: str, tls: MqttTls | None) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         clean_session=True, protocol=mqtt.MQTTv311)
    if tls is not None:
        client.tls_set(ca_certs=str(tls.ca_file), certfile=str(tls.cert_file),
                       keyfile=str(tls.key_file))
    client.on_socket_open = _no_delay
    return client


class _RawSubscriber:
    """Device identity, subscribed to its ``rx``: receives what the child's publisher sends."""

    def __init__(self, endpoint: Endpoint, port: int) -> None:
        self._cond = threading.Condition()
        self._received = 0
        self._subscribed = threading.Event()
        self.client = _client(RAW_DEVICE_ID, endpoint.raw_tls)  # its certificate's CN
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(HOST, port, keepalive=60)
        self.client.loop_start()
        if not self._subscribed.wait(START_TIMEOUT):
            self.close()
            raise RuntimeError("raw subscriber did not connect and subscribe in time")

    def _on_connect(self, client: mqtt.Client, *_args: Any) -> None:
        client.subscribe(_RAW_TOPIC, qos=1)

    def _on_message(self, _client: mqtt.Client, _userdata: Any,
                    message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self._received += len(message.payload)
            self._cond.notify_all()

    def run(self, server: ServerChild, total: int) -> float:
        """Seconds from telling the server child to publish until every byte is here."""
        with self._cond:
            self._received = 0
        start = time.perf_counter()
        server.publish()
        deadline = start + RUN_TIMEOUT
        with self._cond:
            # In slices, so a child that died does not cost the whole timeout.
            while not self._cond.wait_for(lambda: self._received >= total, 1.0):
                if server.failed() or time.perf_counter() > deadline:
                    raise RuntimeError(f"raw: {self._received} of {total} bytes; "
                                       + server.describe_failure())
        elapsed = time.perf_counter() - start
        server.published(RUN_TIMEOUT)  # its answer, after the timing
        if self._received != total:
            raise RuntimeError(f"raw: received {self._received} bytes, sent {total}")
        return elapsed

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# -- the fetch protocol --------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    path: str  # repository path the device asks for
    length: int
    sha256: str


def _make_target(workdir: Path, size_mib: int) -> tuple[RepoStore, Target]:
    source = workdir / "bundle.eotb"
    with source.open("wb") as out:
        for _ in range(size_mib):
            out.write(os.urandom(_MIB))
    store = RepoStore(workdir / "blobs")
    info = store.put_target(TARGET_NAME, source)
    sha256 = info.hashes["sha256"]
    length = source.stat().st_size
    source.unlink()
    return store, Target(f"image/targets/models/bench/{sha256}.1.0.0.eotb", length, sha256)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_MIB):
            digest.update(block)
    return digest.hexdigest()


class _Device:
    """The device: one DeviceConnection (this process), fetching from the server child."""

    def __init__(self, endpoint: Endpoint, port: int) -> None:
        self.connection = DeviceConnection(DEVICE_ID, host=HOST, port=port,
                                           tls=endpoint.device_tls,
                                           client_id=DEVICE_ID)  # its certificate's CN
        self.connection.start()
        if not self.connection.wait_ready(START_TIMEOUT):
            self.close()
            raise RuntimeError("device connection not ready in time")

    def download(self, target: Target, window: int, folder: Path) -> float:
        """Seconds for one ResumableDownload of the target into an empty ``folder``."""
        shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        final = ResumableDownload(self.connection, folder, window=window, max_retries=0,
                                  timeout=FRAME_TIMEOUT).download(
            target.path, length=target.length, sha256=target.sha256)
        elapsed = time.perf_counter() - start
        if _sha256_file(final) != target.sha256:
            raise RuntimeError("downloaded file does not match the target's sha256")
        shutil.rmtree(folder, ignore_errors=True)
        return elapsed

    def stream(self, target: Target, window: int) -> tuple[float, dict[str, float]]:
        """Seconds to stream and hash the target in memory; gaps inside / between requests."""
        fetcher = MqttFetcher(self.connection, timeout=FRAME_TIMEOUT, window=window)
        digest = hashlib.sha256()
        stamps = []
        start = time.perf_counter()
        for frame in fetcher.stream(target.path, max_length=target.length):
            digest.update(frame.payload)
            stamps.append(time.perf_counter())
        elapsed = time.perf_counter() - start
        if digest.hexdigest() != target.sha256:
            raise RuntimeError("streamed bytes do not match the target's sha256")
        pairs = list(enumerate(itertools.pairwise(stamps), start=1))
        step = fetcher.request_window
        inside = [b - a for i, (a, b) in pairs if i % step]
        between = [b - a for i, (a, b) in pairs if not i % step]
        gaps = {"gap_inside_window_ms": _mean_ms(inside),
                "gap_between_windows_ms": _mean_ms(between)}
        return elapsed, gaps

    def close(self) -> None:
        self.connection.close()


def _request_window(window: int) -> int:
    """Chunks per request of a fetch with ``window`` chunks in flight (the bridge's bound)."""
    return -(-window // PIPELINE_DEPTH)


def _mean_ms(values: list[float]) -> float:
    return round(1000 * sum(values) / len(values), 3) if values else 0.0


# -- profiling -----------------------------------------------------------------------------------


_PROFILE_CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.thread_time,
                                                   "wall": time.perf_counter}


@contextlib.contextmanager
def _profiled_threads(main_label: str,
                      clock: str = "cpu") -> Iterator[list[tuple[str, cProfile.Profile]]]:
    """One cProfile per thread started inside the block, plus the calling thread.

    ``clock`` "cpu" times each thread's own CPU (what a CPU-bound run spends),
    "wall" its wall time (waits included).
    """
    timer = _PROFILE_CLOCKS[clock]
    profiles: list[tuple[str, cProfile.Profile]] = []
    original = threading.Thread.run

    def run(self: threading.Thread) -> None:
        profile = cProfile.Profile(timer)
        profiles.append((self.name, profile))
        profile.enable()
        try:
            original(self)
        finally:
            profile.disable()

    main = cProfile.Profile(timer)
    profiles.append((main_label, main))
    threading.Thread.run = run  # type: ignore[method-assign]
    main.enable()
    try:
        yield profiles
    finally:
        main.disable()
        threading.Thread.run = original  # type: ignore[method-assign]


def _role(thread_name: str) -> str:
    if thread_name.startswith("fetch-bridge-"):
        return "server: bridge workers (_serve: read, frame, publish)"
    if "bench-bridge" in thread_name:
        return "server: bridge paho network thread"
    if thread_name == "edgeota-broker":
        return "server: embedded broker (amqtt)"
    if "bench-device" in thread_name:
        return "device: paho network thread"
    if thread_name == "download-saver":
        return "device: progress saver"
    return thread_name


def _short(func: tuple[str, int, str]) -> str:
    filename, line, name = func
    if filename == "~":
        return name
    parts = Path(filename).parts
    tail = "/".join(parts[-2:]) if "edgeota" in parts or "main" in parts else parts[-1]
    return f"{tail}:{line}({name})"


def _profile_summary(profiles: list[tuple[str, cProfile.Profile]], top: int) -> list[dict]:
    """Per thread role: wall seconds of the busiest functions (tottime, cumtime)."""
    by_role: dict[str, pstats.Stats] = {}
    for name, profile in profiles:
        role = _role(name)
        try:
            if role in by_role:
                by_role[role].add(profile)
            else:
                by_role[role] = pstats.Stats(profile)
        except TypeError:  # a profile that recorded nothing
            continue
    summary = []
    for role, stats in by_role.items():
        entries = stats.stats  # type: ignore[attr-defined]
        total = sum(tt for (_cc, _nc, tt, _ct, _callers) in entries.values())
        rows = sorted(entries.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
        key_cum = {}
        for func, (_cc, _nc, _tt, ct, _callers) in entries.items():
            label = _short(func)
            for wanted in ("fsync", "atomic_write", "_sha256_of", "_Inbox.get", "(get)",
                           "(pwrite)", "decode_frame", "encode_frame", "pack_chunk", "(crc32)",
                           "(_serve)", "(_send_chunk)", "(_publish)", "(publish)", "(wait)",
                           "(select)", "(send)", "(recv)", "(read)", "(readinto)", "(write)",
                           "_on_message", "(_handle_on_message)", "(_packet_write)",
                           "(_packet_read)", "(_handle_pubackcomp)"):
                if wanted in label:
                    key_cum[label] = round(ct, 3)
        summary.append({
            "thread": role,
            "profiled_s": round(total, 3),
            "top_tottime": [{"function": _short(func), "calls": nc, "tottime_s": round(tt, 3),
                             "cumtime_s": round(ct, 3)}
                            for func, (_cc, nc, tt, ct, _callers) in rows],
            "cumtime_s": dict(sorted(key_cum.items(), key=lambda kv: -kv[1])[:12]),
        })
    return summary


def profile_download(endpoint: Endpoint, store: RepoStore, target: Target, window: int,
                     workdir: Path, top: int, *, server_side: bool,
                     clock: str = "cpu") -> dict[str, Any]:
    """One ResumableDownload, each device thread under its own cProfile (and the server's)."""
    server = ServerChild(endpoint, store, target, max_window=_request_window(window),
                         tag="prof",
                         workdir=workdir, profile=server_side, profile_clock=clock, top=top)
    try:
        with _profiled_threads("device: consumer (ResumableDownload, main thread)",
                               clock) as profiles:
            device = _Device(endpoint, server.port)
            try:
                elapsed = device.download(target, window, workdir / "profiled")
            finally:
                device.close()
        stopped = server.stop()
    finally:
        server.close()
    return {"broker": endpoint.name, "window": window, "clock": clock,
            "mb_s_under_profiler": round(target.length / 1e6 / elapsed, 1),
            "threads": _profile_summary(profiles, top) + (stopped.get("profile") or [])}


# -- one broker ------------------------------------------------------------------------------------


def bench_broker(endpoint: Endpoint, store: RepoStore, target: Target, windows: list[int],
                 repeat: int, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    raw_times: list[float] = []
    fetch_times: dict[int, list[float]] = {w: [] for w in windows}
    stream_times: dict[int, list[float]] = {w: [] for w in windows}
    gaps: dict[int, dict[str, float]] = {}
    server = ServerChild(endpoint, store, target,
                         max_window=_request_window(max(windows)), tag=endpoint.name,
                         workdir=workdir)
    try:
        raw = device = None
        try:  # the clients go first: the broker may be in the child
            raw = _RawSubscriber(endpoint, server.port)
            device = _Device(endpoint, server.port)
            # Interleaved rounds: on a shared machine, drift hits raw and fetch alike.
            for n in range(repeat):
                raw_times.append(raw.run(server, target.length))
                for window in windows:
                    fetch_times[window].append(
                        device.download(target, window, workdir / "download"))
                    seconds, gap = device.stream(target, window)
                    stream_times[window].append(seconds)
                    if seconds <= min(stream_times[window]):
                        gaps[window] = gap
                log(f"    round {n + 1}/{repeat}: raw {_rate(target, raw_times[-1])} MB/s, "
                    + ", ".join(f"w{w} fetch {_rate(target, fetch_times[w][-1])} / stream "
                                f"{_rate(target, stream_times[w][-1])}" for w in windows))
        except Exception as e:
            if server.failed():  # say why: the serving side died
                raise RuntimeError(f"{type(e).__name__}: {e}; {server.describe_failure()}") from e
            raise
        finally:
            if device is not None:
                device.close()
            if raw is not None:
                raw.close()
        counters = server.stop()["counters"]
    finally:
        server.close()

    raw_rate = _rate(target, min(raw_times))
    per_window = {}
    for window in windows:
        fetch_rate = _rate(target, min(fetch_times[window]))
        stream_rate = _rate(target, min(stream_times[window]))
        per_window[window] = {
            "fetch_mb_s": fetch_rate,
            "stream_mb_s": stream_rate,
            "ratio": round(fetch_rate / raw_rate, 3),
            "stream_ratio": round(stream_rate / raw_rate, 3),
            "fetch_s": [round(t, 3) for t in fetch_times[window]],
            "stream_s": [round(t, 3) for t in stream_times[window]],
            **gaps.get(window, {}),
        }
    best = max(windows, key=lambda w: per_window[w]["fetch_mb_s"])
    ratio = per_window[best]["ratio"]
    verdict = "-" if endpoint.target is None else ("PASS" if ratio >= endpoint.target else "BELOW")
    return {
        "broker": endpoint.name,
        "tls": endpoint.device_tls is not None,
        "size_mib": target.length // _MIB,
        "window": best,
        "fetch_mb_s": per_window[best]["fetch_mb_s"],
        "stream_mb_s": per_window[best]["stream_mb_s"],
        "raw_mb_s": raw_rate,
        "ratio": ratio,
        "target_ratio": endpoint.target,
        "verdict": verdict,
        "raw_s": [round(t, 3) for t in raw_times],
        "windows": {str(w): v for w, v in per_window.items()},
        "bridge": counters,
    }


def _rate(target: Target, seconds: float) -> float:
    return round(target.length / 1e6 / seconds, 1)


_BROKERS = ("mosquitto", "mosquitto-tls", "embedded")


def _start(name: str, folder: Path) -> contextlib.AbstractContextManager[Endpoint]:
    if name == "embedded":
        return _embedded(folder)
    return _mosquitto(folder, tls=name == "mosquitto-tls")


# -- output ----------------------------------------------------------------------------------------


def _print_table(results: list[dict[str, Any]], windows: list[int]) -> None:
    header = (f"{'broker':<14} {'MiB':>4} {'window':>6} {'fetch MB/s':>10} {'raw MB/s':>9} "
              f"{'ratio':>6} {'target':>7} {'verdict':>7} {'stream MB/s':>11}")
    print()
    print(header)
    print("-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['broker']:<14} error: {r['error']}")
            continue
        target = "-" if r["target_ratio"] is None else f">={r['target_ratio']}"
        print(f"{r['broker']:<14} {r['size_mib']:>4} {r['window']:>6} {r['fetch_mb_s']:>10} "
              f"{r['raw_mb_s']:>9} {r['ratio']:>6.2f} {target:>7} {r['verdict']:>7} "
              f"{r['stream_mb_s']:>11}")
    print()
    print("per window, chunks in flight (fetch / stream MB/s, ratio, mean gap between frames "
          "inside a request and across a request boundary):")
    for r in results:
        if "error" in r:
            continue
        for w in windows:
            v = r["windows"][str(w)]
            print(f"  {r['broker']:<14} w{w:<3} fetch {v['fetch_mb_s']:>6} stream "
                  f"{v['stream_mb_s']:>6} ratio {v['ratio']:.2f}  gaps "
                  f"{v.get('gap_inside_window_ms', 0):.2f} / "
                  f"{v.get('gap_between_windows_ms', 0):.2f} ms")
    print()
    print("fetch = FetchBridge -> DeviceConnection + ResumableDownload (pipelined, progress "
          "records, durable per request, streaming sha256 check); stream = MqttFetcher.stream "
          "hashed in memory; raw = paho publish -> subscribe of the same bytes, 64 KiB QoS 1 "
          "messages. Serving side (bridge, raw publisher, embedded broker) in a child process, "
          "receiving side in this one. MB = 10**6 bytes; ratio = fetch / raw, best of N each, "
          "same broker, same run.")


def _print_profile(profile: dict[str, Any]) -> None:
    print()
    print(f"cProfile of one download on {profile['broker']}, window {profile['window']} "
          f"({profile['mb_s_under_profiler']} MB/s under the profiler; {profile['clock']} "
          "seconds per thread):")
    for thread in profile["threads"]:
        print(f"  [{thread['thread']}] {thread['profiled_s']} s profiled")
        for row in thread["top_tottime"]:
            print(f"    {row['tottime_s']:>7.3f} s self {row['cumtime_s']:>7.3f} s cum "
                  f"{row['calls']:>7} calls  {row['function']}")
        if thread["cumtime_s"]:
            print("    cumulative: " + ", ".join(f"{name} {seconds} s"
                                                for name, seconds in thread["cumtime_s"].items()))


def _quiet_paho_shutdown_race() -> None:
    """Drop paho's "Client is not connected" error, logged when loop_stop races disconnect."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Client is not connected")

    for name in ("edgeota.server.mqtt_bridge", "edgeota.agent.mqtt_fetcher"):
        logging.getLogger(name).addFilter(keep)


# -- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=None, help="target size (default 32)")
    parser.add_argument("--repeat", type=int, default=None, help="best of N (default 3)")
    parser.add_argument("--window", type=int, action="append",
                        help="chunks in flight (repeatable; default 16 and 32)")
    parser.add_argument("--broker", choices=_BROKERS, action="append",
                        help="only this broker (repeatable; default all three)")
    parser.add_argument("--no-tls", action="store_true",
                        help="skip Mosquitto with the production TLS + ACL setup")
    parser.add_argument("--quick", action="store_true", help="8 MiB, best of 1")
    parser.add_argument("--profile", action="store_true",
                        help="profile a download on every broker, not only below target")
    parser.add_argument("--profile-clock", choices=sorted(_PROFILE_CLOCKS), default="cpu",
                        help="profile each thread's CPU time (default) or its wall time")
    parser.add_argument("--top", type=int, default=8, help="functions per thread in the profile")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: /tmp)")
    args = parser.parse_args(argv)
    size_mib = args.size_mib or (8 if args.quick else 32)
    repeat = args.repeat or (1 if args.quick else 3)
    windows = sorted(set(args.window or [16, 32]))
    most = PIPELINE_DEPTH * MAX_WINDOW
    if size_mib < 1 or repeat < 1 or not all(1 <= w <= most for w in windows):
        parser.error(f"--size-mib and --repeat must be at least 1, --window 1..{most}")
    default = ["mosquitto"] + ([] if args.no_tls else ["mosquitto-tls"]) + ["embedded"]
    brokers = list(dict.fromkeys(args.broker or default))

    def log(message: str) -> None:
        if not args.json:
            print(message, flush=True)

    _quiet_paho_shutdown_race()
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    profiles: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgeota-bench-", dir=args.dir) as tmp:
        workdir = Path(tmp)
        store, target = _make_target(workdir, size_mib)
        for name in brokers:
            log(f"... {name}: {size_mib} MiB, windows {windows}, best of {repeat}")
            broker_start = time.perf_counter()
            try:
                with _start(name, workdir / name) as endpoint:
                    result = bench_broker(endpoint, store, target, windows, repeat, workdir, log)
                    below = endpoint.target is not None and result["ratio"] < endpoint.target
                    if args.profile or below:
                        log(f"    profiling one download (window {result['window']})")
                        profiles.append(profile_download(endpoint, store, target,
                                                         result["window"], workdir, args.top,
                                                         server_side=True,
                                                         clock=args.profile_clock))
            except Exception as e:  # noqa: BLE001 - a benchmark reports and goes on
                result = {"broker": name, "error": f"{type(e).__name__}: {e}"}
            result["seconds"] = round(time.perf_counter() - broker_start, 1)
            results.append(result)
    elapsed = round(time.perf_counter() - started, 1)

    if args.json:
        print(json.dumps({"target_ratio": TARGET_RATIO, "size_mib": size_mib, "repeat": repeat,
                          "windows": windows, "results": results, "profiles": profiles,
                          "seconds": elapsed}, indent=2))
        return 0
    _print_table(results, windows)
    for profile in profiles:
        _print_profile(profile)
    print()
    print(f"total {elapsed} s (" + ", ".join(f"{r['broker']} {r['seconds']} s" for r in results)
          + ")")
    return 0


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds: children and brokers are stopped on the way out


if __name__ == "__main__":
    if sys.argv[1:] == [CHILD_FLAG]:
        sys.exit(_child_main())
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sys.exit(main())
