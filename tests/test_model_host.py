"""The model host against real onnxruntime sessions of the sample models.

Every expected output comes from a reference session of the same file built
with the same settings, so "the response came from version X" is checked by
value, not by trusting the version label. Timing-sensitive cases (a request
in flight during a swap, the gap of an unload-then-load swap) are driven by a
gate around ``session.run`` that the test opens, never by sleeps.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeota.agent.model_host import (
    ActivationError,
    InferenceError,
    InvalidInputError,
    ModelHost,
    ModelUnavailableError,
    NoPreviousModelError,
    UnknownModelError,
    find_malloc_trim,
)
from edgeota.protocol.errors import EdgeotaError
from edgeota.protocol.manifest import Manifest
from edgeota.runtime.validation import SessionSettings, create_session
from edgeota.samples import SampleModel
from edgeota.server.manifest_builder import build_manifest

SETTINGS = SessionSettings()
WAIT_S = 20.0
V1, V2 = "1.0.0", "2.0.0"
PER_PHASE = 200  # responses per version between swaps in the zero-downtime test


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def manifests(catalog: dict[str, SampleModel]) -> dict[str, Manifest]:
    return {
        key: build_manifest(
            catalog[key].path,
            name="digits",
            version=catalog[key].version,
            hardware=["rpi4"],
            vectors=catalog[key].vectors_path,
        )
        for key in ("digits_v1", "digits_v2")
    }


@pytest.fixture(scope="module")
def references(catalog: dict[str, SampleModel]) -> dict[str, Any]:
    """One reference session per version, built with the host's settings."""
    return {
        V1: create_session(catalog["digits_v1"].path, SETTINGS),
        V2: create_session(catalog["digits_v2"].path, SETTINGS),
    }


class Sample:
    """Arguments for load/swap of one digits version."""

    def __init__(self, catalog: dict[str, SampleModel], manifests: dict[str, Manifest]) -> None:
        self.catalog = catalog
        self.manifests = manifests

    def args(self, version: str) -> tuple[str, str, Path, Manifest]:
        key = "digits_v1" if version == V1 else "digits_v2"
        return "digits", version, self.catalog[key].path, self.manifests[key]


@pytest.fixture
def digits(catalog: dict[str, SampleModel], manifests: dict[str, Manifest]) -> Sample:
    return Sample(catalog, manifests)


class Gate:
    """Open/closed gate a gated session waits at once armed; events say who reached it."""

    def __init__(self) -> None:
        self.armed = False
        self.entered = threading.Event()
        self.opened = threading.Event()


class GatedSession:
    """A real session whose ``run`` waits at a gate, so a test decides when a request ends."""

    def __init__(self, inner: Any, gate: Gate) -> None:
        self._inner = inner
        self._gate = gate

    def get_inputs(self) -> Any:
        return self._inner.get_inputs()

    def get_outputs(self) -> Any:
        return self._inner.get_outputs()

    def run(self, names: Sequence[str], feeds: Mapping[str, np.ndarray]) -> Any:
        if self._gate.armed:
            self._gate.entered.set()
            if not self._gate.opened.wait(WAIT_S):
                raise TimeoutError("the test never opened the gate")
        return self._inner.run(names, feeds)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Poll a condition the code under test offers no event for, with a deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def reference_outputs(session: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"input": x}), strict=True))


def host_accuracy(host: ModelHost, x: np.ndarray, y: np.ndarray) -> tuple[str, float]:
    prediction = host.predict("digits", {"input": x})
    return prediction.version, float(np.mean(prediction.outputs["label"] == y))


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=4) as executor:
        yield executor


# --------------------------------------------------------------------------- serving


