"""What every fuzz harness in ``tests/fuzz/`` shares: the harness record, the corpus, the runner.

A harness is one file per parser, ``fuzz_<target>.py``, holding one
:class:`Harness`: a function that takes any bytes and returns normally when the
parser either accepted them or refused them with one of its documented
exception types (anything else escaping is the bug a fuzzer looks for), and the
real inputs its corpus is seeded from. The same function serves three callers:

* ``python tests/fuzz/fuzz_<target>.py [libFuzzer flags]`` -- coverage-guided
  fuzzing with atheris (edgeota's modules are instrumented as they are imported);
* ``python tests/fuzz/fuzz_<target>.py --seed`` -- (re)write the seed files of
  its corpus from real inputs (sealed sample bundles, manifests, frames, ...);
* ``tests/test_fuzz_corpus.py`` -- every saved corpus file and every crash,
  replayed as a regression case without atheris (it is imported lazily, only
  by :func:`main`, so pytest needs none of it).

Harnesses with a property that reads better as a generator than as bytes (a
journal torn by a power cut, a frame that must round-trip) add hypothesis
tests through :attr:`Harness.properties`. Each takes the check to apply to the
bytes it builds as its first argument (``one_input``, or a recorder that keeps
the failing input as a ``crash-`` file of the corpus); ``--property`` runs them
with a larger budget (``make fuzz``), the pytest replay with a small one.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import logging
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FUZZ_DIR = Path(__file__).resolve().parent
CORPUS = FUZZ_DIR / "corpus"
# Scratch for a fuzz run (libFuzzer's working corpus before it is merged back).
SCRATCH = FUZZ_DIR.parent.parent / "build" / "fuzz"
# The prefixes libFuzzer gives the inputs it saves on a failure.
FAILURE_PREFIXES = ("crash-", "timeout-", "oom-", "leak-", "slow-unit-")


@dataclass(frozen=True)
class KnownBug:
    """A crash found and reported but not fixed yet (in a module its owner is changing).

    While fuzzing, an exception of type ``exception`` raised through a frame
    of a file ending in ``where`` is taken as a refusal, so a run goes on
    looking for other bugs instead of stopping at the same one; the replay in
    ``tests/test_fuzz_corpus.py`` still fails on it (xfail, strict), so the
    entry must go once the fix lands.
    """

    exception: type[BaseException]
    where: str  # e.g. "protocol/telemetry.py"
    reason: str

    def matches(self, error: BaseException) -> bool:
        if not isinstance(error, self.exception):
            return False
        frames = traceback.extract_tb(error.__traceback__)
        return any(Path(f.filename).as_posix().endswith(self.where) for f in frames)


@dataclass(frozen=True)
class Harness:
    """One fuzz target: the invariant check, its seeds and its bounds.

    ``one_input`` must return normally for every input the parser handles as
    documented (accepted, or refused with a documented type) and raise for
    anything else; it must not depend on earlier calls. ``seeds`` builds the
    real inputs the corpus starts from (name -> bytes). ``max_len`` is the
    largest input libFuzzer makes; ``rss_limit_mb`` and ``timeout_s`` bound
    memory and time per input (libFuzzer reports an ``oom-``/``timeout-`` input
    past them).
    """

    name: str
    one_input: Callable[[bytes], None]
    seeds: Callable[[], Mapping[str, bytes]]
    max_len: int = 8192
    rss_limit_mb: int = 1024
    timeout_s: int = 10
    properties: tuple[Callable[..., None], ...] = field(default=())
    # A structural mutation of one input (json_structure, toml_structure, ...),
    # used beside libFuzzer's byte mutations as a custom mutator.
    structure: Callable[[bytes, random.Random], bytes] | None = None
    known_open: tuple[KnownBug, ...] = ()

    @property
    def corpus(self) -> Path:
        return CORPUS / self.name


@contextlib.contextmanager
def refused(*types: type[BaseException]) -> Iterator[None]:
    """Let the documented refusals through quietly; anything else propagates (a finding)."""
    with contextlib.suppress(*types):
        yield


def scratch_dir() -> Path:
    """A fresh folder for one input's files, on tmpfs when there is one (fsync is free there)."""
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="edgeota-fuzz-", dir=shm if shm.is_dir() else None))


