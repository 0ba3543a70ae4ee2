"""The model host: serves named models and hot-swaps them without dropping a request.

Per model name the host holds ONE reference to an immutable :class:`LoadedModel`
(name, version, session, manifest). A request reads that reference once, under
the lock, and pins the model it got: it runs to the end on that session even if
a swap replaces the reference meanwhile. Each pinned model carries an in-flight
count, so a replaced session is released only after its last request finished.

A swap, the availability-preserving way (``side_by_side``):

1. the model kept for probation of the previous swap, if any, is released (a
   new update ends that probation);
2. :func:`~edgeota.runtime.validation.check_memory` decides whether the new
   session fits beside the current one;
3. the new session is built (by :func:`~edgeota.runtime.validation.create_session`,
   the one place sessions are made) and warmed with the manifest's validation
   vectors, or zeros of the declared shape, so the first real request does not
   pay for lazy allocations;
4. the reference is switched under the lock (microseconds), and the old model
   stays loaded as ``previous`` for an instant :meth:`ModelHost.revert` until
   :meth:`ModelHost.commit` releases it and returns the memory to the system
   with ``malloc_trim(0)`` where glibc offers it.

When memory cannot hold both (``unload_then_load``) the old model is taken out
of service, its in-flight requests drain, it is released, and only then the new
one is loaded. Requests arriving during that gap get a
:class:`ModelUnavailableError` at once (HTTP 503 at the endpoint) rather than
waiting: a caller on a device knows best whether to retry, and a request that
hangs for a whole model load would hold a worker thread. The gap is reported
in :attr:`SwapResult.gap_ms`.

Building beside serving works because onnxruntime releases the GIL while it
loads, optimises and runs a model: requests keep running Python meanwhile, and
a swap of the MLP sample costs concurrent clients about what a bare
``InferenceSession`` creation does (``bench/hot_swap.py``). Destroying a session
keeps the GIL (milliseconds for a large graph), so that step pauses every
thread wherever it runs.

Models with external data are loaded from their path, so onnxruntime maps the
data files into memory rather than reading them: the weights stay clean page
cache, shared by two sessions of the same file and reclaimable by the kernel.
Weights that a kernel prepacks (MatMul, Gemm, Conv) are still copied into
anonymous memory unless the session disables prepacking
(``session.disable_prepacking``); see ``tests/test_model_host.py``.

No thread is started per request and the lock is never held around
``session.run``: it guards only the reference switch and the counters. When
the last request on a retired model ends, that model is released on a
short-lived thread of its own, not on the request's caller.
Per-version metrics (counts, errors, NaN/Inf outputs, latency percentiles over
a bounded window) feed the probation decision of the update cycle.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from edgeota.protocol.errors import EdgeotaError
from edgeota.protocol.manifest import Manifest, Tensor, TensorSpec
from edgeota.runtime.validation import (
    SessionLoadError,
    SessionSettings,
    check_memory,
    create_session,
    numpy_to_datatype,
    tensor_to_numpy,
)

__all__ = [
    "DEFAULT_DRAIN_TIMEOUT_S",
    "LATENCY_WINDOW",
    "WARMUP_RUNS",
    "ActivationError",
    "InferenceError",
    "InvalidInputError",
    "LoadedModel",
    "ModelHost",
    "ModelHostError",
    "ModelMetrics",
    "ModelUnavailableError",
    "NoPreviousModelError",
    "Prediction",
    "RunHook",
    "SwapMode",
    "SwapResult",
    "UnknownModelError",
    "find_malloc_trim",
    "warmup_feeds",
]

#: Latency samples kept per version: enough for a stable p99 (about 10 samples
#: above it), small enough (8 KiB) to keep for every loaded version.
LATENCY_WINDOW = 1024

#: Warm-up inferences on a new session before it takes traffic: the first run
#: allocates the arena and fills caches, the second confirms a steady state.
WARMUP_RUNS = 2

#: How long an unload-then-load swap waits for the old model's in-flight
#: requests before giving up (and putting the old model back into service).
DEFAULT_DRAIN_TIMEOUT_S = 30.0

#: Metrics of versions no longer loaded are kept for the latest few per name, so
#: the update cycle can still report why it reverted, without growing forever.
_KEPT_METRIC_VERSIONS = 4

SwapMode = Literal["side_by_side", "unload_then_load", "revert"]


# --------------------------------------------------------------------------- errors


class ModelHostError(EdgeotaError):
    """Base of the errors the model host raises on purpose."""


class UnknownModelError(ModelHostError):
    """No model of this name (or version) is hosted: the caller asked for something else."""


class ModelUnavailableError(ModelHostError):
    """The model exists but is not loaded right now (the gap of an unload-then-load swap)."""


class InvalidInputError(ModelHostError):
    """The request's tensors do not fit the model: unknown or missing name, dtype, shape."""


