"""Hot swap under load: failed requests, latency during swaps, swap time vs session creation.

A :class:`~edgeota.agent.model_host.ModelHost` serves the MLP sample
(``digits_v2``) to N client threads in a closed loop (each sends one row, waits
for the answer, sends the next). The script measures, in one run:

* **steady**: client latencies over a window with no swap (the target's denominator);
* **swaps**: the same model re-installed ``--swaps`` times under two version
  labels (``2.0.0`` / ``2.0.1``), side by side, never committed, so each swap
  also releases the model the previous one kept for probation. The window of a
  swap is the whole ``swap()`` call: decision, release of the old previous model
  and ``malloc_trim``, memory check, session build, warm-up, switch. A request
  counts as "during a swap" when its start-to-end overlaps that window.
  Failed requests of the whole run are counted (target 0);
* **placebo**: after each swap, an idle window of the same length (nothing
  happens), judged by the same overlap rule. Why it is needed: a request
  overlaps a window of length W with a chance that grows with its own length L
  (as W + L), so "requests overlapping short windows" over-samples the slow
  ones. On 2 cores with 4 Python clients the steady latency has rare stalls of
  5-20 ms (GIL hand-offs, a client preempted while holding the GIL); a window
  of a few milliseconds catches them far above their 1 % share. The placebo
  has the same bias and no swap, so ``swaps / placebo`` is the swap's own
  effect, and ``placebo / steady`` is the bias itself. The same comparison is
  also made over windows of one fixed length (50 ms) from each swap's start
  and each placebo's, with the clients' throughput there;
* **floor**: client latencies while a bare ``onnxruntime.InferenceSession`` of
  the same file and options is created by the bench's main thread (no host
  involved), with its own placebo: what loading a model in this process costs
  the clients at all;
* ``--busy N`` adds N CPU-bound processes for the whole run: a device whose
  application keeps the cores busy;
* **swap time**: a ``swap()`` call from the decision to the new version being
  live, against **creation**: that bare session creation, timed under the same
  load between the swaps.

What was found (onnxruntime 1.32, CPython 3.11, 2 cores shared with other work):

* onnxruntime releases the GIL while it loads, optimises and runs a model: a
  pure-Python thread kept running through a 250 ms ``initialize_session`` of a
  4,500-node graph, never stopped for more than 5 ms (the cores were shared).
  It keeps the GIL while a session is destroyed (12 ms for that graph, 2-4 ms
  for a 64 MiB prepacked MatMul, 0.15 ms for the MLP): the one step of a swap
  that pauses every client, wherever it runs.
* A swap costs the clients about what a bare session creation costs (the
  floor): ``swaps / placebo`` 1.0-1.2 on idle cores and 1.5-1.8 with
  ``--busy 1`` (bare creation / its placebo: 0.9-1.6); over the fixed 50 ms
  windows the p99 was 1.0-1.8x the placebo's and the clients finished 85-96 %
  as many requests. The swap's own CPU is 1.2 ms (0.8 ms for bare creation);
  the rest of its 7-20 ms is waiting for the GIL behind 4 busy clients.
* ``p99 during swaps / steady`` is dominated by the sampling bias: when the
  steady p99 is low (0.3-2 ms, e.g. with a busy core the 4 clients share one
  core and GIL hand-offs are cheap) the placebo's p99 stays at 8-14 ms, so the
  ratio reads 4-20 with no swap at all. Hence the placebo, and the second
  verdict against it (``p99_vs_placebo``).
* Tried and dropped, for no measurable gain to the clients: building on a
  thread of lower CPU priority (nice 10 or 19; swaps 1.5-3x slower), a
  pre-optimised model loaded with optimisations off (no faster to create
  here), ``sys.setswitchinterval(0.001)``.

Targets: p99 during swaps <= 3x steady p99; median swap time <= 2x median
session creation + 50 ms. Both verdicts are printed as measured; the p99 one
also against the placebo (same windows, no swap), with the floor beside them,
so a miss can be read for what it is.

Usage::

    python bench/hot_swap.py [--threads 4] [--swaps 20] [--steady-s 2] [--busy 0] [--json]

Exits 0 whatever the result: it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import onnxruntime as ort

from edgeota.agent.model_host import ModelHost, SwapResult
from edgeota.protocol.manifest import Manifest
from edgeota.runtime.validation import SessionSettings
from edgeota.samples import load_catalog, load_test_split
from edgeota.server.manifest_builder import build_manifest

P99_RATIO_TARGET = 3.0
SWAP_FACTOR_TARGET = 2.0
SWAP_SLACK_MS = 50.0
_PAUSE_BETWEEN_SWAPS_S = 0.05  # let the load settle so windows do not touch each other
#: Length of the fixed windows (from each swap's start, and each placebo's): at most
#: the pause, so a fixed window never reaches into the next step.
FIXED_WINDOW_S = _PAUSE_BETWEEN_SWAPS_S
_BUSY_LOOP = "while True:\n    pass\n"


class _Load:
    """N closed-loop clients recording (start, end, ok) of every request.

    The log is three flat arrays per client, not an object per request: a run
    records about 10^5 requests, and that many tracked objects would make each
    full garbage collection (which stops every thread) longer as the run goes
    on, so later windows (the swaps) would pay more than earlier ones (steady).
    """

    def __init__(self, host: ModelHost, x: np.ndarray, threads: int) -> None:
        self._host = host
        self._x = x
        self._stop = threading.Event()
        self._starts = [array("d") for _ in range(threads)]
        self._ends = [array("d") for _ in range(threads)]
        self._oks = [array("b") for _ in range(threads)]
        self.errors: list[str] = []
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(threads)
        ]

    def _client(self, index: int) -> None:
        rng = np.random.default_rng(index)
        starts, ends, oks = self._starts[index], self._ends[index], self._oks[index]
        rows = len(self._x)
        while not self._stop.is_set():
            row = int(rng.integers(0, rows))
            start = time.perf_counter()
            try:
                self._host.predict("digits", {"input": self._x[row : row + 1]})
                ok = 1
            except Exception as e:  # noqa: BLE001 - the bench counts every failure
                ok = 0
                if len(self.errors) < 100:
                    self.errors.append(f"{type(e).__name__}: {e}")
            ends.append(time.perf_counter())
            starts.append(start)
            oks.append(ok)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def requests(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Start and end times (s) and success flags of all requests, as flat arrays."""
        logs = zip(self._starts, self._ends, self._oks, strict=True)
        # a client still running after stop() may be between two appends: cut to the shortest
        parts = [(s[:k], e[:k], o[:k]) for s, e, o in logs for k in [min(len(s), len(e), len(o))]]
        return (
            np.concatenate([np.frombuffer(s, dtype=np.float64) for s, _, _ in parts]),
            np.concatenate([np.frombuffer(e, dtype=np.float64) for _, e, _ in parts]),
            np.concatenate([np.frombuffer(o, dtype=np.int8) for _, _, o in parts]).astype(bool),
        )