def corpus_files(harness: Harness) -> list[Path]:
    """Every saved input of ``harness`` (seeds, inputs a fuzz run kept, failures), sorted."""
    if not harness.corpus.is_dir():
        return []
    return sorted(p for p in harness.corpus.iterdir() if p.is_file())


def write_seeds(harness: Harness) -> list[Path]:
    """(Re)write the ``seed-*`` files of the corpus; other files are left as they are."""
    harness.corpus.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in sorted(harness.seeds().items()):
        path = harness.corpus / f"seed-{name}"
        path.write_bytes(data)
        written.append(path)
    return written


def save_failure(harness: Harness, data: bytes) -> Path:
    """Keep an input a property found failing, named like libFuzzer's crash files."""
    harness.corpus.mkdir(parents=True, exist_ok=True)
    path = harness.corpus / f"crash-{hashlib.sha1(data).hexdigest()}"
    path.write_bytes(data)
    return path


class FailureRecorder:
    """Remembers the last input a property's check failed on, to save it as a regression case.

    Hypothesis replays the shrunk failing example last, so the input recorded
    when the property finally raises is the minimal one.
    """

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.last: bytes | None = None
        self._one_input = _tolerating(harness) if harness.known_open else harness.one_input

    def check(self, data: bytes) -> None:
        try:
            self._one_input(data)
        except BaseException:
            self.last = data
            raise


def _atheris_args(harness: Harness, extra: list[str]) -> list[str]:
    defaults = {
        "-max_len": str(harness.max_len),
        "-rss_limit_mb": str(harness.rss_limit_mb),
        "-timeout": str(harness.timeout_s),
        "-artifact_prefix": f"{harness.corpus}/",
    }
    given = {arg.split("=", 1)[0] for arg in extra if arg.startswith("-")}
    return [f"{k}={v}" for k, v in defaults.items() if k not in given] + extra


def instrumented(module_name: str, *also: str) -> contextlib.AbstractContextManager[Any]:
    """Instrument edgeota's modules (and ``also``: tomllib, tarfile) imported inside the block.

    Only when the harness runs as ``__main__`` to fuzz and atheris is
    installed: the pytest replay imports the same modules plainly.
    """
    if module_name != "__main__" or "--seed" in sys.argv or "--property" in sys.argv:
        return contextlib.nullcontext()
    try:
        import atheris
    except ImportError:
        return contextlib.nullcontext()
    return atheris.instrument_imports(include=["edgeota", *also])


def run_properties(harness: Harness, seconds: float, max_examples: int) -> int:
    """Run the harness's hypothesis properties in rounds until ``seconds`` pass; 1 on failure."""
    from hypothesis import HealthCheck, settings

    deadline = time.monotonic() + seconds
    rounds = 0
    configured = []
    for prop in harness.properties:
        if getattr(prop, "hypothesis", None) is None:
            raise TypeError(f"{prop.__name__} is not a hypothesis test")
        configured.append(settings(max_examples=max_examples, deadline=None, database=None,
                                   suppress_health_check=list(HealthCheck))(prop))
    while True:
        for test in configured:
            recorder = FailureRecorder(harness)
            try:
                test(recorder.check)
            except Exception:
                if recorder.last is not None:
                    print(f"{harness.name}: failing input saved as "
                          f"{save_failure(harness, recorder.last)}")
                raise
        rounds += 1
        if time.monotonic() >= deadline:
            print(f"{harness.name}: {rounds} round(s) of {len(harness.properties)} "
                  f"propert(y/ies) x {max_examples} examples passed")
            return 0


def _tolerating(harness: Harness) -> Callable[[bytes], None]:
    """``harness.one_input`` with its :class:`KnownBug` crashes taken as refusals (said once)."""
    seen: set[str] = set()

    def one_input(data: bytes) -> None:
        try:
            harness.one_input(data)
        except Exception as e:
            bug = next((b for b in harness.known_open if b.matches(e)), None)
            if bug is None:
                raise
            if bug.where not in seen:
                seen.add(bug.where)
                print(f"INFO: tolerating the known open bug in {bug.where} "
                      f"({type(e).__name__}): {bug.reason}", file=sys.stderr)

    return one_input


