"""A real agent in its own process, for the crash-consistency tests: it can SIGKILL itself.

Run as ``python tests/crash_agent.py --config DEVICE/agent.toml --mode update|report``.

* ``update`` -- ``start()`` (journal recovery), one ``run_cycle()``, a few
  predictions, ``check_probation()``: a whole update as the device runs it.
* ``report`` -- ``start()`` only: what a freshly booted device serves after
  recovering its journal, without asking the server for anything new.

Either mode prints one JSON line on stdout (what it serves, the journal state on
disk, the cycle outcome, how many durable-write points it passed, elapsed time).

Crash hooks, installed in this process only (a kill is ``SIGKILL``: no
``finally``, no ``atexit``, exactly what a power cut leaves behind for a
process, minus the page cache):

* ``--kill-at-write N`` -- die just *before* the Nth durable-write point, a call
  of ``os.fsync`` or ``os.replace`` (every atomic write in edgeota, ngclient's
  metadata cache and the bundle unpacker go through them). ``N`` counts from
  the moment the hooks are installed; ``--mode update`` with no kill reports
  the total as ``points``, which is the range the tests draw from.
* ``--kill-at-state STATE`` -- die right after the journal saved a record in
  ``STATE`` (after the write is on disk, before the work of the state starts),
  through the agent's public ``on_journal_saved`` hook.
* ``--kill-in-step STATE`` -- die inside the work of ``STATE`` (the agent's
  ``on_step`` hook: the state is saved and its work has begun).

``update`` also prints ``steps``: the journal states whose work the cycle ran,
in order (a restart that goes on with an update shows where it went on).
* ``--kill-after-seconds T`` -- a timer thread kills the process ``T`` seconds
  after the hooks are installed, wherever it is.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from edgeota.agent.config import AgentConfig
from edgeota.agent.journal import JournalRecord, State
from edgeota.agent.model_host import UnknownModelError
from edgeota.agent.runner import Agent, AgentSettings
from edgeota.samples import load_test_split

MODEL = "digits"
SETTINGS = AgentSettings(probation_seconds=0, probation_min_inferences=3, report_timeout=10.0)


def die() -> None:
    """SIGKILL this process: nothing after this line runs, not even buffered output."""
    os.kill(os.getpid(), signal.SIGKILL)


class WriteCounter:
    """Counts durable-write points (``os.fsync``, ``os.replace``); kills before the Nth."""

    def __init__(self, kill_at: int | None) -> None:
        self.count = 0
        self._kill_at = kill_at
        self._lock = threading.Lock()

    def install(self) -> None:
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd):  # type: ignore[no-untyped-def]
            self._tick()
            return real_fsync(fd)

        def replace(src, dst, **kwargs):  # type: ignore[no-untyped-def]
            self._tick()
            return real_replace(src, dst, **kwargs)

        os.fsync = fsync  # type: ignore[assignment]
        os.replace = replace  # type: ignore[assignment]

    def _tick(self) -> None:
        with self._lock:
            self.count += 1
            if self.count == self._kill_at:
                die()


def kill_after_state(agent: Agent, state: str) -> None:
    """Die once the journal has saved a record in ``state`` (the agent's public hook)."""

    def saved(_name: str, record: JournalRecord) -> None:
        if str(record.state) == state:
            die()

    agent.on_journal_saved = saved


def watch_steps(agent: Agent, kill_in: str | None) -> list[str]:
    """The states whose work the agent starts, in order; die inside ``kill_in``'s."""
    steps: list[str] = []

    def step(_name: str, state: State) -> None:
        steps.append(str(state))
        if str(state) == kill_in:
            die()

    agent.on_step = step
    return steps


def serving(agent: Agent) -> str | None:
    try:
        return agent.host.current_version(MODEL)
    except UnknownModelError:
        return None


def journal_on_disk(agent: Agent) -> dict[str, object] | None:
    path = agent.config.state_dir / f"journal-{MODEL}.json"
    if not path.exists():
        return None
    doc = json.loads(path.read_bytes())
    return {
        "state": doc["state"],
        "reason": doc["reason"],
        "previous": (doc["previous"] or {}).get("version"),
        "target": (doc["target"] or {}).get("version"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--mode", choices=("update", "report"), default="update")
    parser.add_argument("--kill-at-write", type=int, default=None)
    parser.add_argument("--kill-at-state", default=None)
    parser.add_argument("--kill-in-step", default=None)
    parser.add_argument("--kill-after-seconds", type=float, default=None)
    parser.add_argument("--inferences", type=int, default=5)
    args = parser.parse_args(argv)

    counter = WriteCounter(args.kill_at_write)
    counter.install()
    started = time.monotonic()
    if args.kill_after_seconds is not None:
        timer = threading.Timer(args.kill_after_seconds, die)
        timer.daemon = True
        timer.start()

    agent = Agent(AgentConfig.load(args.config), SETTINGS, transport="http")
    if args.kill_at_state:
        kill_after_state(agent, args.kill_at_state)
    steps = watch_steps(agent, args.kill_in_step)
    agent.start()
    result: dict[str, object] = {"mode": args.mode, "after_start": serving(agent)}
    if args.mode == "update":
        outcome = agent.run_cycle()
        result["states"] = outcome.states
        result["steps"] = list(steps)
        result["reasons"] = outcome.reasons
        if serving(agent) is not None:
            x, _ = load_test_split()
            for row in range(args.inferences):
                agent.host.predict(MODEL, {"input": x[row:row + 1]})
        result["probation"] = agent.check_probation()
    result.update(
        serving=serving(agent),
        journal=journal_on_disk(agent),
        points=counter.count,
        elapsed=time.monotonic() - started,
    )
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