def test_load_serves_what_the_model_computes(
    digits: Sample, split: tuple[np.ndarray, np.ndarray], references: dict[str, Any]
) -> None:
    x, _ = split
    host = ModelHost(SETTINGS)
    host.load(*digits.args(V1))
    assert host.models() == ("digits",)
    assert host.current_version("digits") == V1
    assert host.is_ready("digits")
    prediction = host.predict("digits", {"input": x[:37]})
    assert prediction.version == V1
    assert prediction.latency_ms > 0
    expected = reference_outputs(references[V1], x[:37])
    assert prediction.outputs.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(prediction.outputs[name], value)
    only = host.predict("digits", {"input": x[:3]}, outputs=["label"])
    assert list(only.outputs) == ["label"]


def test_swap_side_by_side_then_revert_and_commit(
    digits: Sample, catalog: dict[str, SampleModel], split: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = split
    host = ModelHost(SETTINGS)
    host.load(*digits.args(V1))
    version, acc = host_accuracy(host, x, y)
    assert version == V1
    assert acc == pytest.approx(catalog["digits_v1"].test_accuracy, abs=1e-3)
    v1_session = host.model("digits").session

    result = host.swap(*digits.args(V2))
    assert (result.name, result.old_version, result.new_version) == ("digits", V1, V2)
    assert result.mode == "side_by_side"
    assert result.gap_ms == 0.0
    assert result.warm_ms > 0 and result.load_ms > 0 and result.switch_ms >= 0
    assert "available" in result.detail
    version, acc = host_accuracy(host, x, y)
    assert version == V2
    assert acc == pytest.approx(catalog["digits_v2"].test_accuracy, abs=1e-3)
    assert acc > catalog["digits_v1"].test_accuracy + 0.1
    assert host.previous_version("digits") == V1

    reverted = host.revert("digits")
    assert (reverted.old_version, reverted.new_version, reverted.mode) == (V2, V1, "revert")
    assert reverted.gap_ms == 0.0 and reverted.load_ms == 0.0
    assert host.model("digits").session is v1_session  # no reload: the very same session
    assert host_accuracy(host, x, y)[0] == V1
    assert host.previous_version("digits") is None
    with pytest.raises(NoPreviousModelError):
        host.revert("digits")

    host.swap(*digits.args(V2))
    host.commit("digits")
    assert host.previous_version("digits") is None
    with pytest.raises(NoPreviousModelError):
        host.revert("digits")
    assert host.current_version("digits") == V2


def test_commit_releases_the_previous_session_after_its_last_request(
    digits: Sample, split: tuple[np.ndarray, np.ndarray], pool: ThreadPoolExecutor
) -> None:
    x, _ = split
    gate = Gate()
    host = ModelHost(SETTINGS)
    name, version, path, manifest = digits.args(V1)
    host.load(name, version, path, manifest, session=GatedSession(create_session(path), gate))
    v1 = weakref.ref(host.model("digits").session)
    released_on: list[str] = []
    weakref.finalize(
        host.model("digits").session,
        lambda: released_on.append(threading.current_thread().name),
    )

    gate.armed = True
    pending = pool.submit(host.predict, "digits", {"input": x[:5]})
    assert gate.entered.wait(WAIT_S)
    host.swap(*digits.args(V2))
    host.commit("digits")
    assert v1() is not None, "released while a request was still running on it"
    assert host.in_flight("digits") == 1

    gate.opened.set()
    assert pending.result(WAIT_S).version == V1
    del pending
    assert host.in_flight("digits") == 0
    # released off the request path, by a thread of its own: waited for, with a deadline
    wait_until(lambda: bool(released_on), "the committed session to be released")
    assert v1() is None
    assert released_on == ["edgeota-model-release"], "released on the request's thread"


def test_commit_of_an_idle_previous_releases_at_once(digits: Sample) -> None:
    host = ModelHost(SETTINGS)
    host.load(*digits.args(V1))
    v1 = weakref.ref(host.model("digits").session)
    host.swap(*digits.args(V2))
    assert v1() is not None, "the previous session must stay loaded through probation"
    host.commit("digits")
    assert v1() is None


def test_a_second_swap_ends_the_probation_of_the_first(digits: Sample) -> None:
    host = ModelHost(SETTINGS)
    host.load(*digits.args(V1))
    v1 = weakref.ref(host.model("digits").session)
    host.swap(*digits.args(V2))
    host.swap(*digits.args(V1))  # a fresh v1 session: the first is released
    assert v1() is None
    assert host.previous_version("digits") == V2


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="malloc_trim is a glibc function",
)
def test_malloc_trim_is_found_on_glibc() -> None:
    trim = find_malloc_trim()
    assert trim is not None
    trim()