def main(harness: Harness, argv: list[str] | None = None) -> int:
    """Command line of a harness: fuzz with atheris (default), ``--seed`` or ``--property``."""
    argv = list(sys.argv if argv is None else argv)
    parser = argparse.ArgumentParser(
        description=f"fuzz harness {harness.name!r}; other flags go to libFuzzer",
        add_help=True,
    )
    parser.add_argument("--seed", action="store_true", help="rewrite the corpus's seed files")
    parser.add_argument("--property", action="store_true",
                        help="run the hypothesis properties instead of atheris")
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="time budget of --property")
    parser.add_argument("--examples", type=int, default=200,
                        help="examples per property per round of --property")
    ours, rest = parser.parse_known_args(argv[1:])
    # Refusals are the expected outcome here, and some are logged as warnings
    # (a journal reset): millions of them would bury libFuzzer's report.
    logging.getLogger("edgeota").setLevel(logging.CRITICAL)
    if ours.seed:
        for path in write_seeds(harness):
            print(f"wrote {path.relative_to(FUZZ_DIR)} ({path.stat().st_size} bytes)")
        return 0
    if ours.property:
        if not harness.properties:
            print(f"{harness.name}: no properties")
            return 0
        return run_properties(harness, ours.seconds, ours.examples)
    import atheris

    corpus_dirs = [a for a in rest if not a.startswith("-")]
    flags = [a for a in rest if a.startswith("-")]
    if not corpus_dirs:
        harness.corpus.mkdir(parents=True, exist_ok=True)
        corpus_dirs = [str(harness.corpus)]
    extra = {"custom_mutator": custom_mutator(harness.structure)} if harness.structure else {}
    target = harness.one_input
    if harness.known_open:
        target = _tolerating(harness)
    # libFuzzer runs argv[0] through the shell for -merge and -fork: make it a
    # command that starts this harness again under this interpreter.
    program = f"{sys.executable} {Path(argv[0]).resolve()}"
    atheris.Setup([program, *_atheris_args(harness, flags), *corpus_dirs], target,
                  **extra)
    atheris.Fuzz()
    return 0  # pragma: no cover - atheris.Fuzz exits the process


# ---------------------------------------------------------------- real inputs for the seeds
# Imported lazily: seeding runs once, and a fuzzing process must import edgeota
# inside ``instrumented`` to have it instrumented.


def sample_manifest(sample: str = "digits_v1", *, vectors: bool = True) -> Any:
    """The manifest ``release publish`` builds for a sample model (with its validation vectors)."""
    from edgeota.samples import load_catalog
    from edgeota.server.manifest_builder import build_manifest

    model = load_catalog()[sample]
    return build_manifest(
        model.path, name=model.name, version=model.version, hardware=("rpi4", "jetson-nano"),
        vectors=model.vectors_path if vectors else None, latency_budget_ms=50.0,
        description=f"sample {sample}",
    )


def sample_model_path(sample: str = "digits_v1") -> Path:
    from edgeota.samples import load_catalog

    return Path(load_catalog()[sample].path)


# ---------------------------------------------------------------- structure-aware mutations
# A parser of JSON or TOML written in C (json) or guarded by a syntax check
# first rejects almost every random byte string; editing one node of a real
# document instead keeps the rest intact and reaches the checks behind the
# syntax. Used by the atheris custom mutator and by the hypothesis properties.


@dataclass(frozen=True)
class RawJson:
    """JSON text put in a document as it is: what ``json.dumps`` refuses to write."""

    text: str


# Hostile values a JSON parser meets that no serialiser writes: integers past
# CPython's 4300-digit conversion limit, nesting past its recursion limit, the
# non-standard constants, a float that overflows, an integer beyond any float,
# a lone surrogate, a duplicate key, the edges of 64-bit integers.
HOSTILE_JSON = (
    RawJson("9" * 4301),
    RawJson("-" + "9" * 4400),
    RawJson("[" * 1200 + "]" * 1200),
    RawJson('{"a":' * 700 + "0" + "}" * 700),
    RawJson("NaN"),
    RawJson("Infinity"),
    RawJson("-Infinity"),
    RawJson("1e400"),
    RawJson("1" + "0" * 400),
    RawJson('"\\ud800"'),
    RawJson('{"k":1,"k":2}'),
    RawJson("18446744073709551616"),
    RawJson("9223372036854775808"),
    RawJson("-9223372036854775809"),
)
_BOUNDARY_INTS = (0, 1, -1, 2, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32, 2**53 + 1,
                  2**63 - 1, 2**63, 2**64, -(2**63) - 1)