@contextmanager
def _busy_cores(processes: int) -> Iterator[None]:
    """``processes`` CPU-bound child processes for the duration: a device whose cores are busy."""
    children = [subprocess.Popen([sys.executable, "-c", _BUSY_LOOP]) for _ in range(processes)]
    try:
        yield
    finally:
        for child in children:
            child.kill()
        for child in children:
            child.wait(10)


def _percentiles(latencies_ms: np.ndarray) -> dict[str, float | int | None]:
    if not latencies_ms.size:
        return {"n": 0, "p50_ms": None, "p99_ms": None}
    p50, p99 = np.percentile(latencies_ms, [50, 99])
    return {
        "n": int(latencies_ms.size),
        "p50_ms": round(float(p50), 3),
        "p99_ms": round(float(p99), 3),
    }


def _overlapping(
    requests: tuple[np.ndarray, np.ndarray, np.ndarray], windows: list[tuple[float, float]]
) -> np.ndarray:
    """Latencies (ms) of the successful requests whose lifetime overlaps one of ``windows``."""
    starts, ends, ok = requests
    hit = np.zeros(starts.shape, dtype=bool)
    for w_start, w_end in windows:
        hit |= (starts <= w_end) & (ends >= w_start)
    return (ends[hit & ok] - starts[hit & ok]) * 1000


def _fixed(
    requests: tuple[np.ndarray, np.ndarray, np.ndarray], starts: list[float]
) -> dict[str, float | int | None]:
    """Latencies over windows of one length, :data:`FIXED_WINDOW_S`, from each of ``starts``.

    Equal lengths give the swaps and their placebo the same sampling bias, so the
    two can be compared directly; ``per_window`` (requests finished in a window,
    on average) shows the clients' throughput there.
    """
    windows = [(s, s + FIXED_WINDOW_S) for s in starts]
    stats = _percentiles(_overlapping(requests, windows))
    ends = requests[1]
    finished = sum(int(((ends >= a) & (ends <= b)).sum()) for a, b in windows)
    stats["per_window"] = round(finished / len(windows), 1) if windows else None
    return stats


def _idle_window(seconds: float) -> tuple[float, float]:
    """A placebo window: nothing but the load runs for ``seconds``."""
    start = time.perf_counter()
    time.sleep(seconds)
    return start, time.perf_counter()


def _bare_creation_ms(path: str, settings: SessionSettings) -> float:
    start = time.perf_counter()
    ort.InferenceSession(
        path, sess_options=settings.to_session_options(), providers=["CPUExecutionProvider"]
    )
    return (time.perf_counter() - start) * 1000


