"""The validation gate: may this ONNX model go live on this device?

A model that arrived intact (signatures, hashes and AEAD tags all verified) can
still be wrong for the device: too big for its memory, built against another
I/O signature, computing something else than the publisher's runtime did, less
accurate than the release floor, or too slow. ``validate_model`` runs these
checks, in this order, cheapest and most fundamental first, and stops at the
first failure:

1. ``memory``: is there room to load it (file sizes x :data:`MEMORY_FACTOR`)?
2. ``load``: does onnxruntime load it with the production session options?
3. ``io_signature``: do the session's inputs and outputs match the manifest?
4. ``vectors``: does it reproduce the validation vectors, with finite outputs?
5. ``golden_accuracy``: does it reach the accuracy floor on the golden set?
6. ``latency``: is the p95 of single-row inferences within the budget?

The same code runs on the device (before a hot swap) and on the server (before
a release is published), so both judge a model by one rule; that is why it lives
in ``edgeota.runtime``, below both. It is part of the small device install: it
imports onnxruntime, numpy, ``edgeota.protocol`` and
:mod:`edgeota.runtime.model_signature` only, never ``onnx``, scikit-learn,
server or agent code.

It is also the one place inference sessions are created (:func:`create_session`),
so the model host serves with exactly the options the gate validated with.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgeota.protocol.errors import EdgeotaError
from edgeota.protocol.files import drop_cached_pages
from edgeota.protocol.manifest import Manifest, Tensor, TensorSpec
from edgeota.runtime.model_signature import UnsupportedTensorError, tensor_spec

__all__ = [
    "CHECK_NAMES",
    "DEFAULT_SETTINGS",
    "LATENCY_WARMUP_RUNS",
    "MEMORY_FACTOR",
    "NUMPY_TYPES",
    "CheckResult",
    "IncompatibleSignatureError",
    "SessionLoadError",
    "SessionSettings",
    "ValidatedSession",
    "ValidationError",
    "ValidationReason",
    "ValidationReport",
    "check_compatible",
    "check_memory",
    "create_session",
    "estimate_memory_need",
    "load_validated",
    "numpy_to_datatype",
    "read_mem_available",
    "tensor_to_numpy",
    "validate_model",
]

#: Peak memory to load a model, as a multiple of its file sizes. onnxruntime holds
#: the parsed protobuf while it builds the session, copies the initializers into
#: its own buffers and lets graph optimisations (constant folding, layout changes)
#: make transient copies; a factor of 3 is a conservative rule of thumb that keeps
#: a device from being pushed into the OOM killer mid-swap. It errs on the side of
#: refusing, because an OOM-killed agent is worse than a postponed update.
MEMORY_FACTOR = 3

#: Untimed runs before the latency is measured: the first runs pay for lazy
#: allocations and cold caches that the service never sees again.
LATENCY_WARMUP_RUNS = 3

#: The checks of :func:`validate_model`, in the order they run.
CHECK_NAMES = ("memory", "load", "io_signature", "vectors", "golden_accuracy", "latency")

_MEMINFO = Path("/proc/meminfo")
_NOT_CONFIGURED = "not configured"

# Open Inference Protocol v2 datatypes <-> numpy dtypes. BYTES travels as Python
# str objects, which is what onnxruntime takes and returns for tensor(string).
NUMPY_TYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_DATATYPES_BY_DTYPE = {dtype: name for name, dtype in NUMPY_TYPES.items()}


_OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


# --------------------------------------------------------------------------- sessions


@dataclass(frozen=True)
class SessionSettings:
    """How inference sessions are built on a device.

    The defaults are the production settings of a Pi-class device: one thread per
    session (the agent may host several models, and the application shares the
    cores) and no spin-waiting, so an idle device burns no CPU between requests.
    A thread count of 0 lets onnxruntime pick (one per core).
    """

    intra_op_threads: int = 1
    inter_op_threads: int = 1
    allow_spinning: bool = False
    graph_optimization: str = "all"  # one of: disable, basic, extended, all

    def __post_init__(self) -> None:
        for name in ("intra_op_threads", "inter_op_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, not {value!r}")
        if self.graph_optimization not in _OPTIMIZATION_LEVELS:
            raise ValueError(
                f"graph_optimization {self.graph_optimization!r} is not one of "
                f"{', '.join(_OPTIMIZATION_LEVELS)}"
            )

    def to_session_options(self) -> ort.SessionOptions:
        """Fresh onnxruntime options (they are mutable, so never shared between sessions)."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = self.inter_op_threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = _OPTIMIZATION_LEVELS[self.graph_optimization]
        spinning = "1" if self.allow_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
        # Errors only: warnings (e.g. an unused initializer dropped) are not the
        # device operator's concern, and a fleet would print them per device.
        options.log_severity_level = 3
        return options