def test_in_flight_request_finishes_on_the_model_it_started_on(
    digits: Sample,
    split: tuple[np.ndarray, np.ndarray],
    references: dict[str, Any],
    pool: ThreadPoolExecutor,
) -> None:
    x, _ = split
    gate = Gate()
    host = ModelHost(SETTINGS)
    name, version, path, manifest = digits.args(V1)
    host.load(name, version, path, manifest, session=GatedSession(create_session(path), gate))
    gate.armed = True
    pending = pool.submit(host.predict, "digits", {"input": x[:9]})
    assert gate.entered.wait(WAIT_S)

    # The swap neither waits for nor disturbs the request blocked on v1.
    assert host.swap(*digits.args(V2)).mode == "side_by_side"
    assert not pending.done()
    during = host.predict("digits", {"input": x[:9]})
    assert during.version == V2
    np.testing.assert_array_equal(
        during.outputs["probabilities"], reference_outputs(references[V2], x[:9])["probabilities"]
    )

    gate.opened.set()
    finished = pending.result(WAIT_S)
    assert finished.version == V1
    for name_, value in reference_outputs(references[V1], x[:9]).items():
        np.testing.assert_array_equal(finished.outputs[name_], value)


class GatedInputs(Mapping[str, np.ndarray]):
    """Request inputs that wait at a gate the first time they are read.

    The host reads the inputs after it pinned the model and before it runs it,
    so this holds a request between "pinned" and "running".
    """

    def __init__(self, inputs: dict[str, np.ndarray], gate: Gate) -> None:
        self._inputs = inputs
        self._gate = gate

    def __getitem__(self, key: str) -> np.ndarray:
        return self._inputs[key]

    def __len__(self) -> int:
        return len(self._inputs)

    def __iter__(self) -> Iterator[str]:
        if self._gate.armed and not self._gate.entered.is_set():
            self._gate.entered.set()
            if not self._gate.opened.wait(WAIT_S):
                raise TimeoutError("the test never opened the gate")
        return iter(self._inputs)


def test_a_request_runs_on_the_model_it_pinned_not_on_a_later_one(
    digits: Sample,
    split: tuple[np.ndarray, np.ndarray],
    references: dict[str, Any],
    pool: ThreadPoolExecutor,
) -> None:
    """The reference is read once, at the start: a swap before ``run`` changes nothing."""
    x, _ = split
    gate = Gate()
    gate.armed = True
    host = ModelHost(SETTINGS)
    host.load(*digits.args(V1))
    pending = pool.submit(host.predict, "digits", GatedInputs({"input": x[:6]}, gate))
    assert gate.entered.wait(WAIT_S)
    assert host.in_flight("digits") == 1
    host.swap(*digits.args(V2))
    gate.opened.set()
    finished = pending.result(WAIT_S)
    assert finished.version == V1
    for name, value in reference_outputs(references[V1], x[:6]).items():
        np.testing.assert_array_equal(finished.outputs[name], value)


# --------------------------------------------------------------------------- unload-then-load