def _ratio(a: float | int | None, b: float | int | None) -> float | None:
    return round(a / b, 2) if a and b else None


def run(threads: int, swaps: int, steady_s: float, *, busy: int = 0) -> dict[str, object]:
    sample = load_catalog()["digits_v2"]
    x, _ = load_test_split()
    settings = SessionSettings()
    manifests: dict[str, Manifest] = {
        v: build_manifest(
            sample.path, name="digits", version=v, hardware=["bench"], vectors=sample.vectors_path
        )
        for v in ("2.0.0", "2.0.1")
    }
    host = ModelHost(settings)
    host.load("digits", "2.0.0", sample.path, manifests["2.0.0"])
    _bare_creation_ms(str(sample.path), settings)  # first load pays for file cache and imports

    with _busy_cores(busy):
        load = _Load(host, x, threads)
        load.start()
        time.sleep(0.2)  # warm the clients up
        steady_from = time.perf_counter()
        time.sleep(steady_s)
        steady_to = time.perf_counter()

        windows: list[tuple[float, float]] = []
        placebo: list[tuple[float, float]] = []
        creation_windows: list[tuple[float, float]] = []
        creation_placebo: list[tuple[float, float]] = []
        results: list[SwapResult] = []
        swap_ms: list[float] = []
        creation_ms: list[float] = []
        version = "2.0.0"
        for _ in range(swaps):
            time.sleep(_PAUSE_BETWEEN_SWAPS_S)
            created_from = time.perf_counter()
            creation_ms.append(_bare_creation_ms(str(sample.path), settings))
            creation_windows.append((created_from, time.perf_counter()))
            time.sleep(_PAUSE_BETWEEN_SWAPS_S)
            creation_placebo.append(_idle_window(creation_ms[-1] / 1000))
            time.sleep(_PAUSE_BETWEEN_SWAPS_S)
            version = "2.0.1" if version == "2.0.0" else "2.0.0"
            start = time.perf_counter()
            results.append(host.swap("digits", version, sample.path, manifests[version]))
            end = time.perf_counter()
            windows.append((start, end))
            swap_ms.append((end - start) * 1000)
            time.sleep(_PAUSE_BETWEEN_SWAPS_S)
            placebo.append(_idle_window(end - start))
        time.sleep(_PAUSE_BETWEEN_SWAPS_S)
        load.stop()

    requests = load.requests()
    starts, ends, ok = requests
    in_steady = ok & (starts >= steady_from) & (ends <= steady_to)
    steady = _percentiles((ends[in_steady] - starts[in_steady]) * 1000)
    during = _percentiles(_overlapping(requests, windows))
    idle = _percentiles(_overlapping(requests, placebo))
    creating = _percentiles(_overlapping(requests, creation_windows))
    creating_idle = _percentiles(_overlapping(requests, creation_placebo))
    fixed_swaps = _fixed(requests, [a for a, _ in windows])
    fixed_placebo = _fixed(requests, [a for a, _ in placebo])
    throughput = _ratio(fixed_swaps["per_window"], fixed_placebo["per_window"])
    swap_median = float(np.median(swap_ms))
    creation_median = float(np.median(creation_ms))
    swap_budget = SWAP_FACTOR_TARGET * creation_median + SWAP_SLACK_MS
    p99_ratio = _ratio(during["p99_ms"], steady["p99_ms"])
    p99_vs_placebo = _ratio(during["p99_ms"], idle["p99_ms"])
    failed = int((~ok).sum())
    return {
        "threads": threads,
        "swaps": swaps,
        "busy_processes": busy,
        "modes": sorted({r.mode for r in results}),
        "requests": int(ok.size),
        "failed": failed,
        "first_errors": load.errors[:3],
        "steady": steady,
        "during_swaps": during,
        "placebo": idle,
        "during_bare_creation": creating,
        "creation_placebo": creating_idle,
        "p99_ratio": p99_ratio,
        "p99_ratio_target": P99_RATIO_TARGET,
        "p99_swaps_over_placebo": p99_vs_placebo,
        "p99_placebo_over_steady": _ratio(idle["p99_ms"], steady["p99_ms"]),
        "p99_creation_over_placebo": _ratio(creating["p99_ms"], creating_idle["p99_ms"]),
        "fixed_window_ms": FIXED_WINDOW_S * 1000,
        "fixed_swaps": fixed_swaps,
        "fixed_placebo": fixed_placebo,
        "fixed_p99_swaps_over_placebo": _ratio(fixed_swaps["p99_ms"], fixed_placebo["p99_ms"]),
        "fixed_throughput_swaps_over_placebo": throughput,
        "p99_swaps_over_creation": _ratio(during["p99_ms"], creating["p99_ms"]),
        "swap_ms_median": round(swap_median, 3),
        "swap_ms_max": round(max(swap_ms), 3),
        "swap_load_ms_median": round(float(np.median([r.load_ms for r in results])), 3),
        "swap_warm_ms_median": round(float(np.median([r.warm_ms for r in results])), 3),
        "creation_ms_median": round(creation_median, 3),
        "swap_budget_ms": round(swap_budget, 3),
        "swap_over_creation": round(swap_median / creation_median, 2),
        "verdict": {
            "failed": "PASS" if failed == 0 else "FAIL",
            "p99": "PASS" if p99_ratio is not None and p99_ratio <= P99_RATIO_TARGET else "BELOW",
            "p99_vs_placebo": (
                "PASS"
                if p99_vs_placebo is not None and p99_vs_placebo <= P99_RATIO_TARGET
                else "BELOW"
            ),
            "swap_time": "PASS" if swap_median <= swap_budget else "BELOW",
        },
    }