#: The production settings; a module constant so it can be a default argument.
DEFAULT_SETTINGS = SessionSettings()


class SessionLoadError(EdgeotaError):
    """onnxruntime could not load the model (missing file, corrupt bytes, unknown operator)."""


def create_session(
    model_path: Path, settings: SessionSettings = DEFAULT_SETTINGS, *,
    external_data: bool = False,
) -> ort.InferenceSession:
    """Load ``model_path`` on the CPU with ``settings``: the one place sessions are made.

    Loading from the path (not from bytes) lets onnxruntime find external-data
    files next to the model and memory-map them. For a model with
    ``external_data`` prepacking is turned off: MatMul, Gemm and Conv kernels
    otherwise copy their weights into anonymous memory and drop the mapping
    (measured: +64 MiB resident for a 64 MiB weight file, against 0.4 MiB
    with the mapping kept), which defeats the point of shipping large weights
    apart on a small device; those kernels run somewhat slower unpacked
    (34 % on one 256 x 16384 MatMul). Any onnxruntime failure becomes a
    :class:`SessionLoadError`, so callers handle one typed error.
    """
    options = settings.to_session_options()
    if external_data:
        options.add_session_config_entry("session.disable_prepacking", "1")
    try:
        session = ort.InferenceSession(
            str(model_path),
            sess_options=options,
            providers=["CPUExecutionProvider"],
        )
    except Exception as e:  # onnxruntime's errors derive from Exception only
        raise SessionLoadError(f"onnxruntime cannot load {model_path}: {e}") from e
    if not external_data:
        # The session holds its own copy of the weights now; the file's page
        # cache would be a second one (external data stays: it is mapped).
        drop_cached_pages(model_path)
    return session


# --------------------------------------------------------------------------- tensors


def tensor_to_numpy(t: Tensor) -> np.ndarray:
    """An OIP v2 tensor as a numpy array of its datatype and shape."""
    try:
        dtype = NUMPY_TYPES[t.datatype]
    except KeyError as e:
        raise ValueError(f"tensor {t.name!r}: unknown datatype {t.datatype!r}") from e
    return np.array(t.data, dtype=dtype).reshape(t.shape)


def numpy_to_datatype(arr: np.ndarray) -> str:
    """The OIP v2 datatype of a numpy array (numpy strings and objects are ``BYTES``)."""
    if arr.dtype.kind in "OUS":
        return "BYTES"
    try:
        return _DATATYPES_BY_DTYPE[arr.dtype]
    except KeyError as e:
        raise ValueError(f"numpy dtype {arr.dtype} has no OIP v2 datatype") from e