_ODD_STRINGS = ("", " ", "a" * 600, "\u00e9\u4e2d", "..", "../etc/passwd", "/abs", "a\x00b",
                "1.0.0", "digits", "\n", "\ud800", "rpi4", "x" * 70)
_TOML_ODD = (float("inf"), float("-inf"), float("nan"), 2**63 - 1, -(2**63), 0, -1, "",
             "a" * 300, "/abs/path", "../../etc/passwd", "x\x00y", "mqtts://[::1]:0",
             "http://", [], {}, True, 1.5)

ValueMaker = Callable[[random.Random, Any], Any]


def encode_json(value: Any) -> str:
    """Compact JSON of ``value``, with :class:`RawJson` parts written verbatim."""
    if isinstance(value, RawJson):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{encode_json(v)}"
                              for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(encode_json(v) for v in value) + "]"
    return json.dumps(value)


def json_paths(doc: Any, limit: int = 2000) -> list[tuple[Any, ...]]:
    """Nodes of a parsed document as key/index paths (the root is ``()``), at most ``limit``."""
    paths: list[tuple[Any, ...]] = [()]
    stack: list[tuple[tuple[Any, ...], Any]] = [((), doc)]
    while stack and len(paths) < limit:
        path, node = stack.pop()
        children = node.items() if isinstance(node, dict) else (
            enumerate(node) if isinstance(node, list) else ())
        for key, child in children:
            paths.append((*path, key))
            stack.append(((*path, key), child))
    return paths[:limit]