class InferenceError(ModelHostError):
    """onnxruntime failed while running a request that passed the input checks."""


class ActivationError(ModelHostError):
    """A model could not be made live: load, I/O names, warm-up or drain failed.

    The served model is unchanged, or was restored, unless the message says otherwise.
    """


class NoPreviousModelError(ModelHostError):
    """A revert was asked for, but no previous model is loaded (committed or unload-then-load)."""


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """One loaded version of a model. Immutable: a swap replaces it, never edits it.

    ``eq=False`` keeps identity hashing, so the host can count in-flight requests
    per loaded model even when two loads share a version string.
    """

    name: str
    version: str
    session: ort.InferenceSession
    manifest: Manifest
    model_path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.outputs)


@dataclass(frozen=True)
class SwapResult:
    """What a swap or revert did, and how long each step took (milliseconds).

    ``gap_ms`` is the time the model was not serving at all: 0 for a side-by-side
    swap or a revert, the unload-to-live window for an unload-then-load swap.
    ``detail`` says why the mode was chosen (the memory check's finding).
    """

    name: str
    old_version: str
    new_version: str
    mode: SwapMode
    load_ms: float
    warm_ms: float
    switch_ms: float
    gap_ms: float
    detail: str = ""


@dataclass(frozen=True)
class Prediction:
    """The outputs of one request and the version that computed them."""

    name: str
    version: str
    outputs: Mapping[str, np.ndarray]
    latency_ms: float


#: Called as ``hook(name, version)`` inside the measured run of every request,
#: after onnxruntime returned: what it waits counts as the model's latency and
#: what it raises as the model's error. A device has none; the fleet simulator
#: emulates slower or faulty hardware with it.
RunHook = Callable[[str, str], None]


@dataclass(frozen=True)
class ModelMetrics:
    """Probation figures of one version since it went live (or since the last reset).

    ``inferences`` counts successful runs, ``errors`` runs onnxruntime failed,
    ``non_finite`` successful runs with a NaN or Inf in a float output,
    ``rejected`` requests refused by the input checks (the caller's fault, so
    they are not errors of the model). Percentiles cover the last ``window``
    successful runs and are ``None`` before the first one.
    """

    name: str
    version: str
    inferences: int
    errors: int
    non_finite: int
    rejected: int
    window: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None

    @property
    def error_rate(self) -> float:
        """Failed runs over all runs; 0.0 before the first run."""
        runs = self.inferences + self.errors
        return self.errors / runs if runs else 0.0


class _Metrics:
    """Mutable counters of one version, with their own small lock."""

    def __init__(self, window: int) -> None:
        self._lock = threading.Lock()
        self._window = window
        self._reset()

    def _reset(self) -> None:
        self.inferences = 0
        self.errors = 0
        self.non_finite = 0
        self.rejected = 0
        self.latencies: deque[float] = deque(maxlen=self._window)

    def reset(self) -> None:
        with self._lock:
            self._reset()

    def success(self, latency_ms: float, finite: bool) -> None:
        with self._lock:
            self.inferences += 1
            self.latencies.append(latency_ms)
            if not finite:
                self.non_finite += 1

    def error(self) -> None:
        with self._lock:
            self.errors += 1

    def reject(self) -> None:
        with self._lock:
            self.rejected += 1

    def snapshot(self, name: str, version: str) -> ModelMetrics:
        with self._lock:
            samples = np.fromiter(self.latencies, dtype=np.float64, count=len(self.latencies))
            counts = (self.inferences, self.errors, self.non_finite, self.rejected)
        p50 = p95 = p99 = None
        if samples.size:
            p50, p95, p99 = (float(v) for v in np.percentile(samples, [50, 95, 99]))
        return ModelMetrics(name, version, *counts, int(samples.size), p50, p95, p99)