# --------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class CheckResult:
    """One check of the gate: its name, whether it passed, and what was measured."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class ValidationReport:
    """The checks run so far, with the measured accuracy and latency when there were any."""

    checks: tuple[CheckResult, ...]
    accuracy: float | None
    latency_p95_ms: float | None

    @property
    def ok(self) -> bool:
        """Every check passed. Fails closed: a report with no checks is not a pass."""
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def failed(self) -> CheckResult | None:
        """The first failed check, or ``None``."""
        return next((c for c in self.checks if not c.ok), None)


class ValidationReason(StrEnum):
    """Why a model was refused: stable codes for the journal, status reports and metrics."""

    LOAD_FAILED = "load_failed"
    IO_MISMATCH = "io_mismatch"
    VECTORS_MISMATCH = "vectors_mismatch"
    ACCURACY_BELOW_FLOOR = "accuracy_below_floor"
    LATENCY_OVER_BUDGET = "latency_over_budget"
    MEMORY_INSUFFICIENT = "memory_insufficient"
    NAN_OUTPUT = "nan_output"


class ValidationError(EdgeotaError):
    """A model failed the gate. ``reason`` is a stable code, ``report`` the checks done so far.

    The message is the failing check's detail: it names the check, what was
    measured and the threshold, so an operator can act on it without the report.
    """

    def __init__(
        self, reason: ValidationReason | str, message: str, report: ValidationReport
    ) -> None:
        super().__init__(message)
        self.reason = ValidationReason(reason)
        self.report = report


class IncompatibleSignatureError(EdgeotaError):
    """A new release of a model no longer accepts or produces what its previous release did."""


# --------------------------------------------------------------------------- memory


def read_mem_available() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes, or ``None`` where there is none.

    MemAvailable (not MemFree) counts the page cache the kernel can drop, which is
    what a new allocation can really get. ``None`` on non-Linux systems and on
    kernels older than 3.14, where the check then reports "not measured".
    """
    try:
        text = _MEMINFO.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                unit = 1024 if len(fields) < 3 or fields[2] == "kB" else 1
                return int(fields[1]) * unit
    return None


def estimate_memory_need(model_path: Path, manifest: Manifest) -> int:
    """Bytes needed to load the model: file sizes x :data:`MEMORY_FACTOR`.

    The model's size is read from disk (it is what will be loaded; the manifest's
    size if the file is missing, so the load check reports that). External-data
    sizes come from the manifest, where they were pinned and checked against the
    bytes when the bundle was opened.
    """
    try:
        model_size = model_path.stat().st_size
    except OSError:
        model_size = manifest.model.size
    return (model_size + sum(f.size for f in manifest.external_data)) * MEMORY_FACTOR


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def check_memory(
    model_path: Path,
    manifest: Manifest,
    memory_available: Callable[[], int] | None = None,
) -> CheckResult:
    """The memory check on its own, for a caller that must decide *before* loading.

    The model host uses it to choose between a side-by-side swap and
    unload-then-load; :func:`validate_model` runs it as its first check.
    """
    need = estimate_memory_need(model_path, manifest)
    available = memory_available() if memory_available is not None else read_mem_available()
    if available is None:
        return CheckResult("memory", True, "not measured: no MemAvailable on this system")
    files = f"{MEMORY_FACTOR} x {_format_bytes(need // MEMORY_FACTOR)} of model files"
    if need > available:
        return CheckResult(
            "memory",
            False,
            f"memory: needs {_format_bytes(need)} ({files}) but only "
            f"{_format_bytes(available)} is available",
        )
    return CheckResult(
        "memory",
        True,
        f"memory: needs {_format_bytes(need)} ({files}), {_format_bytes(available)} available",
    )


# --------------------------------------------------------------------------- I/O


def _session_spec(node: ort.NodeArg) -> TensorSpec | str:
    """A NodeArg as a TensorSpec, or a description of why it cannot be one."""
    try:
        return tensor_spec(node)
    except UnsupportedTensorError as e:
        return str(e)


