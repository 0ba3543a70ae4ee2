"""``make fuzz``: run every harness in ``tests/fuzz/`` for a while, keep what it found.

For each ``fuzz_<target>.py`` (or those named with ``--targets``):

1. atheris for ``--seconds``, from the saved corpus plus a working corpus in
   ``build/fuzz/<target>/`` (kept between runs, so a second run goes on
   where the first stopped). A crash, timeout or out-of-memory input is
   written into ``tests/fuzz/corpus/<target>/`` (``crash-<sha1>`` ...), where
   the pytest replay picks it up as a regression case; the run of that
   harness ends there, as libFuzzer's do.
2. a set-cover merge of the saved and the working corpus: the smallest inputs
   that cover everything found so far, of which the saved corpus keeps the
   smallest up to ``--corpus-kib`` (besides its seeds and failures), so the
   repository's copy stays a few hundred KiB; the working corpus keeps all.
3. its hypothesis properties (``--property``) for ``--property-seconds``.

A table of executions, corpus sizes and failures per harness is printed and
written to ``build/fuzz/summary.txt``; the exit status is 1 if anything failed.
The log of each run is ``build/fuzz/<target>.log``.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fuzz_support import CORPUS, FAILURE_PREFIXES, FUZZ_DIR, SCRATCH

_STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.M)
_DONE = re.compile(r"^Done (\d+) runs in (\d+) second", re.M)


@dataclass
class Outcome:
    target: str
    seconds: float = 0.0
    executions: int = 0
    peak_rss_mb: int = 0
    corpus_before: int = 0
    corpus_after: int = 0
    failures: tuple[str, ...] = ()
    exit_code: int = 0
    properties: str = "-"

    @property
    def ok(self) -> bool:
        return not self.failures and self.exit_code == 0 and self.properties in ("-", "passed")


def harness_files(targets: list[str] | None) -> list[Path]:
    files = sorted(p for p in FUZZ_DIR.glob("fuzz_*.py") if p.name != "fuzz_support.py")
    if targets:
        wanted = {f"fuzz_{t}.py" for t in targets}
        unknown = wanted - {p.name for p in files}
        if unknown:
            raise SystemExit(f"no such harness: {sorted(unknown)}")
        files = [p for p in files if p.name in wanted]
    return files


def _saved(target: str) -> set[str]:
    folder = CORPUS / target
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def _kept(name: str) -> bool:
    """Files the saved corpus always keeps: the seeds and every failure ever found."""
    return name.startswith(("seed-", *FAILURE_PREFIXES))


def minimize(path: Path, target: str, budget: int, out: IO[str]) -> None:
    """Replace the saved corpus's found inputs by the smallest of a set cover, up to ``budget``.

    The cover is taken over the saved corpus and the working one, so nothing
    found in an earlier run is lost unless something smaller covers it.
    """
    saved, work = CORPUS / target, SCRATCH / target
    merged = SCRATCH / f"{target}.merged"
    shutil.rmtree(merged, ignore_errors=True)
    merged.mkdir(parents=True)
    run = subprocess.run([sys.executable, "-W", "ignore", str(path), "-set_cover_merge=1",
                          str(merged), str(saved), str(work)],
                         stdout=out, stderr=subprocess.STDOUT, timeout=900, check=False)
    if run.returncode != 0:  # keep the saved corpus as it was
        out.write(f"\nset-cover merge failed ({run.returncode}): saved corpus unchanged\n")
        return
    known = {hashlib.sha1(p.read_bytes()).hexdigest()  # the names libFuzzer gives inputs
             for p in saved.iterdir() if _kept(p.name)}
    for p in saved.iterdir():
        if not _kept(p.name):
            p.unlink()
    used = 0
    for p in sorted(merged.iterdir(), key=lambda p: (p.stat().st_size, p.name)):
        size = p.stat().st_size
        if p.name in known or used + size > budget:
            continue
        shutil.copyfile(p, saved / p.name)
        used += size
    shutil.rmtree(merged)


def run_one(path: Path, seconds: int, property_seconds: int, budget: int) -> Outcome:
    target = path.stem.removeprefix("fuzz_")
    work = SCRATCH / target
    work.mkdir(parents=True, exist_ok=True)
    (CORPUS / target).mkdir(parents=True, exist_ok=True)
    log = SCRATCH / f"{target}.log"
    before = _saved(target)
    outcome = Outcome(target, corpus_before=len(before))
    python = [sys.executable, "-W", "ignore", str(path)]
    started = time.monotonic()
    with log.open("w") as out:
        run = subprocess.run(
            [*python, f"-max_total_time={seconds}", "-print_final_stats=1", str(work),
             str(CORPUS / target)],
            stdout=out, stderr=subprocess.STDOUT, timeout=seconds + 300, check=False)
    outcome.seconds = time.monotonic() - started
    outcome.exit_code = run.returncode
    text = log.read_text(errors="replace")
    stats = {k: int(v) for k, v in _STAT.findall(text)}
    outcome.executions = stats.get("number_of_executed_units", 0)
    outcome.peak_rss_mb = stats.get("peak_rss_mb", 0)
    if not outcome.executions and (done := _DONE.search(text)):
        outcome.executions = int(done.group(1))
    outcome.failures = tuple(sorted(n for n in _saved(target) - before
                                    if n.startswith(FAILURE_PREFIXES)))
    with log.open("a") as out:
        minimize(path, target, budget, out)
    outcome.corpus_after = len(_saved(target))
    if property_seconds > 0:
        prop = subprocess.run([*python, "--property", f"--seconds={property_seconds}"],
                              capture_output=True, text=True, timeout=property_seconds + 600,
                              check=False)
        with log.open("a") as out:
            out.write(prop.stdout + prop.stderr)
        if "no properties" in prop.stdout:
            outcome.properties = "-"
        else:
            outcome.properties = "passed" if prop.returncode == 0 else "FAILED"
        outcome.failures += tuple(sorted(n for n in _saved(target) - before
                                         if n.startswith(FAILURE_PREFIXES)
                                         and n not in outcome.failures))
    return outcome


def table(outcomes: list[Outcome]) -> str:
    rows = [f"{'harness':<15} {'seconds':>7} {'executions':>11} {'exec/s':>7} {'rss MB':>6} "
            f"{'corpus':>11} {'failures':>8}  properties"]
    for o in outcomes:
        rate = o.executions / o.seconds if o.seconds else 0
        rows.append(f"{o.target:<15} {o.seconds:>7.0f} {o.executions:>11} {rate:>7.0f} "
                    f"{o.peak_rss_mb:>6} {o.corpus_before:>5}->{o.corpus_after:<5} "
                    f"{len(o.failures):>8}  {o.properties}")
    total_s = sum(o.seconds for o in outcomes)
    total_x = sum(o.executions for o in outcomes)
    rows.append(f"{'total':<15} {total_s:>7.0f} {total_x:>11}")
    for o in outcomes:
        for name in o.failures:
            rows.append(f"  {o.target}: tests/fuzz/corpus/{o.target}/{name}")
        if o.exit_code not in (0, None) and not o.failures:
            rows.append(f"  {o.target}: atheris exited {o.exit_code}; see "
                        f"build/fuzz/{o.target}.log")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60, help="atheris time per harness")
    parser.add_argument("--property-seconds", type=int, default=None,
                        help="hypothesis time per harness (default: a quarter of --seconds)")
    parser.add_argument("--targets", default="", help="comma-separated harness names")
    parser.add_argument("--corpus-kib", type=int, default=24,
                        help="found inputs the saved corpus keeps per harness (KiB)")
    parser.add_argument("--minimize-only", action="store_true",
                        help="only re-minimize the saved corpora from the working ones")
    args = parser.parse_args()
    budget = args.corpus_kib * 1024
    if args.minimize_only:
        for path in harness_files([t for t in args.targets.split(",") if t]):
            target = path.stem.removeprefix("fuzz_")
            (SCRATCH / target).mkdir(parents=True, exist_ok=True)
            with (SCRATCH / f"{target}.log").open("a") as out:
                minimize(path, target, budget, out)
            print(f"{target}: {len(_saved(target))} files, "
                  f"{sum(p.stat().st_size for p in (CORPUS / target).iterdir())} bytes")
        return 0
    property_seconds = (args.seconds // 4 if args.property_seconds is None
                        else args.property_seconds)
    outcomes = []
    for path in harness_files([t for t in args.targets.split(",") if t]):
        print(f"== {path.name}: {args.seconds} s of atheris, {property_seconds} s of properties",
              flush=True)
        outcome = run_one(path, args.seconds, property_seconds, budget)
        outcomes.append(outcome)
        print(f"   {outcome.executions} executions, corpus {outcome.corpus_before} -> "
              f"{outcome.corpus_after}, failures {len(outcome.failures)}, properties "
              f"{outcome.properties}", flush=True)
    summary = table(outcomes)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    (SCRATCH / "summary.txt").write_text(summary + "\n")
    print(summary)
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
