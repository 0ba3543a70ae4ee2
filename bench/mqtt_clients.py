"""Many MQTT clients in one process: one shared network loop against a paho thread per client.

N plain paho clients (``--clients``, repeatable, default 300 and 1000) connect to a private
Mosquitto (plain TCP, started from the binary on a free loopback port as
``bench/mqtt_fetch.py`` does), each subscribes (QoS 1) to its own topic and
then receives M bytes (``--mib``, default 1 MiB) as 64 KiB QoS 1 messages.
The messages come from a separate publisher process (one paho client,
round-robin over the topics, a bounded number of messages unacknowledged), so
the clients' process spends its CPU on receiving only. Two modes, each in a
fresh child process of its own:

* **shared**: every client on one :class:`~edgeota.simulator.mqtt_loop.SharedNetworkLoop`
  (one loop thread and its connector threads);
* **threaded**: every client with ``connect_async()`` + ``loop_start()``, one
  paho thread each, as a ``DeviceConnection`` without a loop runs.

Figures per mode: **connect** = seconds from the first connect call until
every client holds its SUBACK; **delivery** = seconds from the publisher's
first message until every client holds its M bytes (MB/s = all clients' bytes,
10**6 bytes per MB); **delivery CPU** = CPU seconds the clients' process spent
meanwhile (all its threads); the peak thread count of the clients' process.
On two cores the publisher and Mosquitto take most of the CPU, so delivery
time is mostly theirs; delivery CPU is what receiving costs each mode. A phase
that does not finish within ``--timeout`` seconds, or makes no progress for
``--stall`` seconds, is reported with how many clients got there (the ratio is
then a lower bound). The ratio threaded/shared of each figure should be at least
:data:`TARGET_RATIO` (the shared loop no slower), measured in the same run.

Why 300 as well: paho's own network loop waits with ``select()``, which cannot
watch a descriptor above 1023 (``FD_SETSIZE``), and ``loop_start()`` costs
three descriptors per client (the socket and a wake-up socketpair). Beyond
about 340 clients per process the threaded clients' connections fail in a
reconnect cycle (paho reports no failure), so at 1000 only the shared loop,
which waits with epoll, gets every client connected; at 300 both modes finish
and the delivery ratio compares the threading itself.

Usage::

    python bench/mqtt_clients.py [--clients 300 --clients 1000] [--mib 1] [--timeout 45]
                                 [--stall 10] [--workers 4] [--mode shared --mode threaded]
                                 [--json]

Exits 0 whatever the result: it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edgeota.simulator.mqtt_loop import SharedNetworkLoop

TARGET_RATIO = 1.0  # threaded / shared, for connect and delivery
MESSAGE_SIZE = 64 * 1024  # bytes: the fetch protocol's chunk size
HOST = "127.0.0.1"
MODES = ("shared", "threaded")
PHASES = ("connect", "delivery", "delivery_cpu")  # ratios printed, threaded / shared
PUBLISHER_OUTSTANDING = 512  # messages published but not yet acknowledged by the broker
CHILD_GRACE = 60.0  # seconds a child may take beyond its phase timeouts (start, teardown)
_MIB = 1024 * 1024


# -- the clients' process (one mode) ---------------------------------------------------------


class _Clients:
    """N subscribers counting their bytes; every callback may run on any thread."""

    def __init__(self, mode: str, count: int, expected: int) -> None:
        self.cond = threading.Condition()
        self.subscribed = 0
        self.complete = 0
        self.bytes = [0] * count
        self.expected = expected
        self.clients = []
        for i in range(count):
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                 client_id=f"bench-{mode}-{i}", protocol=mqtt.MQTTv311)
            client.user_data_set(i)
            client.on_connect = self._on_connect
            client.on_subscribe = self._on_subscribe
            client.on_message = self._on_message
            self.clients.append(client)
        self.topics = [f"bench/{mode}/{i}" for i in range(count)]
        self._acked = [False] * count

    def _on_connect(self, client: mqtt.Client, i: int, *_args: Any) -> None:
        client.subscribe(self.topics[i], qos=1)

    def _on_subscribe(self, _client: mqtt.Client, i: int, *_args: Any) -> None:
        with self.cond:
            if not self._acked[i]:
                self._acked[i] = True
                self.subscribed += 1
                self.cond.notify_all()

    def _on_message(self, _client: mqtt.Client, i: int, message: mqtt.MQTTMessage) -> None:
        with self.cond:
            before = self.bytes[i]
            self.bytes[i] += len(message.payload)
            if before < self.expected <= self.bytes[i]:
                self.complete += 1
                self.cond.notify_all()

    def wait(self, attribute: str, timeout: float, stall: float) -> tuple[bool, float]:
        """Until every client got there, ``timeout`` passed or ``stall`` s without progress."""
        started = time.perf_counter()
        deadline = started + timeout
        with self.cond:
            last, last_change = getattr(self, attribute), started
            while last < len(self.clients):
                now = time.perf_counter()
                if now >= deadline or now - last_change >= stall:
                    break
                self.cond.wait(min(deadline, last_change + stall) - now)
                if getattr(self, attribute) != last:
                    last, last_change = getattr(self, attribute), time.perf_counter()
        return last >= len(self.clients), last_change - started


def _run_mode(args: argparse.Namespace) -> dict[str, Any]:
    expected = args.mib * _MIB
    fleet = _Clients(args.run_mode, args.clients, expected)
    peak = threading.active_count()
    loop = SharedNetworkLoop(connect_workers=args.workers).start() \
        if args.run_mode == "shared" else None
    result: dict[str, Any] = {"mode": args.run_mode, "clients": args.clients}
    publisher: subprocess.Popen[bytes] | None = None
    try:
        started = time.perf_counter()
        for client in fleet.clients:
            if loop is not None:
                loop.connect(client, HOST, args.port, keepalive=60)
            else:
                client.connect_async(HOST, args.port, keepalive=60)
                client.loop_start()
        waited = time.perf_counter()
        done, progress = fleet.wait("subscribed", args.timeout, args.stall)
        result["connect_s"] = round(waited - started + progress, 3)  # until the last SUBACK
        result["connect_done"] = fleet.subscribed
        peak = max(peak, threading.active_count())
        if not done:
            return result
        publisher = subprocess.Popen(
            [sys.executable, __file__, "--publisher", "--port", str(args.port), "--topic-prefix",
             f"bench/{args.run_mode}/", "--clients", str(args.clients), "--mib", str(args.mib)],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert publisher.stdout is not None
        if publisher.stdout.readline().strip() != b"connected":
            raise RuntimeError("the publisher did not connect")
        cpu = time.process_time()
        done, delivery = fleet.wait("complete", args.timeout, args.stall)
        peak = max(peak, threading.active_count())
        result["delivery_s"] = round(delivery, 3)
        result["delivery_cpu_s"] = round(time.process_time() - cpu, 3)
        result["delivery_done"] = fleet.complete
        result["mb_s"] = round(sum(fleet.bytes) / 1e6 / delivery, 1)
    finally:
        result["peak_threads"] = peak
        teardown = time.perf_counter()
        if loop is not None:
            loop.stop(timeout=10.0)
        else:
            for client in fleet.clients:
                client.disconnect()
            for client in fleet.clients:
                client.loop_stop()
        result["teardown_s"] = round(time.perf_counter() - teardown, 3)
        if publisher is not None:
            publisher.kill()
            publisher.wait(10)
    return result


# -- the publisher process ----------------------------------------------------------------------


def _publish(args: argparse.Namespace) -> int:
    """Publish M bytes to every client's topic, round-robin, bounded in flight; then exit."""
    payload = os.urandom(MESSAGE_SIZE)
    per_client = -(-args.mib * _MIB // MESSAGE_SIZE)
    window = threading.BoundedSemaphore(PUBLISHER_OUTSTANDING)
    connected = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-publisher",
                         protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(PUBLISHER_OUTSTANDING)
    client.on_connect = lambda *_a: connected.set()
    client.on_publish = lambda *_a: window.release()
    client.connect(HOST, args.port, keepalive=60)
    client.loop_start()
    if not connected.wait(10):
        return 1
    print("connected", flush=True)
    for _ in range(per_client):
        for i in range(args.clients):
            window.acquire()
            client.publish(f"{args.topic_prefix}{i}", payload, qos=1)
    for _ in range(PUBLISHER_OUTSTANDING):  # every message acknowledged
        window.acquire()
    client.disconnect()
    client.loop_stop()
    return 0


# -- orchestration -----------------------------------------------------------------------------


def _child(args: argparse.Namespace, port: int, mode: str, clients: int) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--run-mode", mode, "--port", str(port),
            "--clients", str(clients), "--mib", str(args.mib), "--timeout", str(args.timeout),
            "--stall", str(args.stall), "--workers", str(args.workers)]
    try:
        out = subprocess.run(argv, capture_output=True, check=False,
                             timeout=2 * args.timeout + CHILD_GRACE)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "clients": clients, "error": "the clients' process hung"}
    lines = out.stdout.decode(errors="replace").strip().splitlines()
    if out.returncode != 0 or not lines:
        return {"mode": mode, "clients": clients,
                "error": out.stderr.decode(errors="replace")[-500:]}
    return dict(json.loads(lines[-1]))


