"""``make fuzz``: run every harness in ``tests/fuzz/`` for a while, keep what it found.

For each ``fuzz_<target>.py`` (or those named with ``--targets``):

1. atheris for ``--seconds``, from the saved corpus plus a working corpus in
   ``build/fuzz/<target>/`` (kept between runs, so a second run goes on
   where the first stopped). A crash, timeout or out-of-memory input is
   written into ``tests/fuzz/corpus/<target>/`` (``crash-<sha1>`` ...), where
   the pytest replay picks it up as a regression case; the run of that
   harness ends there, as libFuzzer's do.
2. ``-merge=1`` of the working corpus into the saved one: only inputs that
   add coverage are kept, so the saved corpus stays small.
3. its hypothesis properties (``--property``) for ``--property-seconds``.

A table of executions, corpus sizes and failures per harness is printed and
written to ``build/fuzz/summary.txt``; the exit status is 1 if anything failed.
The log of each run is ``build/fuzz/<target>.log``.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

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


def run_one(path: Path, seconds: int, property_seconds: int) -> Outcome:
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
    with log.open("a") as out:  # keep only what adds coverage
        subprocess.run([*python, "-merge=1", str(CORPUS / target), str(work)],
                       stdout=out, stderr=subprocess.STDOUT, timeout=600, check=False)
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
    args = parser.parse_args()
    property_seconds = (args.seconds // 4 if args.property_seconds is None
                        else args.property_seconds)
    outcomes = []
    for path in harness_files([t for t in args.targets.split(",") if t]):
        print(f"== {path.name}: {args.seconds} s of atheris, {property_seconds} s of properties",
              flush=True)
        outcome = run_one(path, args.seconds, property_seconds)
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