def _node(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def replaced(doc: Any, path: tuple[Any, ...], value: Any, *, delete: bool = False) -> Any:
    """A copy of ``doc`` with the node at ``path`` replaced by ``value`` (or deleted)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    copy: Any = dict(doc) if isinstance(doc, dict) else list(doc)
    if rest:
        copy[head] = replaced(doc[head], rest, value, delete=delete)
    elif delete:
        del copy[head]
    else:
        copy[head] = value
    return copy


def random_json(rng: random.Random, doc: Any, depth: int = 0) -> Any:
    """A JSON value likely to sit at the boundary of some check: an edge number, an odd
    string, a node spliced from elsewhere in ``doc``, a small container, a :data:`HOSTILE_JSON`."""
    pick = rng.randrange(10)
    if pick == 0:
        return rng.choice(HOSTILE_JSON)
    if pick == 1:
        return rng.choice(_BOUNDARY_INTS)
    if pick == 2:
        return rng.choice((0.5, -0.0, 1e308, -1.5, 1e-320, 3.0))
    if pick == 3:
        return rng.choice(_ODD_STRINGS)
    if pick == 4:
        return rng.choice((None, True, False))
    if pick in (5, 6):  # values from the document itself pass most type checks
        return _node(doc, rng.choice(json_paths(doc)))
    if depth < 2 and pick == 7:
        return [random_json(rng, doc, depth + 1) for _ in range(rng.randrange(4))]
    if depth < 2 and pick == 8:
        return {rng.choice(("a", "name", "v", "")): random_json(rng, doc, depth + 1)
                for _ in range(rng.randrange(3))}
    return rng.randrange(-1000, 1000)


def random_toml(rng: random.Random, doc: Any, depth: int = 0) -> Any:
    """A TOML value (TOML has no null) at a boundary, or one spliced from ``doc``."""
    pick = rng.randrange(7)
    if pick == 0:
        return rng.choice(_TOML_ODD)
    if pick in (1, 2):
        return _node(doc, rng.choice(json_paths(doc)))
    if pick == 3:
        return rng.choice(_ODD_STRINGS)
    if pick == 4:
        return rng.choice((dt.datetime(1979, 5, 27, 7, 32, tzinfo=dt.UTC), dt.date(1, 1, 1),
                           dt.time(23, 59, 59)))
    if pick == 5 and depth < 2:
        return {rng.choice(("a", "id", "url")): random_toml(rng, doc, depth + 1)}
    if depth < 2:
        return [random_toml(rng, doc, depth + 1) for _ in range(rng.randrange(3))]
    return rng.randrange(-5, 70000)


def mutated(doc: Any, rng: random.Random, values: ValueMaker) -> Any:
    """``doc`` with one node replaced, deleted, tweaked or given a sibling (``values`` makes
    the new values)."""
    path = rng.choice(json_paths(doc))
    node = _node(doc, path)
    action = rng.randrange(5)
    if action == 0 and path:
        return replaced(doc, path, None, delete=True)
    if action == 1:
        parent = path if isinstance(node, dict) else path[:-1]
        container = _node(doc, parent)
        if isinstance(container, list):
            return replaced(doc, parent, [*container, values(rng, doc)])
        if isinstance(container, dict):
            key = rng.choice(("extra", "v", "name", "url", ""))
            return replaced(doc, (*parent, key), values(rng, doc))
    if action == 2 and isinstance(node, int) and not isinstance(node, bool):
        return replaced(doc, path, node + rng.choice((-1, 1, -node - 1, 2**32)))
    if action == 2 and isinstance(node, str) and node:
        at = rng.randrange(len(node))
        return replaced(doc, path, node[:at] + rng.choice(("", "X", ".", "/", "\u00ff", ":"))
                        + node[at + 1:])
    return replaced(doc, path, values(rng, doc))


def mutate_json(doc: Any, rng: random.Random) -> bytes:
    """:func:`mutated` with :func:`random_json` values, as JSON bytes."""
    return encode_json(mutated(doc, rng, random_json)).encode("utf-8", "surrogatepass")


def mutate_toml(doc: Any, rng: random.Random) -> bytes:
    """:func:`mutated` with :func:`random_toml` values, as TOML bytes.

    Raises:
        ValueError: the mutation cannot be written as TOML (the root replaced, ...).
    """
    import tomli_w

    new = mutated(doc, rng, random_toml)
    if not isinstance(new, dict):
        raise ValueError("a TOML document is a table")
    try:
        return tomli_w.dumps(new).encode("utf-8", "surrogatepass")
    except TypeError as e:
        raise ValueError(str(e)) from e


Structure = Callable[[bytes, random.Random], bytes]


def json_structure(data: bytes, rng: random.Random) -> bytes:
    """A structural mutation of a JSON input (raises if ``data`` is not JSON)."""
    return mutate_json(json.loads(data), rng)


def toml_structure(data: bytes, rng: random.Random) -> bytes:
    """A structural mutation of a TOML input (raises if ``data`` is not TOML)."""
    import tomllib  # here, not on top: a config harness imports it to be instrumented

    return mutate_toml(tomllib.loads(data.decode("utf-8")), rng)


def custom_mutator(structure: Structure) -> Callable[[bytes, int, int], bytes]:
    """An atheris custom mutator: ``structure`` edits of inputs it can read, else libFuzzer's."""

    def mutator(data: bytes, max_size: int, seed: int) -> bytes:
        import atheris

        rng = random.Random(seed)
        if rng.random() < 0.3:
            return bytes(atheris.Mutate(data, max_size))
        try:
            out = structure(data, rng)
        except Exception:  # not of that structure, or too deep to walk: mutate as bytes
            return bytes(atheris.Mutate(data, max_size))
        return out if len(out) <= max_size else bytes(atheris.Mutate(data, max_size))

    return mutator


def mutations(corpus: str, structure: Structure) -> Any:
    """A hypothesis strategy: a seed file of ``corpus`` through ``structure``."""
    from hypothesis import strategies as st

    def seed_files() -> list[bytes]:
        return [p.read_bytes() for p in sorted((CORPUS / corpus).glob("seed-*"))] or [b"{}"]

    @st.composite
    def draw_mutation(draw: Any, seeds: list[bytes]) -> bytes:
        seed = draw(st.sampled_from(seeds))
        rng = draw(st.randoms(use_true_random=False))
        for _ in range(8):  # a mutation that cannot be written (TOML has no null): another
            try:
                return structure(seed, rng)
            except Exception:
                continue
        return seed  # pragma: no cover - eight failures in a row

    # Deferred: the seed files are read when the first example is drawn, not on import.
    return st.deferred(lambda: draw_mutation(seed_files()))
