"""Every saved fuzz input, replayed as a regression case (``tests/fuzz/``; ``make fuzz`` adds them).

Each file of ``tests/fuzz/corpus/<target>/`` -- the real inputs it was seeded
from, the inputs a fuzz run kept for their coverage, and every crash ever
found -- goes through its harness's check once, plainly (no atheris, no
instrumentation), which must return: the parser accepted it or refused it
with a documented exception. Each replay is also held to a time and memory
bound (tracemalloc peak), the "no hang, bounded memory" half of the promise.
The harnesses' hypothesis properties run too, with a small budget.

A crash found in a module its owner is changing and not yet fixed is listed
in :data:`KNOWN_OPEN` with the reason: it is an ``xfail(strict=True)`` case,
so the fix turns it into a failure here until its entry is removed.
"""

from __future__ import annotations

import importlib
import sys
import time
import tracemalloc
import warnings
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, settings

FUZZ = Path(__file__).resolve().parent / "fuzz"
sys.path.insert(0, str(FUZZ))  # the harnesses import fuzz_support as scripts do

import fuzz_support  # noqa: E402

# A replay is one parse of at most a few tens of KiB: far below these.
MAX_SECONDS = 10.0
MAX_TRACED_BYTES = 64 * 1024 * 1024

# (target, corpus file) -> why it still fails. Each was reported to the owner of the module.
KNOWN_OPEN: dict[tuple[str, str], str] = {
}


def _harness_modules() -> list[ModuleType]:
    return [importlib.import_module(p.stem) for p in sorted(FUZZ.glob("fuzz_*.py"))
            if p.name != "fuzz_support.py"]


HARNESSES = {module.HARNESS.name: module.HARNESS for module in _harness_modules()}


def _cases() -> list[object]:
    cases = []
    for name, harness in sorted(HARNESSES.items()):
        for path in fuzz_support.corpus_files(harness):
            reason = KNOWN_OPEN.get((name, path.name))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            cases.append(pytest.param(name, path, id=f"{name}/{path.name}", marks=marks))
    return cases


@pytest.mark.parametrize(("target", "path"), _cases())
def test_corpus_input(target: str, path: Path) -> None:
    harness = HARNESSES[target]
    data = path.read_bytes()
    started = time.monotonic()
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # numpy's overflow to inf in FP16
            harness.one_input(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.monotonic() - started
    assert elapsed < MAX_SECONDS, f"{path.name} took {elapsed:.1f} s"
    assert peak < MAX_TRACED_BYTES, f"{path.name} peaked at {peak / 2**20:.0f} MiB"


def test_every_harness_has_a_seeded_corpus() -> None:
    """A harness without seeds fuzzes from nothing; a corpus without a harness is never run."""
    folders = {p.name for p in fuzz_support.CORPUS.iterdir() if p.is_dir()}
    assert folders == set(HARNESSES)
    for name, harness in HARNESSES.items():
        seeds = [p for p in fuzz_support.corpus_files(harness) if p.name.startswith("seed-")]
        assert seeds, f"corpus {name} has no seed files (python tests/fuzz/fuzz_{name}.py --seed)"


def test_known_open_entries_name_saved_inputs() -> None:
    for target, name in KNOWN_OPEN:
        assert (fuzz_support.CORPUS / target / name).is_file(), f"{target}/{name} is not saved"


def _properties() -> list[object]:
    return [pytest.param(name, prop, id=f"{name}.{prop.__name__}")
            for name, harness in sorted(HARNESSES.items()) for prop in harness.properties]


@pytest.mark.parametrize(("target", "prop"), _properties())
def test_property(target: str, prop: object) -> None:
    """The harness's hypothesis property, briefly (``make fuzz`` runs it for longer)."""
    harness = HARNESSES[target]
    # Known open crashes are tolerated here as while fuzzing: their saved input fails above.
    recorder = fuzz_support.FailureRecorder(harness)
    test = settings(max_examples=30, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))(prop)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        test(recorder.check)  # type: ignore[operator]