def _shape_text(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _compare_specs(
    kind: str, declared: Sequence[TensorSpec], nodes: Sequence[ort.NodeArg]
) -> list[str]:
    problems: list[str] = []
    actual: dict[str, TensorSpec] = {}
    for node in nodes:
        spec = _session_spec(node)
        if isinstance(spec, str):
            problems.append(f"{kind} {spec}")
        else:
            actual[spec.name] = spec
    wanted = {s.name: s for s in declared}
    names_seen = {n.name for n in nodes}
    for name in wanted.keys() - names_seen:
        problems.append(f"{kind} {name!r} is in the manifest but not in the model")
    for name in names_seen - wanted.keys():
        problems.append(f"{kind} {name!r} is in the model but not in the manifest")
    for name, want in wanted.items():
        got = actual.get(name)
        if got is None:
            continue
        if got.datatype != want.datatype:
            problems.append(
                f"{kind} {name!r}: datatype {want.datatype} in the manifest, "
                f"{got.datatype} in the model"
            )
        if got.shape != want.shape:
            problems.append(
                f"{kind} {name!r}: shape {_shape_text(want.shape)} in the manifest, "
                f"{_shape_text(got.shape)} in the model"
            )
    return sorted(problems)


def _check_io(session: ort.InferenceSession, manifest: Manifest) -> CheckResult:
    problems = _compare_specs("input", manifest.inputs, session.get_inputs())
    problems += _compare_specs("output", manifest.outputs, session.get_outputs())
    if problems:
        return CheckResult("io_signature", False, "I/O signature: " + "; ".join(problems))
    names = ", ".join(s.name for s in (*manifest.inputs, *manifest.outputs))
    return CheckResult("io_signature", True, f"I/O signature matches the manifest ({names})")


# --------------------------------------------------------------------------- running


def _batched(spec: TensorSpec) -> bool:
    """Whether axis 0 of this input is a row axis that may be sliced into single rows."""
    return bool(spec.shape) and spec.shape[0] in (None, 1)


def _fits(spec: TensorSpec, shape: tuple[int, ...]) -> bool:
    """Whether data of ``shape`` can be fed, at once or row by row (batch-1 models)."""
    if spec.accepts(shape):
        return True
    return _batched(spec) and len(shape) >= 1 and spec.accepts((1, *shape[1:]))


def _feeds(
    tensors: Sequence[Tensor], specs: Sequence[TensorSpec], what: str
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Numpy feeds for ``tensors``, and the reasons they do not fit the model's inputs."""
    by_name = {s.name: s for s in specs}
    problems: list[str] = []
    given = {t.name for t in tensors}
    problems += [f"{what} lack input {n!r}" for n in sorted(by_name.keys() - given)]
    problems += [
        f"{what} give input {n!r}, which the model lacks" for n in sorted(given - by_name.keys())
    ]
    feeds: dict[str, np.ndarray] = {}
    for t in tensors:
        spec = by_name.get(t.name)
        if spec is None:
            continue
        if t.datatype != spec.datatype:
            problems.append(
                f"{what} input {t.name!r} is {t.datatype}, the model takes {spec.datatype}"
            )
        elif not _fits(spec, t.shape):
            problems.append(
                f"{what} input {t.name!r} has shape {_shape_text(t.shape)}, "
                f"the model takes {_shape_text(spec.shape)}"
            )
        else:
            feeds[t.name] = tensor_to_numpy(t)
    return feeds, problems


def _run(
    session: ort.InferenceSession, specs: Sequence[TensorSpec], feeds: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Run all outputs; row by row when a batch-1 model is given several rows."""
    names = [o.name for o in session.get_outputs()]
    by_name = {s.name: s for s in specs}
    if all(by_name[n].accepts(a.shape) for n, a in feeds.items()):
        return dict(zip(names, session.run(names, dict(feeds)), strict=True))
    rows = max(a.shape[0] for n, a in feeds.items() if _batched(by_name[n]) and a.ndim)
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for i in range(rows):
        row = {n: a[i : i + 1] if _batched(by_name[n]) and a.ndim else a for n, a in feeds.items()}
        for part, value in zip(parts, session.run(names, row), strict=True):
            part.append(np.asarray(value))
    return {
        n: np.concatenate(p) if p[0].ndim else np.stack(p)
        for n, p in zip(names, parts, strict=True)
    }


def _non_finite(outputs: Mapping[str, np.ndarray]) -> str | None:
    """A description of the first float output holding NaN or Inf, if any does."""
    for name, value in outputs.items():
        arr = np.asarray(value)
        if arr.dtype.kind != "f":
            continue
        bad = ~np.isfinite(arr)
        if bad.any():
            nans = int(np.isnan(arr).sum())
            infs = int(bad.sum()) - nans
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            return (
                f"output {name!r} holds non-finite values ({nans} NaN, {infs} Inf of "
                f"{arr.size}; first at {list(where)}: {_scalar_text(arr[where])})"
            )
    return None


def _scalar_text(value: object) -> str:
    """A numpy scalar as plain text: ``0.00788955`` rather than ``np.float32(0.007889546)``."""
    item = value.item() if isinstance(value, np.generic) else value
    return f"{item:.6g}" if isinstance(item, float) else repr(item)


def _compare_output(expected: Tensor, actual: np.ndarray, atol: float, rtol: float) -> str | None:
    """Why ``actual`` does not reproduce ``expected``, or ``None`` if it does."""
    name = expected.name
    got_type = numpy_to_datatype(actual)
    if got_type != expected.datatype:
        return f"{name!r} is {got_type}, the vectors expect {expected.datatype}"
    if tuple(actual.shape) != expected.shape:
        return (
            f"{name!r} has shape {_shape_text(actual.shape)}, "
            f"the vectors expect {_shape_text(expected.shape)}"
        )
    want = tensor_to_numpy(expected)
    if actual.dtype.kind == "f":
        a = actual.astype(np.float64)
        e = want.astype(np.float64)
        excess = np.abs(a - e) - (atol + rtol * np.abs(e))
        bad = excess > 0
        rule = f"atol={atol:g} rtol={rtol:g}"
    elif actual.dtype.kind in "iub":
        a = actual.astype(np.float64)  # only to rank the differences
        e = want.astype(np.float64)
        bad = actual != want
        excess = np.abs(a - e)
        rule = "exact match for integers"
    else:
        bad = np.asarray(actual != want, dtype=bool)
        excess = bad.astype(np.float64)
        rule = "exact match"
    count = int(bad.sum())
    if not count:
        return None
    worst = np.unravel_index(int(np.argmax(np.where(bad, excess, -np.inf))), actual.shape)
    return (
        f"{name!r}: {count} of {actual.size} elements differ ({rule}); worst at "
        f"{[int(i) for i in worst]}: got {_scalar_text(actual[worst])}, "
        f"expected {_scalar_text(want[worst])}"
    )


def _predictions(outputs: Mapping[str, np.ndarray], label_output: str, rows: int) -> np.ndarray:
    """Class labels from an integer label output or by argmax over float scores."""
    arr = np.asarray(outputs[label_output])
    if arr.dtype.kind in "iub" and arr.size == rows:
        return arr.reshape(rows)
    if arr.dtype.kind == "f" and arr.ndim >= 2 and arr.shape[0] == rows:
        # numpy types argmax with an axis as Any (a scalar for 1-D input); over
        # axis 1 of this 2-D array it is an array of one label per row.
        labels: np.ndarray = np.argmax(arr.reshape(rows, -1), axis=1)
        return labels
    raise ValueError(
        f"cannot read labels for {rows} rows from output {label_output!r} "
        f"({numpy_to_datatype(arr)} {_shape_text(arr.shape)}): need integer labels [N] "
        "or float scores [N, classes]"
    )


# --------------------------------------------------------------------------- the gate


class _Gate:
    """Accumulates check results; ``fail`` raises with the report of checks done so far."""

    def __init__(self) -> None:
        self.checks: list[CheckResult] = []
        self.accuracy: float | None = None
        self.latency_p95_ms: float | None = None

    def report(self) -> ValidationReport:
        return ValidationReport(tuple(self.checks), self.accuracy, self.latency_p95_ms)

    def passed(self, name: str, detail: str) -> None:
        self.checks.append(CheckResult(name, True, detail))

    def fail(self, name: str, reason: ValidationReason, detail: str) -> ValidationError:
        self.checks.append(CheckResult(name, False, detail))
        return ValidationError(reason, detail, self.report())


@dataclass(frozen=True)
class ValidatedSession:
    """A session that passed the gate, with the gate's report.

    The agent swaps in this very session: loading the model a second time for
    serving would cost another parse of the file and could, in principle,
    serve something other than what was checked.
    """

    report: ValidationReport
    session: ort.InferenceSession = field(repr=False, compare=False)


def load_validated(
    model_path: Path,
    manifest: Manifest,
    *,
    settings: SessionSettings = DEFAULT_SETTINGS,
    memory_available: Callable[[], int] | None = None,
    latency_runs: int = 50,
) -> ValidatedSession:
    """:func:`validate_model` on a session it loads with ``settings``, handed back on success."""
    return ValidatedSession(*_run_gate(model_path, manifest, settings, memory_available,
                                       latency_runs, None))


def validate_model(
    model_path: Path,
    manifest: Manifest,
    *,
    settings: SessionSettings = DEFAULT_SETTINGS,
    memory_available: Callable[[], int] | None = None,
    latency_runs: int = 50,
    session: ort.InferenceSession | None = None,
) -> ValidationReport:
    """Run the gate on ``model_path`` against ``manifest``; raise at the first failure.

    ``memory_available`` returns free bytes (default: ``MemAvailable`` of
    ``/proc/meminfo``). ``session`` is a session of this model the caller
    loaded itself; the memory and load checks are then recorded as done by the
    caller (run :func:`check_memory` before loading it), and ``settings`` is
    unused. To keep the session the gate loads, as the agent does for its
    swap, use :func:`load_validated`.

    Checks that the manifest does not ask for (no vectors, no golden set, no
    budget) pass with the detail "not configured". Returns the full report;
    raises :class:`ValidationError` with ``reason`` and the partial report.
    """
    return _run_gate(model_path, manifest, settings, memory_available, latency_runs,
                     session)[0]


def _run_gate(
    model_path: Path,
    manifest: Manifest,
    settings: SessionSettings,
    memory_available: Callable[[], int] | None,
    latency_runs: int,
    session: ort.InferenceSession | None,
) -> tuple[ValidationReport, ort.InferenceSession]:
    """The checks in order; the report, and the session they ran on."""
    if latency_runs < 1:
        raise ValueError(f"latency_runs must be at least 1, not {latency_runs}")
    gate = _Gate()

    # 1. Memory: refuse before loading, since loading is what could exhaust it.
    if session is None:
        memory = check_memory(model_path, manifest, memory_available)
        if not memory.ok:
            raise gate.fail("memory", ValidationReason.MEMORY_INSUFFICIENT, memory.detail)
        gate.passed("memory", memory.detail)
    else:
        gate.passed("memory", "not measured here: the caller loaded the session")

    # 2. Load with the production options, the ones the model will be served with.
    if session is None:
        try:
            session = create_session(model_path, settings,
                                     external_data=bool(manifest.external_data))
        except SessionLoadError as e:
            raise gate.fail("load", ValidationReason.LOAD_FAILED, f"load: {e}") from e
        gate.passed("load", f"loaded {model_path.name} with {settings}")
    else:
        gate.passed("load", "session supplied by the caller")

    # 3. The signature the manifest promises is the one the model has.
    io = _check_io(session, manifest)
    if not io.ok:
        raise gate.fail("io_signature", ValidationReason.IO_MISMATCH, io.detail)
    gate.checks.append(io)

    _check_vectors(gate, session, manifest)
    _check_golden(gate, session, manifest)
    _check_latency(gate, session, manifest, latency_runs)
    return gate.report(), session


def _check_vectors(gate: _Gate, session: ort.InferenceSession, manifest: Manifest) -> None:
    """4. This runtime computes what the publisher's did, and nothing non-finite."""
    vectors = manifest.validation
    if vectors is None:
        gate.passed("vectors", _NOT_CONFIGURED)
        return
    fail = ValidationReason.VECTORS_MISMATCH
    feeds, problems = _feeds(vectors.inputs, manifest.inputs, "the vectors")
    output_names = {s.name for s in manifest.outputs}
    problems += [
        f"the vectors expect output {t.name!r}, which the model lacks"
        for t in vectors.outputs
        if t.name not in output_names
    ]
    if problems:
        raise gate.fail("vectors", fail, "validation vectors: " + "; ".join(problems))
    try:
        outputs = _run(session, manifest.inputs, feeds)
    except Exception as e:  # onnxruntime's errors derive from Exception only
        raise gate.fail("vectors", fail, f"validation vectors: inference failed: {e}") from e
    non_finite = _non_finite(outputs)
    if non_finite is not None:
        raise gate.fail("vectors", ValidationReason.NAN_OUTPUT, f"validation vectors: {non_finite}")
    mismatches = [
        m
        for t in vectors.outputs
        if (m := _compare_output(t, np.asarray(outputs[t.name]), vectors.atol, vectors.rtol))
    ]
    if mismatches:
        raise gate.fail(
            "vectors", fail, "validation vectors do not reproduce: " + "; ".join(mismatches)
        )
    rows = vectors.inputs[0].shape[0] if vectors.inputs[0].shape else 1
    gate.passed(
        "vectors",
        f"{len(vectors.outputs)} output(s) of {rows} row(s) reproduce within "
        f"atol={vectors.atol:g} rtol={vectors.rtol:g}",
    )


def _check_golden(gate: _Gate, session: ort.InferenceSession, manifest: Manifest) -> None:
    """5. Accuracy on labelled rows is at least the release's floor."""
    golden = manifest.golden
    if golden is None:
        gate.passed("golden_accuracy", _NOT_CONFIGURED)
        return
    feeds, problems = _feeds(golden.inputs, manifest.inputs, "the golden set")
    if golden.label_output not in {s.name for s in manifest.outputs}:
        problems.append(f"label_output {golden.label_output!r} is not an output of the model")
    if problems:
        # The golden set does not fit the model it ships with: the manifest contradicts itself.
        raise gate.fail(
            "golden_accuracy", ValidationReason.IO_MISMATCH, "golden set: " + "; ".join(problems)
        )
    rows = len(golden.labels)
    floor = ValidationReason.ACCURACY_BELOW_FLOOR
    try:
        outputs = _run(session, manifest.inputs, feeds)
    except Exception as e:  # onnxruntime's errors derive from Exception only
        raise gate.fail("golden_accuracy", floor, f"golden set: inference failed: {e}") from e
    non_finite = _non_finite(outputs)
    if non_finite is not None:
        raise gate.fail("golden_accuracy", ValidationReason.NAN_OUTPUT, f"golden set: {non_finite}")
    try:
        predicted = _predictions(outputs, golden.label_output, rows)
    except ValueError as e:
        raise gate.fail("golden_accuracy", ValidationReason.IO_MISMATCH, f"golden set: {e}") from e
    gate.accuracy = float(np.mean(predicted == np.asarray(golden.labels, dtype=np.int64)))
    verdict = "is below" if gate.accuracy < golden.min_accuracy else "meets"
    detail = (
        f"golden-set accuracy {gate.accuracy:.4f} {verdict} "
        f"the floor {golden.min_accuracy:g} ({rows} rows)"
    )
    if gate.accuracy < golden.min_accuracy:
        raise gate.fail("golden_accuracy", floor, detail)
    gate.passed("golden_accuracy", detail)


def _latency_feeds(
    session_specs: Sequence[TensorSpec], manifest: Manifest
) -> dict[str, np.ndarray]:
    """One row of real data (vectors, else golden set), else zeros of the declared shape."""
    # The vectors and golden checks ran first, so these tensors are known to fit the inputs.
    by_name = {s.name: s for s in session_specs}
    for source in (manifest.validation, manifest.golden):
        if source is not None:
            feeds = {t.name: tensor_to_numpy(t) for t in source.inputs}
            return {
                name: arr[:1] if _batched(by_name[name]) and arr.ndim else arr
                for name, arr in feeds.items()
            }
    feeds = {}
    for spec in session_specs:
        shape = tuple(1 if d is None else d for d in spec.shape)
        fill = "" if spec.datatype == "BYTES" else 0
        feeds[spec.name] = np.full(shape, fill, dtype=NUMPY_TYPES[spec.datatype])
    return feeds


def _check_latency(
    gate: _Gate, session: ort.InferenceSession, manifest: Manifest, runs: int
) -> None:
    """6. Single-row latency, the way an application calls the model, fits the budget."""
    budget = manifest.latency_budget_ms
    if budget is None:
        gate.passed("latency", _NOT_CONFIGURED)
        return
    over = ValidationReason.LATENCY_OVER_BUDGET
    feeds = _latency_feeds(manifest.inputs, manifest)
    names = [o.name for o in session.get_outputs()]
    timings_ns: list[int] = []
    try:
        for _ in range(LATENCY_WARMUP_RUNS):
            session.run(names, feeds)
        for _ in range(runs):
            start = time.perf_counter_ns()
            session.run(names, feeds)
            timings_ns.append(time.perf_counter_ns() - start)
    except Exception as e:  # onnxruntime's errors derive from Exception only
        raise gate.fail("latency", over, f"latency: inference failed: {e}") from e
    timings_ms = np.asarray(timings_ns, dtype=np.float64) / 1e6
    gate.latency_p95_ms = float(np.percentile(timings_ms, 95))
    median = float(np.median(timings_ms))
    within = math.isfinite(gate.latency_p95_ms) and gate.latency_p95_ms <= budget
    detail = (
        f"latency p95 {gate.latency_p95_ms:.4g} ms (median {median:.4g} ms, {runs} single-row "
        f"runs) {'is within' if within else 'exceeds'} the budget {budget:g} ms"
    )
    if not within:
        raise gate.fail("latency", over, detail)
    gate.passed("latency", detail)


# --------------------------------------------------------------------------- compatibility


def _dims_problem(
    kind: str, name: str, old: tuple[int | None, ...], new: tuple[int | None, ...]
) -> str | None:
    """Shape compatibility, by direction.

    Inputs may widen: a fixed dim may stay or become dynamic (the new model still
    accepts every tensor the old one did), a dynamic dim must stay dynamic.
    Outputs may narrow: a dynamic dim may stay or become fixed (consumers already
    handle any size), a fixed dim must keep its value.
    """
    if len(old) != len(new):
        return f"{kind} {name!r} changes rank: {_shape_text(old)} -> {_shape_text(new)}"
    for axis, (was, now) in enumerate(zip(old, new, strict=True)):
        if kind == "input":
            broken = (was is None and now is not None) or (
                was is not None and now is not None and was != now
            )
        else:
            broken = was is not None and now != was
        if broken:
            return f"{kind} {name!r} changes dim {axis}: {_shape_text(old)} -> {_shape_text(new)}"
    return None


def check_compatible(previous: Manifest, candidate: Manifest) -> None:
    """Refuse a release that would break callers of the model's previous release.

    The candidate must take exactly the previous inputs (same names and
    datatypes, shapes that accept everything the previous ones did; a new input
    is a breaking change too, since ONNX inputs are required) and still produce
    every previous output with the same datatype and a shape consumers already
    handle. Extra outputs are fine. Raises :class:`IncompatibleSignatureError`
    naming every tensor that differs and how.
    """
    problems: list[str] = []
    old_inputs = {s.name: s for s in previous.inputs}
    new_inputs = {s.name: s for s in candidate.inputs}
    problems += [f"input {n!r} was removed" for n in sorted(old_inputs.keys() - new_inputs.keys())]
    problems += [f"input {n!r} is new" for n in sorted(new_inputs.keys() - old_inputs.keys())]
    new_outputs = {s.name: s for s in candidate.outputs}
    pairs: list[tuple[str, TensorSpec, TensorSpec]] = [
        ("input", old, new_inputs[name]) for name, old in old_inputs.items() if name in new_inputs
    ]
    for old in previous.outputs:
        if old.name in new_outputs:
            pairs.append(("output", old, new_outputs[old.name]))
        else:
            problems.append(f"output {old.name!r} was removed")
    for kind, old, new in pairs:
        if old.datatype != new.datatype:
            problems.append(
                f"{kind} {old.name!r} changes datatype: {old.datatype} -> {new.datatype}"
            )
        dims = _dims_problem(kind, old.name, old.shape, new.shape)
        if dims is not None:
            problems.append(dims)
    if problems:
        raise IncompatibleSignatureError(
            f"{candidate.name} {candidate.version} is not compatible with "
            f"{previous.name} {previous.version}: " + "; ".join(problems)
        )