def test_unload_then_load_when_both_do_not_fit(
    digits: Sample, split: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = split
    host = ModelHost(SETTINGS, memory_available=lambda: 1024)
    host.load(*digits.args(V1))
    result = host.swap(*digits.args(V2))
    assert result.mode == "unload_then_load"
    assert result.gap_ms > 0
    assert result.gap_ms >= result.load_ms + result.warm_ms
    assert "do not fit" in result.detail
    assert host_accuracy(host, x, y)[0] == V2
    assert host.previous_version("digits") is None
    with pytest.raises(NoPreviousModelError):
        host.revert("digits")


def test_requests_in_the_gap_fail_fast_and_in_flight_ones_drain(
    digits: Sample, split: tuple[np.ndarray, np.ndarray], pool: ThreadPoolExecutor
) -> None:
    x, _ = split
    gate = Gate()
    host = ModelHost(SETTINGS, memory_available=lambda: 1024)
    name, version, path, manifest = digits.args(V1)
    host.load(name, version, path, manifest, session=GatedSession(create_session(path), gate))
    v1 = weakref.ref(host.model("digits").session)
    gate.armed = True
    pending = pool.submit(host.predict, "digits", {"input": x[:4]})
    assert gate.entered.wait(WAIT_S)

    swapping = pool.submit(host.swap, *digits.args(V2))
    wait_until(lambda: not host.is_ready("digits"), "the swap to take the model out of service")
    start = time.monotonic()
    with pytest.raises(ModelUnavailableError, match="unload-then-load"):
        host.predict("digits", {"input": x[:4]})
    assert time.monotonic() - start < 1.0, "a request in the gap must not wait"
    assert not swapping.done(), "the swap must wait for the request in flight"
    assert v1() is not None

    gate.opened.set()
    assert pending.result(WAIT_S).version == V1
    result = swapping.result(WAIT_S)
    assert result.mode == "unload_then_load" and result.gap_ms > 0
    assert host.predict("digits", {"input": x[:4]}).version == V2
    del pending
    assert v1() is None, "the old session must be released before the new one loads"


def test_failed_unload_then_load_restores_the_old_version(
    digits: Sample, split: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, _ = split
    host = ModelHost(SETTINGS, memory_available=lambda: 16)  # less than any file x 3
    host.load(*digits.args(V1))
    corrupt = tmp_path / "model.onnx"
    corrupt.write_bytes(b"not an onnx model at all")
    _, _, _, manifest = digits.args(V2)
    with pytest.raises(ActivationError, match="loaded again"):
        host.swap("digits", V2, corrupt, manifest)
    assert host.is_ready("digits")
    assert host.predict("digits", {"input": x[:2]}).version == V1


def test_failed_side_by_side_swap_keeps_serving(
    digits: Sample, split: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, _ = split
    host = ModelHost(SETTINGS)
    host.load(*digits.args(V1))
    tiny = tiny_model(tmp_path / "log.onnx", "Log")
    _, _, _, manifest = digits.args(V2)
    with pytest.raises(ActivationError, match="inputs"):
        host.swap("digits", V2, tiny, manifest)  # the digits manifest does not fit this model
    assert host.predict("digits", {"input": x[:2]}).version == V1
    assert host.previous_version("digits") is None


def test_load_errors(digits: Sample, tmp_path: Path) -> None:
    host = ModelHost(SETTINGS)
    corrupt = tmp_path / "model.onnx"
    corrupt.write_bytes(b"\x00" * 64)
    _, _, _, manifest = digits.args(V1)
    with pytest.raises(ActivationError) as info:
        host.load("digits", V1, corrupt, manifest)
    assert isinstance(info.value, EdgeotaError)
    assert host.models() == ()
    host.load(*digits.args(V1))
    with pytest.raises(RuntimeError, match="already hosted"):
        host.load(*digits.args(V1))
    with pytest.raises(UnknownModelError):
        host.swap("other", V2, corrupt, manifest)


# --------------------------------------------------------------------------- zero downtime


def test_zero_downtime_through_five_swaps(
    digits: Sample, split: tuple[np.ndarray, np.ndarray], references: dict[str, Any]
) -> None:
    """4 closed-loop clients, 5 swaps v1<->v2: no failure, every answer from its version."""
    x, _ = split
    host = ModelHost(SETTINGS)
    host.load(*digits.args(V1))
    done = threading.Event()
    served = threading.Condition()
    counts: dict[str, int] = {V1: 0, V2: 0}
    records: list[list[tuple[str, int, int, Mapping[str, np.ndarray]]]] = [[] for _ in range(4)]
    failures: list[BaseException] = []

    def client(index: int) -> None:
        rng = np.random.default_rng(index)
        log = records[index]
        while not done.is_set():
            start = int(rng.integers(0, len(x) - 8))
            rows = int(rng.integers(1, 9))
            try:
                p = host.predict("digits", {"input": x[start : start + rows]})
            except BaseException as e:  # any failure is the finding
                failures.append(e)
                return
            log.append((p.version, start, rows, p.outputs))
            with served:
                counts[p.version] += 1
                served.notify_all()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    try:
        version = V1
        for _ in range(5):
            with served:
                seen = counts[version]
                assert served.wait_for(lambda v=version, s=seen: counts[v] >= s + PER_PHASE, WAIT_S)
            version = V2 if version == V1 else V1
            assert host.swap(*digits.args(version)).mode == "side_by_side"
        with served:
            seen = counts[version]
            assert served.wait_for(lambda: counts[version] >= seen + PER_PHASE, WAIT_S)
    finally:
        done.set()
        for t in threads:
            t.join(WAIT_S)
    assert not failures, failures[:3]
    assert not any(t.is_alive() for t in threads)
    total = 0
    for log in records:
        for version_, start, rows, outputs in log:
            expected = reference_outputs(references[version_], x[start : start + rows])
            for name, value in expected.items():
                np.testing.assert_array_equal(outputs[name], value)
            total += 1
    assert total >= 6 * PER_PHASE
    assert host.current_version("digits") == V2
    assert host.in_flight("digits") == 0


# --------------------------------------------------------------------------- inputs and metrics


def tiny_model(path: Path, op: str, *, reshape_to: list[int] | None = None) -> Path:
    """A float graph x [N, 4] -> y: ``Log`` (NaN for negatives) or ``Reshape`` to a fixed shape."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    initializers = []
    if op == "Reshape":
        assert reshape_to is not None
        initializers.append(numpy_helper.from_array(np.array(reshape_to, np.int64), "shape"))
        node = helper.make_node("Reshape", ["x", "shape"], ["y"])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, reshape_to)
    else:
        node = helper.make_node(op, ["x"], ["y"])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    graph = helper.make_graph([node], "tiny", [x], [y], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_invalid_inputs_are_refused_with_a_reason(
    digits: Sample, split: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = split
    host = ModelHost(SETTINGS)
    host.load(*digits.args(V1))
    cases: list[tuple[Any, str]] = [
        ({"input": x[:2], "extra": x[:2]}, "unknown input 'extra'"),
        ({}, "missing input 'input'"),
        ({"input": x[:2].astype(np.float64)}, "is FP64, the model takes FP32"),
        ({"input": x[0]}, r"has shape \[64\], the model takes \[\?, 64\]"),
        ({"input": x[:2, :63]}, r"has shape \[2, 63\]"),
        ({"input": x[:2].tolist()}, "not a numpy array"),
    ]
    for inputs, message in cases:
        with pytest.raises(InvalidInputError, match=message) as info:
            host.predict("digits", inputs)
        assert isinstance(info.value, EdgeotaError)
    with pytest.raises(InvalidInputError, match="no output"):
        host.predict("digits", {"input": x[:2]}, outputs=["nope"])
    with pytest.raises(UnknownModelError):
        host.predict("nope", {"input": x[:2]})
    with pytest.raises(UnknownModelError, match="not served"):
        host.predict("digits", {"input": x[:2]}, version=V2)
    assert host.predict("digits", {"input": x[:2]}, version=V1).version == V1
    metrics = host.metrics("digits", V1)
    assert metrics.rejected == len(cases) + 1
    assert (metrics.inferences, metrics.errors) == (1, 0)


def test_metrics_count_runs_errors_and_non_finite_outputs(tmp_path: Path) -> None:
    host = ModelHost(SETTINGS, latency_window=8)
    log = tiny_model(tmp_path / "log.onnx", "Log")
    host.load("log", "1.0.0", log, build_manifest(log, name="log", version="1.0.0", hardware=["x"]))
    reshape = tiny_model(tmp_path / "reshape.onnx", "Reshape", reshape_to=[2, 2])
    host.load(
        "reshape",
        "1.0.0",
        reshape,
        build_manifest(reshape, name="reshape", version="1.0.0", hardware=["x"]),
    )
    empty = host.metrics("log", "1.0.0")
    assert (empty.inferences, empty.window, empty.latency_p99_ms) == (0, 0, None)
    assert empty.error_rate == 0.0

    positive = np.ones((3, 4), np.float32)
    for _ in range(20):
        host.predict("log", {"x": positive})
    nan = host.predict("log", {"x": -positive})
    assert np.isnan(nan.outputs["y"]).all()
    metrics = host.metrics("log", "1.0.0")
    assert (metrics.inferences, metrics.errors, metrics.non_finite) == (21, 0, 1)
    assert metrics.window == 8
    assert metrics.latency_p50_ms is not None and metrics.latency_p99_ms is not None
    assert 0 < metrics.latency_p50_ms <= metrics.latency_p95_ms <= metrics.latency_p99_ms

    host.predict("reshape", {"x": np.ones((1, 4), np.float32)})
    with pytest.raises(InferenceError, match="reshape"):
        host.predict("reshape", {"x": np.ones((2, 4), np.float32)})
    failing = host.metrics("reshape", "1.0.0")
    assert (failing.inferences, failing.errors) == (1, 1)
    assert failing.error_rate == 0.5

    host.reset_metrics("log", "1.0.0")
    assert host.metrics("log", "1.0.0").inferences == 0
    with pytest.raises(UnknownModelError):
        host.metrics("log", "9.9.9")


def test_a_swap_starts_fresh_metrics_for_the_new_version(
    digits: Sample, split: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = split
    host = ModelHost(SETTINGS)
    host.load(*digits.args(V1))
    for _ in range(3):
        host.predict("digits", {"input": x[:2]})
    host.swap(*digits.args(V2))
    host.predict("digits", {"input": x[:2]})
    assert host.metrics("digits", V1).inferences == 3
    assert host.metrics("digits", V2).inferences == 1


def test_predict_runs_concurrently_without_a_lock_around_run(
    digits: Sample, split: tuple[np.ndarray, np.ndarray], pool: ThreadPoolExecutor
) -> None:
    """Two requests can be inside ``session.run`` at once (the lock is not held around it)."""
    x, _ = split
    gate = Gate()
    host = ModelHost(SETTINGS)
    name, version, path, manifest = digits.args(V1)
    host.load(name, version, path, manifest, session=GatedSession(create_session(path), gate))
    gate.armed = True
    first: Future[Any] = pool.submit(host.predict, "digits", {"input": x[:1]})
    second: Future[Any] = pool.submit(host.predict, "digits", {"input": x[1:2]})
    wait_until(lambda: host.in_flight("digits") == 2, "both requests to be in flight")
    assert host.is_ready("digits") and host.current_version("digits") == V1
    gate.opened.set()
    assert first.result(WAIT_S).version == second.result(WAIT_S).version == V1


# --------------------------------------------------------------------------- external data

EXTERNAL_MIB = 64
EXTERNAL_WIDTH = 256

#: Run in a fresh interpreter, so the figures are this load's alone (no other
#: sessions, no pytest allocations). Prints what /proc says about the mapping.
_MAPPED_LOAD_PROBE = """
import json, sys
from pathlib import Path
import numpy as np
from edgeota.agent.model_host import ModelHost
from edgeota.runtime.validation import SessionSettings
from edgeota.server.manifest_builder import build_manifest

model, weights, feed_name = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

def rss_anon():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")

manifest = build_manifest(model, name="big", version="1.0.0", hardware=["x"])
host = ModelHost(SessionSettings())
before = rss_anon()
host.load("big", "1.0.0", model, manifest)
feed = np.array([0, 7, 4095], np.int64) if feed_name == "idx" else np.ones((1, 256), np.float32)
out = host.predict("big", {feed_name: feed}).outputs["y"]
after = rss_anon()
maps = [ln.split() for ln in Path("/proc/self/maps").read_text().splitlines()]
mapped = sum(
    int(r.split("-")[1], 16) - int(r.split("-")[0], 16)
    for r, *_rest in maps if _rest[-1:] == [weights]
)
print(json.dumps({"anon_growth": after - before, "mapped": mapped, "out": out.tolist()}))
"""


def external_data_model(directory: Path, op: str) -> tuple[Path, np.ndarray]:
    """A model whose one initializer (64 MiB of float32) lives in ``weights.bin`` beside it.

    ``Gather`` reads rows of it as an embedding table would; ``MatMul`` multiplies by it, as
    a dense layer does (a kernel that prepacks its weights).
    """
    rows = EXTERNAL_MIB * 2**20 // (4 * EXTERNAL_WIDTH)
    rng = np.random.default_rng(5)
    if op == "Gather":
        table = rng.standard_normal((rows, EXTERNAL_WIDTH), dtype=np.float32)
        x = helper.make_tensor_value_info("idx", TensorProto.INT64, [None])
        node = helper.make_node("Gather", ["table", "idx"], ["y"])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, EXTERNAL_WIDTH])
    else:
        table = rng.standard_normal((EXTERNAL_WIDTH, rows), dtype=np.float32)
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, EXTERNAL_WIDTH])
        node = helper.make_node("MatMul", ["x", "table"], ["y"])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, rows])
    graph = helper.make_graph(
        [node], "big", [x], [y], initializer=[numpy_helper.from_array(table, "table")]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = directory / "model.onnx"
    onnx.save_model(
        model, path, save_as_external_data=True, location="weights.bin", size_threshold=1024
    )
    assert (directory / "weights.bin").stat().st_size == EXTERNAL_MIB * 2**20
    assert path.stat().st_size < 4096, "the initializer must be external, not inline"
    return path, table


def load_in_child(model: Path, feed_name: str) -> dict[str, Any]:
    """Load ``model`` through a ModelHost in a fresh interpreter; what /proc said there."""
    weights = str((model.parent / "weights.bin").resolve())
    done = subprocess.run(
        [sys.executable, "-c", _MAPPED_LOAD_PROBE, str(model), weights, feed_name],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


needs_proc = pytest.mark.skipif(
    not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps and /proc/self/status"
)


@needs_proc
def test_large_external_data_is_memory_mapped_not_copied(tmp_path: Path) -> None:
    """Loading from the path lets onnxruntime map ``weights.bin``: no anonymous copy of it.

    The file's pages are then the page cache's: clean, so the kernel can drop them under
    pressure, and shared by the two sessions of a side-by-side swap of the same file.
    Anonymous memory (``RssAnon``) is what a copy would cost; it must stay far below
    the file's size.
    """
    model, table = external_data_model(tmp_path, "Gather")
    seen = load_in_child(model, "idx")
    assert seen["mapped"] >= EXTERNAL_MIB * 2**20, "weights.bin is not mapped"
    assert seen["anon_growth"] < EXTERNAL_MIB * 2**20 // 4, seen["anon_growth"]
    np.testing.assert_array_equal(np.asarray(seen["out"], np.float32), table[[0, 7, 4095]])


@needs_proc
def test_prepacked_external_weights_stay_memory_mapped(tmp_path: Path) -> None:
    """MatMul prepacks its weights into anonymous memory unless told not to (the host does
    for models with external data): the mapping must survive."""
    model, table = external_data_model(tmp_path, "MatMul")
    seen = load_in_child(model, "x")
    np.testing.assert_allclose(
        np.asarray(seen["out"], np.float32),
        np.ones((1, EXTERNAL_WIDTH), np.float32) @ table,
        rtol=1e-4,
        atol=1e-3,
    )
    assert seen["mapped"] >= EXTERNAL_MIB * 2**20, "weights.bin is not mapped"
    assert seen["anon_growth"] < EXTERNAL_MIB * 2**20 // 4, seen["anon_growth"]