def _line(label: str, stats: object) -> str:
    s = stats if isinstance(stats, dict) else {}
    return f"  {label:<34} p50 {s['p50_ms']} ms  p99 {s['p99_ms']} ms  (n={s['n']})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=4, help="closed-loop clients (default 4)")
    parser.add_argument("--swaps", type=int, default=20, help="swaps to do (default 20)")
    parser.add_argument("--steady-s", type=float, default=2.0, help="steady window (default 2 s)")
    parser.add_argument(
        "--busy", type=int, default=0, help="CPU-bound processes beside the load (default 0)"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.swaps < 1 or args.steady_s <= 0 or args.busy < 0:
        parser.error("--threads and --swaps must be at least 1, --steady-s positive, --busy >= 0")

    r = run(args.threads, args.swaps, args.steady_s, busy=args.busy)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    verdict = r["verdict"]
    assert isinstance(verdict, dict)
    print(
        f"hot swap of digits_v2 (MLP), {r['threads']} closed-loop clients, {r['swaps']} swaps, "
        f"{r['busy_processes']} busy processes"
    )
    print(f"  modes: {', '.join(r['modes'])}")  # type: ignore[arg-type]
    print(f"  requests: {r['requests']}, failed: {r['failed']} (target 0)  {verdict['failed']}")
    for line in r["first_errors"]:  # type: ignore[attr-defined]
        print(f"    {line}")
    print(_line("latency steady:", r["steady"]))
    print(_line("latency during swaps:", r["during_swaps"]))
    print(_line("placebo (idle, same lengths):", r["placebo"]))
    print(_line("floor, bare session creation:", r["during_bare_creation"]))
    print(_line("its placebo:", r["creation_placebo"]))
    print(
        f"  p99 during swaps / steady = {r['p99_ratio']} (target <= {P99_RATIO_TARGET})  "
        f"{verdict['p99']}"
    )
    print(
        f"  p99 during swaps / placebo = {r['p99_swaps_over_placebo']} (the swap's own effect, "
        f"target <= {P99_RATIO_TARGET})  {verdict['p99_vs_placebo']}"
    )
    print(
        f"    placebo / steady = {r['p99_placebo_over_steady']} (sampling bias of short windows)"
    )
    print(
        f"    bare creation / its placebo = {r['p99_creation_over_placebo']} (the floor's effect); "
        f"swaps / bare creation = {r['p99_swaps_over_creation']}"
    )
    fixed_swaps, fixed_placebo = r["fixed_swaps"], r["fixed_placebo"]
    assert isinstance(fixed_swaps, dict) and isinstance(fixed_placebo, dict)
    print(
        f"  fixed {r['fixed_window_ms']:g} ms windows from each start: p99 swaps "
        f"{fixed_swaps['p99_ms']} ms vs placebo {fixed_placebo['p99_ms']} ms "
        f"({r['fixed_p99_swaps_over_placebo']}x); requests finished per window "
        f"{fixed_swaps['per_window']} vs {fixed_placebo['per_window']} "
        f"({r['fixed_throughput_swaps_over_placebo']}x)"
    )
    print(
        f"  swap time median {r['swap_ms_median']} ms (max {r['swap_ms_max']} ms; build "
        f"{r['swap_load_ms_median']} ms, warm-up {r['swap_warm_ms_median']} ms) vs bare "
        f"InferenceSession creation median {r['creation_ms_median']} ms: "
        f"{r['swap_over_creation']}x; budget 2x + 50 ms = {r['swap_budget_ms']} ms  "
        f"{verdict['swap_time']}"
    )
    print(
        "swap time = ModelHost.swap() from call to return (probation release, memory check, "
        "session build, warm-up with the validation vectors, reference switch); "
        "creation = bare onnxruntime.InferenceSession of the same file and options, timed under "
        "the same load."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