@dataclass
class _Slot:
    """Everything the host knows about one model name. Mutated only under the host lock."""

    active: LoadedModel | None = None
    previous: LoadedModel | None = None
    incoming: str | None = None  # the version being loaded while ``active`` is None
    # Serialises swap, revert and commit of this name; predict never takes it.
    ops: threading.Lock = field(default_factory=threading.Lock)


def find_malloc_trim() -> Callable[[], None] | None:
    """glibc's ``malloc_trim(0)``, or ``None`` where there is none (musl, macOS, Windows).

    onnxruntime frees a session's buffers with ``free``; glibc keeps freed heap
    pages in the process unless asked to hand them back, so without this a
    released model still shows in the device's memory use.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int

    def call() -> None:
        trim(0)

    return call


# --------------------------------------------------------------------------- host


class ModelHost:
    """Hosts several named models; thread-safe; see the module docstring for the swap rules.

    ``memory_available`` returns free bytes (default: ``MemAvailable`` of
    ``/proc/meminfo``, via :func:`check_memory`); ``clock`` returns seconds and
    times swaps and requests.
    """

    def __init__(
        self,
        settings: SessionSettings,
        *,
        memory_available: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        latency_window: int = LATENCY_WINDOW,
        drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
        run_hook: RunHook | None = None,
    ) -> None:
        if latency_window < 1:
            raise ValueError(f"latency_window must be at least 1, not {latency_window}")
        if drain_timeout_s <= 0:
            raise ValueError(f"drain_timeout_s must be positive, not {drain_timeout_s}")
        self._settings = settings
        self._memory_available = memory_available
        self._clock = clock
        self._window = latency_window
        self._drain_timeout_s = drain_timeout_s
        self._run_hook = run_hook
        self._trim = find_malloc_trim()
        # One lock for references and counters; the condition wakes a draining swap.
        self._lock = threading.Condition(threading.Lock())
        self._slots: dict[str, _Slot] = {}
        self._inflight: dict[LoadedModel, int] = {}
        self._retiring: set[LoadedModel] = set()
        self._metrics: dict[tuple[str, str], _Metrics] = {}

    # ----------------------------------------------------------------- queries

    def models(self) -> tuple[str, ...]:
        """The hosted model names, sorted (including one in an unload-then-load gap)."""
        with self._lock:
            return tuple(sorted(self._slots))

    def model(self, name: str) -> LoadedModel:
        """The model serving ``name`` now. Do not keep it: holding it keeps its session alive."""
        with self._lock:
            return self._active_locked(name)

    def current_version(self, name: str) -> str:
        """The version serving ``name`` now."""
        return self.model(name).version

    def previous_version(self, name: str) -> str | None:
        """The version kept loaded for an instant revert, if any (during probation)."""
        with self._lock:
            prev = self._slot_locked(name).previous
            return None if prev is None else prev.version

    def is_ready(self, name: str) -> bool:
        """Whether ``name`` is serving (False during an unload-then-load gap)."""
        with self._lock:
            return self._slot_locked(name).active is not None

    def in_flight(self, name: str) -> int:
        """Requests running now on any loaded version of ``name``."""
        with self._lock:
            return sum(n for m, n in self._inflight.items() if m.name == name)

    def metrics(self, name: str, version: str) -> ModelMetrics:
        """Probation metrics of ``name`` at ``version``."""
        with self._lock:
            metrics = self._metrics.get((name, version))
        if metrics is None:
            raise UnknownModelError(f"no metrics for model {name!r} version {version!r}")
        return metrics.snapshot(name, version)

    def reset_metrics(self, name: str, version: str) -> None:
        """Start a new measurement window for ``name`` at ``version`` (e.g. a probation phase)."""
        with self._lock:
            metrics = self._metrics.get((name, version))
        if metrics is None:
            raise UnknownModelError(f"no metrics for model {name!r} version {version!r}")
        metrics.reset()

    # ----------------------------------------------------------------- lifecycle

    def load(
        self,
        name: str,
        version: str,
        model_path: Path,
        manifest: Manifest,
        *,
        session: ort.InferenceSession | None = None,
    ) -> None:
        """Load and warm the first model of ``name``; raises :class:`ActivationError`.

        ``session`` is a session of this model the caller already built (the one
        the validation gate checked), so it is not loaded twice.
        """
        with self._lock:
            if name in self._slots:
                raise RuntimeError(f"model {name!r} is already hosted: use swap()")
            # Reserved while loading: requests get ModelUnavailableError, not UnknownModelError.
            self._slots[name] = _Slot(incoming=version)
        try:
            model, _, _ = self._prepare(name, version, model_path, manifest, session)
        except ActivationError:
            with self._lock:
                del self._slots[name]
            raise
        with self._lock:
            slot = self._slots[name]
            slot.active, slot.incoming = model, None
            self._new_metrics_locked(name, version)

    def swap(
        self,
        name: str,
        version: str,
        model_path: Path,
        manifest: Manifest,
        *,
        session: ort.InferenceSession | None = None,
    ) -> SwapResult:
        """Replace the model serving ``name`` with ``version``; see the module docstring.

        A supplied ``session`` is already in memory, so the swap is side by side.
        Raises :class:`ActivationError` when the new model cannot go live (the old
        one keeps serving, or is restored after an unload-then-load attempt).
        """
        slot = self._slot(name)
        with slot.ops:
            self._end_probation(slot)
            if session is not None:
                return self._swap_side_by_side(
                    name, slot, version, model_path, manifest, session, "session supplied"
                )
            memory = check_memory(model_path, manifest, self._memory_available)
            if memory.ok:
                return self._swap_side_by_side(
                    name, slot, version, model_path, manifest, None, memory.detail
                )
            return self._swap_unload_first(name, slot, version, model_path, manifest, memory.detail)

    def revert(self, name: str) -> SwapResult:
        """Put the previous model back at once (it is still loaded); release the current one."""
        slot = self._slot(name)
        with slot.ops:
            start = self._clock()
            with self._lock:
                previous, failed = slot.previous, slot.active
                if previous is None or failed is None:
                    raise NoPreviousModelError(
                        f"model {name!r} has no previous version loaded to revert to "
                        "(committed, or swapped by unload-then-load)"
                    )
                slot.active, slot.previous = previous, None
                released = self._retire_locked(failed)
            switch_ms = (self._clock() - start) * 1000
            result = SwapResult(
                name,
                failed.version,
                previous.version,
                "revert",
                0.0,
                0.0,
                switch_ms,
                0.0,
                "previous version was still loaded",
            )
            del failed, previous
            if released:
                self._return_memory()
            return result

    def commit(self, name: str) -> None:
        """End probation: release the previous model once no request uses it."""
        slot = self._slot(name)
        with slot.ops:
            self._end_probation(slot)

    # ----------------------------------------------------------------- inference

    def predict(
        self,
        name: str,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Sequence[str] | None = None,
        version: str | None = None,
    ) -> Prediction:
        """Run one request on the model serving ``name`` now, pinned to it until it ends.

        ``outputs`` selects outputs (default: all of the manifest's); ``version``
        refuses the request with :class:`UnknownModelError` unless that version is
        the one serving. Raises :class:`InvalidInputError` for tensors that do not
        fit, :class:`ModelUnavailableError` during an unload-then-load gap and
        :class:`InferenceError` when onnxruntime fails.
        """
        model, metrics = self._acquire(name)
        try:
            if version is not None and version != model.version:
                raise UnknownModelError(
                    f"model {name!r} version {version!r} is not served (serving {model.version})"
                )
            try:
                feeds = _check_inputs(model, inputs)
                names = _check_outputs(model, outputs)
            except InvalidInputError:
                metrics.reject()
                raise
            start = self._clock()
            try:
                values = model.session.run(list(names), feeds)
                if self._run_hook is not None:
                    self._run_hook(name, model.version)
            except Exception as e:  # onnxruntime's errors derive from Exception only
                metrics.error()
                raise InferenceError(f"model {name!r} version {model.version} failed: {e}") from e
            latency_ms = (self._clock() - start) * 1000
            result = {n: np.asarray(v) for n, v in zip(names, values, strict=True)}
            metrics.success(latency_ms, _all_finite(result))
            return Prediction(name, model.version, result, latency_ms)
        finally:
            if self._finish(model):
                # This was the last request of a retired model: its release goes to
                # another thread, so this caller does not wait for it (see _release_later).
                box = [model]
                del model
                self._release_later(box)

    # ----------------------------------------------------------------- internals

    def _slot(self, name: str) -> _Slot:
        with self._lock:
            return self._slot_locked(name)

    def _slot_locked(self, name: str) -> _Slot:
        slot = self._slots.get(name)
        if slot is None:
            raise UnknownModelError(f"no model named {name!r} is hosted")
        return slot

    def _active_locked(self, name: str) -> LoadedModel:
        slot = self._slot_locked(name)
        if slot.active is None:
            raise ModelUnavailableError(
                f"model {name!r} is not serving while version {slot.incoming} loads "
                "(unload-then-load swap); retry shortly"
            )
        return slot.active

    def _acquire(self, name: str) -> tuple[LoadedModel, _Metrics]:
        """Read the reference once and pin it: the request runs on this model to the end."""
        with self._lock:
            model = self._active_locked(name)
            self._inflight[model] = self._inflight.get(model, 0) + 1
            metrics = self._metrics[(name, model.version)]
        return model, metrics

    def _finish(self, model: LoadedModel) -> bool:
        """Unpin; True when this was the last request of a retired model (now releasable)."""
        with self._lock:
            count = self._inflight[model] - 1
            if count:
                self._inflight[model] = count
                return False
            del self._inflight[model]
            self._lock.notify_all()
            if model in self._retiring:
                self._retiring.discard(model)
                return True
            return False

    def _idle_locked(self, model: LoadedModel) -> bool:
        """No request runs on ``model`` (a predicate for waits under the lock)."""
        return not self._inflight.get(model)

    def _retire_locked(self, model: LoadedModel | None) -> bool:
        """Stop holding ``model``: True if it is idle (release now), else on its last request."""
        if model is None:
            return False
        if self._inflight.get(model):
            self._retiring.add(model)
            return False
        return True

    def _return_memory(self) -> None:
        """Called once the host dropped its last reference to a session."""
        if self._trim is not None:
            self._trim()

    def _release_later(self, box: list[LoadedModel]) -> None:
        """Drop the model in ``box`` (the last reference to it) and trim, on a short-lived thread.

        Why not on the request that ended last: destroying a session and
        ``malloc_trim`` take milliseconds for a large model (12 ms and 13 ms for a
        4,500-node graph here), and that caller is waiting for its answer. One
        thread per released model (at most one per swap), never per request; it
        ends when the memory is back. The session is destroyed with the GIL held
        (onnxruntime's binding does not release it there), so other threads pause
        for that part wherever it runs; ``malloc_trim`` runs without the GIL.
        """

        def release() -> None:
            box.clear()
            self._return_memory()

        thread = threading.Thread(target=release, name="edgeota-model-release", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no thread to be had: release here rather than keep the memory
            release()

    def _end_probation(self, slot: _Slot) -> None:
        with self._lock:
            previous, slot.previous = slot.previous, None
            released = self._retire_locked(previous)
        del previous
        if released:
            self._return_memory()

    def _new_metrics_locked(self, name: str, version: str) -> None:
        self._metrics.pop((name, version), None)  # re-insert: newest last
        self._metrics[(name, version)] = _Metrics(self._window)
        slot = self._slots[name]
        loaded = {m.version for m in (slot.active, slot.previous) if m is not None}
        loaded |= {m.version for m in (*self._inflight, *self._retiring) if m.name == name}
        stale = [v for (n, v) in self._metrics if n == name and v not in loaded]
        for old in stale[: max(0, len(stale) - _KEPT_METRIC_VERSIONS)]:
            del self._metrics[(name, old)]

    def _prepare(
        self,
        name: str,
        version: str,
        model_path: Path,
        manifest: Manifest,
        session: ort.InferenceSession | None,
    ) -> tuple[LoadedModel, float, float]:
        """Build (unless given), check and warm a model; returns it with load and warm ms."""
        start = self._clock()
        if session is None:
            try:
                session = create_session(model_path, self._settings,
                                         external_data=bool(manifest.external_data))
            except SessionLoadError as e:
                raise ActivationError(f"model {name!r} version {version}: {e}") from e
        loaded_at = self._clock()
        model = LoadedModel(
            name, version, session, manifest, Path(model_path), manifest.inputs, manifest.outputs
        )
        problem = _io_names_problem(model)
        if problem is not None:
            raise ActivationError(f"model {name!r} version {version}: {problem}")
        feeds = warmup_feeds(manifest)
        try:
            for _ in range(WARMUP_RUNS):
                session.run(list(model.output_names), feeds)
        except Exception as e:  # onnxruntime's errors derive from Exception only
            raise ActivationError(
                f"model {name!r} version {version}: warm-up inference failed: {e}"
            ) from e
        warmed_at = self._clock()
        return model, (loaded_at - start) * 1000, (warmed_at - loaded_at) * 1000

    def _swap_side_by_side(
        self,
        name: str,
        slot: _Slot,
        version: str,
        model_path: Path,
        manifest: Manifest,
        session: ort.InferenceSession | None,
        detail: str,
    ) -> SwapResult:
        new, load_ms, warm_ms = self._prepare(name, version, model_path, manifest, session)
        start = self._clock()
        with self._lock:
            old = slot.active
            if old is None:  # only an earlier failed restore leaves a slot empty
                raise ActivationError(f"model {name!r} has no active model to swap from")
            self._new_metrics_locked(name, version)
            slot.active, slot.previous = new, old
        switch_ms = (self._clock() - start) * 1000
        return SwapResult(
            name, old.version, version, "side_by_side", load_ms, warm_ms, switch_ms, 0.0, detail
        )

    def _swap_unload_first(
        self,
        name: str,
        slot: _Slot,
        version: str,
        model_path: Path,
        manifest: Manifest,
        detail: str,
    ) -> SwapResult:
        gap_start = self._clock()
        with self._lock:
            old = slot.active
            if old is None:
                raise ActivationError(f"model {name!r} has no active model to swap from")
            slot.active, slot.incoming = None, version
            drained = self._lock.wait_for(
                functools.partial(self._idle_locked, old), timeout=self._drain_timeout_s
            )
            if not drained:
                slot.active, slot.incoming = old, None
                raise ActivationError(
                    f"model {name!r}: requests on version {old.version} did not finish within "
                    f"{self._drain_timeout_s:g} s; it keeps serving"
                )
        old_version, old_path, old_manifest = old.version, old.model_path, old.manifest
        del old  # the last reference: the session is released here
        self._return_memory()
        try:
            new, load_ms, warm_ms = self._prepare(name, version, model_path, manifest, None)
        except ActivationError as e:
            raise self._restore(name, slot, old_version, old_path, old_manifest, e) from e
        start = self._clock()
        with self._lock:
            self._new_metrics_locked(name, version)
            slot.active, slot.incoming = new, None
        end = self._clock()
        return SwapResult(
            name,
            old_version,
            version,
            "unload_then_load",
            load_ms,
            warm_ms,
            (end - start) * 1000,
            (end - gap_start) * 1000,
            f"both models do not fit ({detail}); unloaded {old_version} first",
        )

    def _restore(
        self,
        name: str,
        slot: _Slot,
        version: str,
        path: Path,
        manifest: Manifest,
        cause: ActivationError,
    ) -> ActivationError:
        """After a failed unload-then-load, load the old version again; the error to raise."""
        try:
            model, _, _ = self._prepare(name, version, path, manifest, None)
        except ActivationError as e:
            with self._lock:
                slot.incoming = None
            return ActivationError(
                f"{cause}; restoring version {version} failed too ({e}): "
                f"model {name!r} is not serving"
            )
        with self._lock:
            slot.active, slot.incoming = model, None
        return ActivationError(f"{cause}; version {version} was loaded again")


# --------------------------------------------------------------------------- checks


def _shape_text(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _check_inputs(model: LoadedModel, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The feeds for ``session.run``, or :class:`InvalidInputError` naming every problem."""
    specs = {s.name: s for s in model.inputs}
    problems = [f"unknown input {n!r}" for n in sorted(inputs.keys() - specs.keys())]
    problems += [f"missing input {n!r}" for n in sorted(specs.keys() - inputs.keys())]
    feeds: dict[str, np.ndarray] = {}
    for name, value in inputs.items():
        spec = specs.get(name)
        if spec is None:
            continue
        if not isinstance(value, np.ndarray):
            problems.append(f"input {name!r} is a {type(value).__name__}, not a numpy array")
            continue
        try:
            datatype = numpy_to_datatype(value)
        except ValueError:
            datatype = str(value.dtype)
        if datatype != spec.datatype:
            problems.append(f"input {name!r} is {datatype}, the model takes {spec.datatype}")
        elif value.size == 0:
            # Nothing to infer: the caller's mistake, refused before onnxruntime can
            # fail on it and count it against the model's probation.
            problems.append(f"input {name!r} is empty (shape {_shape_text(value.shape)})")
        elif not spec.accepts(value.shape):
            problems.append(
                f"input {name!r} has shape {_shape_text(value.shape)}, "
                f"the model takes {_shape_text(spec.shape)}"
            )
        else:
            feeds[name] = value
    if problems:
        raise InvalidInputError(
            f"model {model.name!r} version {model.version}: " + "; ".join(problems)
        )
    return feeds


def _check_outputs(model: LoadedModel, wanted: Sequence[str] | None) -> tuple[str, ...]:
    if wanted is None:
        return model.output_names
    unknown = [n for n in wanted if n not in model.output_names]
    if unknown:
        raise InvalidInputError(
            f"model {model.name!r} version {model.version} has no output(s) "
            f"{', '.join(map(repr, unknown))}"
        )
    if len(set(wanted)) != len(wanted):
        raise InvalidInputError(f"an output is requested twice: {list(wanted)}")
    return tuple(wanted)


def _all_finite(outputs: Mapping[str, np.ndarray]) -> bool:
    return all(a.dtype.kind != "f" or bool(np.isfinite(a).all()) for a in outputs.values())


def _io_names_problem(model: LoadedModel) -> str | None:
    """Whether the session has the manifest's inputs and outputs (by name)."""
    session_inputs = {n.name for n in model.session.get_inputs()}
    session_outputs = {n.name for n in model.session.get_outputs()}
    wanted_inputs = {s.name for s in model.inputs}
    if session_inputs != wanted_inputs:
        return (
            f"the session takes inputs {sorted(session_inputs)}, "
            f"the manifest declares {sorted(wanted_inputs)}"
        )
    missing = [n for n in model.output_names if n not in session_outputs]
    if missing:
        return f"the session lacks output(s) {missing} declared by the manifest"
    return None


def warmup_feeds(manifest: Manifest) -> dict[str, np.ndarray]:
    """The validation vectors' inputs when they fit as one batch, else zeros (dynamic dims = 1)."""
    specs = {s.name: s for s in manifest.inputs}
    if manifest.validation is not None:
        feeds = {t.name: tensor_to_numpy(t) for t in manifest.validation.inputs}
        if feeds.keys() == specs.keys() and all(
            specs[n].accepts(a.shape) and numpy_to_datatype(a) == specs[n].datatype
            for n, a in feeds.items()
        ):
            return feeds
    zeros: dict[str, np.ndarray] = {}
    for spec in manifest.inputs:
        shape = tuple(1 if d is None else d for d in spec.shape)
        if spec.datatype == "BYTES":
            zeros[spec.name] = np.full(shape, "", dtype=object)
        else:
            zeros[spec.name] = np.zeros(shape, dtype=_numpy_dtype(spec.datatype))
    return zeros


def _numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of an OIP datatype, by the gate's own table (through an empty tensor)."""
    return tensor_to_numpy(Tensor("_", datatype, (0,), ())).dtype