def _ratio(shared: dict[str, Any], threaded: dict[str, Any], phase: str) -> tuple[str, str]:
    """threaded / shared for one phase; a threaded phase that did not finish: a lower bound.

    A threaded phase that never finished is timed up to its last progress, so
    the bound compares the shared loop's whole phase with part of the threaded one.
    """
    key, done = f"{phase}_s", f"{phase.split('_')[0]}_done"
    if key not in shared or shared.get(done) != shared["clients"]:
        return "-", "-"
    if key not in threaded:
        return "n/a", "threaded never got there"
    ratio = threaded[key] / shared[key]
    if threaded.get(done) != threaded["clients"]:
        return f">{ratio:.2f}", f"threaded stalled at {threaded[done]}/{threaded['clients']}"
    return f"{ratio:.2f}", "ok" if ratio >= TARGET_RATIO else "below"


def _print(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    header = (f"{'mode':<9} {'clients':>7} {'connect s':>9} {'connected':>9} "
              f"{'delivery s':>10} {'complete':>8} {'MB/s':>7} {'CPU s':>6} {'threads':>7} "
              f"{'teardown s':>10}")
    print()
    print(header)
    print("-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['mode']:<9} {r['clients']:>7} error: {r['error']}")
            continue
        print(f"{r['mode']:<9} {r['clients']:>7} {r['connect_s']:>9} {r['connect_done']:>9} "
              f"{r.get('delivery_s', '-'):>10} {r.get('delivery_done', '-'):>8} "
              f"{r.get('mb_s', '-'):>7} {r.get('delivery_cpu_s', '-'):>6} "
              f"{r['peak_threads']:>7} {r['teardown_s']:>10}")
    print()
    for clients, pair in _pairs(results).items():
        for phase in PHASES:
            ratio, verdict = _ratio(pair.get("shared", {}), pair.get("threaded", {}), phase)
            name = phase.replace("_", " ")
            print(f"{clients:>5} clients  {name:<12} threaded/shared {ratio:>7}  "
                  f"target >={TARGET_RATIO}  {verdict}")
    print()
    print("plain paho clients, each subscribed (QoS 1) to its own topic, each receiving "
          f"{args.mib} MiB as {MESSAGE_SIZE // 1024} KiB QoS 1 messages from a separate "
          f"publisher process; shared = one SharedNetworkLoop ({args.workers} connector "
          "threads), threaded = loop_start() per client; each in a fresh process. A phase "
          f"ends after {args.timeout} s or {args.stall} s without progress ('>' marks a "
          "lower bound). CPU s = CPU of the clients' process during delivery; threads = its "
          "peak thread count.")


def _pairs(results: list[dict[str, Any]]) -> dict[int, dict[str, dict[str, Any]]]:
    pairs: dict[int, dict[str, dict[str, Any]]] = {}
    for r in results:
        if "error" not in r:
            pairs.setdefault(r["clients"], {})[r["mode"]] = r
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, action="append",
                        help="clients per process (repeatable; default 300 and 1000)")
    parser.add_argument("--mib", type=int, default=1, help="MiB per client (default 1)")
    parser.add_argument("--timeout", type=float, default=45.0,
                        help="seconds per phase at most (default 45)")
    parser.add_argument("--stall", type=float, default=10.0,
                        help="a phase ends after this many seconds without progress")
    parser.add_argument("--workers", type=int, default=4, help="connector threads (shared)")
    parser.add_argument("--mode", choices=MODES, action="append",
                        help="only this mode (repeatable; default both)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead")
    parser.add_argument("--run-mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--publisher", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--topic-prefix", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    counts = list(dict.fromkeys(args.clients or [300, 1000]))
    if min(counts) < 1 or args.mib < 1 or args.timeout <= 0 or args.stall <= 0:
        parser.error("--clients, --mib, --timeout and --stall must be positive")
    if args.publisher or args.run_mode:
        args.clients = counts[0]
        if args.publisher:
            return _publish(args)
        print(json.dumps(_run_mode(args)), flush=True)
        return 0

    from mqtt_fetch import _mosquitto  # the same private broker as the fetch bench

    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgeota-bench-") as tmp, \
            _mosquitto(Path(tmp) / "mosquitto", tls=False) as endpoint:
        for clients in counts:
            for mode in list(dict.fromkeys(args.mode or MODES)):
                if not args.json:
                    print(f"... {mode}: {clients} clients x {args.mib} MiB", flush=True)
                results.append(_child(args, endpoint.port, mode, clients))
    elapsed = round(time.perf_counter() - started, 1)
    if args.json:
        ratios = {str(n): {p: _ratio(pair.get("shared", {}), pair.get("threaded", {}), p)[0]
                           for p in PHASES}
                  for n, pair in _pairs(results).items()}
        print(json.dumps({"target_ratio": TARGET_RATIO, "results": results, "ratios": ratios,
                          "seconds": elapsed}, indent=2))
        return 0
    _print(results, args)
    print()
    print(f"total {elapsed} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
