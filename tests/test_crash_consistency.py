"""Crash consistency: SIGKILL the agent anywhere in an update, restart it, and it still serves.

A real agent runs in its own process (``tests/crash_agent.py``) against a real
server and kills itself with SIGKILL at a chosen point: right after the journal
saved a given state, before the Nth durable write (``os.fsync``/``os.replace``),
or after a random delay. Then, as on a device after a power cut:

1. a fresh process only starts (journal recovery) and must serve the old model
   or the new one -- never nothing -- and exactly the one the journal on disk
   names (the new one only once it was committed);
2. a fresh process runs a normal cycle and must finish the update (2.0.0
   committed and served), with the journal idle again.

Mender-style, the per-state cases are a table: (crash state, model served after
the restart, outcome reported after the restart). Every random draw comes from a
fixed seed and its kill point is in the assertion message, so a failure replays
with ``--kill-at-write N`` by hand.

Between cases the device's state folder is restored from a snapshot taken when
v1 was committed (the report sequence number is kept, or the server would
refuse the reports as replays); v2 stays assigned on the server throughout.
Two devices take the random draws in parallel, one process each at a time.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from server_support import RunningServer, running_server

AGENT_SCRIPT = Path(__file__).with_name("crash_agent.py")
CHILD_TIMEOUT = 60.0  # seconds, per agent process; a normal run takes about one
SIGKILLED = -9  # subprocess return code of a process killed by SIGKILL
OLD, NEW = "1.0.0", "2.0.0"
# The v2 release raises the anti-rollback counter; v1 has counter 1.
OLD_COUNTER, NEW_COUNTER = 1, 2
SEED = 20240611
WRITE_DRAWS = 44
TIMER_DRAWS = 12
DOUBLE_CRASH_EVERY = 4  # every 4th draw also kills its first recovery
# A write kill always fires; a timer kill only if the run is still going, and runs
# vary by +-20 % around the measured one on a shared machine (timers draw from 90 %).
MIN_TIMER_KILLS = TIMER_DRAWS // 4


@dataclass(frozen=True)
class Run:
    """One agent process: how it ended and the JSON line it printed (if it got there)."""

    args: tuple[str, ...]
    returncode: int
    result: dict[str, Any] | None
    stderr: str

    def describe(self) -> str:
        return (f"crash_agent {' '.join(self.args)} -> rc {self.returncode}, "
                f"result {self.result}, stderr tail:\n{self.stderr[-2000:]}")


@dataclass(frozen=True)
class Device:
    device_id: str
    folder: Path

    @property
    def config(self) -> Path:
        return self.folder / "agent.toml"

    @property
    def state(self) -> Path:
        return self.folder / "state"

    @property
    def snapshot(self) -> Path:
        return self.folder / "state-v1-committed"

    def agent(self, *args: str) -> Run:
        argv = ("--config", str(self.config), *args)
        process = subprocess.run(
            [sys.executable, str(AGENT_SCRIPT), *argv],
            capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False,
        )
        lines = process.stdout.strip().splitlines()
        result = json.loads(lines[-1]) if lines else None
        return Run(argv, process.returncode, result, process.stderr)

    def take_snapshot(self) -> None:
        shutil.copytree(self.state, self.snapshot)

    def reset(self) -> None:
        """Back to "v1 committed, idle"; the report counter only ever moves forward."""
        seq = (self.state / "report-seq").read_bytes()
        shutil.rmtree(self.state)
        shutil.copytree(self.snapshot, self.state)
        (self.state / "report-seq").write_bytes(seq)

    def journal(self) -> dict[str, Any]:
        return json.loads((self.state / "journal-digits.json").read_bytes())

    def release_floor(self) -> int:
        return int((self.state / "release-floor").read_text())


@dataclass(frozen=True)
class Fleet:
    server: RunningServer
    devices: tuple[Device, ...]
    points: int  # durable-write points of one whole v2 update
    seconds: float  # how long that update took, from hook install to exit

    def reported(self, device: Device) -> dict[str, Any]:
        fleet = json.loads(self.server.cli("fleet", "status", "--json").out)
        return next(d["reported_state"] for d in fleet if d["id"] == device.device_id)


def served_after_restart(journal: dict[str, Any]) -> str:
    """The rule a restart must follow: the new model only once the journal committed it."""
    if journal["state"] == "committed":
        return journal["target"]["version"]
    return journal["previous"]["version"]


def resumed_state(journal: dict[str, Any]) -> str:
    """The journal state a restart leaves: an update before its swap stays to go on."""
    return {"downloading": "downloading", "verifying": "verifying",
            "validating": "verifying"}.get(journal["state"], "idle")


def label(journal: dict[str, Any]) -> str:
    if journal["state"] == "idle":
        return f"idle({journal['previous']['version']})"
    return journal["state"]


def assert_finished(run: Run, device: Device) -> None:
    """A normal run after a crash: v2 committed, served, the journal idle on it."""
    assert run.returncode == 0, run.describe()
    assert run.result is not None, run.describe()
    assert run.result["serving"] == NEW, run.describe()
    assert run.result["journal"]["state"] == "idle", run.describe()
    assert run.result["journal"]["previous"] == NEW, run.describe()
    assert device.journal()["previous"]["version"] == NEW


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Two devices with v1 committed (snapshotted), then v2 published and assigned.

    Module-scoped (SQLite only) so the server, the enrolments and the v1 install
    are paid once for every case; each case restores the device from the snapshot.
    """
    tmp = tmp_path_factory.mktemp("crash")
    with running_server(tmp, f"sqlite:///{tmp / 'edgeota.db'}") as server:
        devices = tuple(Device(d, server.enroll(d)) for d in ("pi-1", "pi-2"))
        ids = ",".join(d.device_id for d in devices)
        assert server.publish("digits_v1", OLD).code == 0
        assert server.cli("deploy", f"digits@{OLD}", "--devices", ids).code == 0
        for device in devices:
            run = device.agent()
            assert run.returncode == 0, run.describe()
            assert run.result is not None
            assert run.result["probation"] == {"digits": "committed"}, run.describe()
            assert run.result["serving"] == OLD
            assert device.release_floor() == OLD_COUNTER
            device.take_snapshot()
        assert server.publish("digits_v2", NEW, "--bump-counter").code == 0
        assert server.cli("deploy", f"digits@{NEW}", "--devices", ids).code == 0
        # Measure one whole, uninterrupted v2 update: the range the kill points come from.
        measured = devices[0]
        run = measured.agent()
        assert_finished(run, measured)
        assert run.result is not None
        assert measured.release_floor() == NEW_COUNTER
        measured.reset()
        yield Fleet(server, devices, run.result["points"], run.result["elapsed"])


# (state the journal saved just before the kill, model served after the restart,
#  journal state after the restart, outcome the restart reports as (state, error) or
#  None: it reports nothing (the device's last report stands), the steps the next
#  cycle runs).
UPDATE_STEPS = ["downloading", "verifying", "validating", "swapping", "probation"]
STATE_CASES = [
    # Before the swap the live model was never touched: the update stays where it
    # was and the next cycle goes on with it -- the download resumes, a downloaded
    # bundle is opened and verified again (never fetched again), and a crash while
    # validating goes back to verifying (the unpacked files are not trusted).
    ("downloading", OLD, "downloading", None, UPDATE_STEPS),
    ("verifying", OLD, "verifying", None, UPDATE_STEPS[1:]),
    ("validating", OLD, "verifying", None, UPDATE_STEPS[1:]),
    # From the swap on, a crash counts as a failed probation (the new model may be
    # what crashed the agent): rolled back to v1. Nothing marks v2 as refused, so
    # the next cycle installs v2 again while the director still assigns it.
    ("swapping", OLD, "idle", ("rolled_back", "crash_during_swap"), UPDATE_STEPS),
    ("probation", OLD, "idle", ("rolled_back", "crash_during_probation"), UPDATE_STEPS),
    # Committed before the kill: the restart serves v2 and reports the outcome.
    ("committed", NEW, "idle", ("committed", None), []),
    # The outcome was already reported; the restart has nothing left to do.
    ("idle", NEW, "idle", ("committed", None), []),
]


def test_the_state_cases_cover_every_journal_state_with_work() -> None:
    """Every state whose work the runner does is killed in, and the table names them all."""
    from edgeota.agent.journal import TERMINAL_STATES, State
    from edgeota.agent.runner import STEPS

    assert [str(s) for s in STEPS] == UPDATE_STEPS
    killed = {case[0] for case in STATE_CASES}
    assert {str(s) for s in STEPS} <= killed
    # The other states are outcomes (one is killed in: committed) and idle.
    assert {str(s) for s in State} - killed <= {str(s) for s in TERMINAL_STATES}


@pytest.mark.parametrize(("crash_state", "served", "after_restart", "reported", "steps"),
                         STATE_CASES, ids=[case[0] for case in STATE_CASES])
def test_kill_right_after_each_journal_state(
    fleet: Fleet, crash_state: str, served: str, after_restart: str,
    reported: tuple[str, str | None] | None, steps: list[str],
) -> None:
    device = fleet.devices[0]
    device.reset()

    killed = device.agent("--kill-at-state", crash_state)
    assert killed.returncode == SIGKILLED, killed.describe()
    on_disk = device.journal()
    assert on_disk["state"] == crash_state
    if crash_state == "idle":
        assert on_disk["previous"]["version"] == NEW
    before = fleet.reported(device)

    restarted = device.agent("--mode", "report")
    assert restarted.returncode == 0, restarted.describe()
    assert restarted.result is not None
    assert restarted.result["serving"] == served, restarted.describe()
    assert restarted.result["journal"]["state"] == after_restart, restarted.describe()
    state = fleet.reported(device)
    if reported is None:
        assert state == before  # nothing failed: the update goes on
    else:
        assert (state["state"], state["error"]) == reported

    finished = device.agent()
    assert_finished(finished, device)
    assert finished.result is not None
    assert finished.result["steps"] == steps, finished.describe()
    if served == NEW:
        assert finished.result["states"] == {"digits": "current"}, finished.describe()
    else:  # v2's update goes on (or starts again) and passes probation
        assert finished.result["states"] == {"digits": "probation"}, finished.describe()
        assert finished.result["probation"] == {"digits": "committed"}, finished.describe()
        # Anti-rollback floor raised with the commit (the "committed" case: see below).
        assert device.release_floor() == NEW_COUNTER
        state = fleet.reported(device)
        assert (state["state"], state["release"]) == ("committed", f"digits@{NEW}")
    assert fleet.reported(device)["state"] == "committed"


@pytest.mark.parametrize("step", UPDATE_STEPS[:3])
def test_kill_inside_each_step_before_the_swap_goes_on_from_it(fleet: Fleet, step: str) -> None:
    """Killed while a step's work runs: the restart serves v1 and the next cycle goes on."""
    device = fleet.devices[0]
    device.reset()
    killed = device.agent("--kill-in-step", step)
    assert killed.returncode == SIGKILLED, killed.describe()
    assert device.journal()["state"] == step
    restarted = device.agent("--mode", "report")
    assert restarted.returncode == 0 and restarted.result is not None, restarted.describe()
    assert restarted.result["serving"] == OLD
    finished = device.agent()
    assert_finished(finished, device)
    assert finished.result is not None
    expected = UPDATE_STEPS[UPDATE_STEPS.index(min(step, "verifying", key=UPDATE_STEPS.index)):]
    assert finished.result["steps"] == expected, finished.describe()


def test_release_floor_survives_a_kill_right_after_commit(fleet: Fleet) -> None:
    device = fleet.devices[0]
    device.reset()
    assert device.agent("--kill-at-state", "committed").returncode == SIGKILLED
    assert device.agent("--mode", "report").returncode == 0
    assert_finished(device.agent(), device)
    assert device.release_floor() == NEW_COUNTER


def test_recovered_outcome_names_its_release(fleet: Fleet) -> None:
    device = fleet.devices[0]
    device.reset()
    assert device.agent("--kill-at-state", "committed").returncode == SIGKILLED
    assert device.agent("--mode", "report").returncode == 0
    state = fleet.reported(device)
    assert (state["state"], state["release"]) == ("committed", f"digits@{NEW}")


@dataclass(frozen=True)
class Draw:
    """One random kill point: ``--kill-at-write N`` or ``--kill-after-seconds T``."""

    index: int
    args: tuple[str, ...]
    recovery_kill: int | None  # also kill the first restart before this durable write


def draws(fleet: Fleet) -> list[Draw]:
    rng = random.Random(SEED)
    kills = [("--kill-at-write", str(rng.randint(1, fleet.points)))
             for _ in range(WRITE_DRAWS)]
    kills += [("--kill-after-seconds", f"{rng.uniform(0.0, 0.9 * fleet.seconds):.3f}")
              for _ in range(TIMER_DRAWS)]
    return [
        Draw(i, kill, rng.randint(1, 4) if i % DOUBLE_CRASH_EVERY == 0 else None)
        for i, kill in enumerate(kills)
    ]


@dataclass(frozen=True)
class Outcome:
    draw: Draw
    killed: bool
    before_restart: str  # journal state the kill left on disk
    served: str
    recovery_killed: bool
    floor_kept: bool


def crash_and_restart(device: Device, draw: Draw) -> Outcome:
    device.reset()
    where = f"draw {draw.index} (seed {SEED}) on {device.device_id}: {' '.join(draw.args)}"

    killed = device.agent(*draw.args)
    # A timer may fire after a (fast) run already finished; a write kill always fires.
    allowed = {SIGKILLED} if draw.args[0] == "--kill-at-write" else {SIGKILLED, 0}
    assert killed.returncode in allowed, f"{where}: {killed.describe()}"
    journal = device.journal()
    expected = served_after_restart(journal)

    recovery_killed = False
    if draw.recovery_kill is not None:
        # Power lost again while recovering: the next restart must still get it right.
        first = device.agent("--mode", "report", "--kill-at-write", str(draw.recovery_kill))
        assert first.returncode in {SIGKILLED, 0}, f"{where}: {first.describe()}"
        recovery_killed = first.returncode == SIGKILLED

    restarted = device.agent("--mode", "report")
    assert restarted.returncode == 0, f"{where}: {restarted.describe()}"
    assert restarted.result is not None
    served = restarted.result["serving"]
    assert served in {OLD, NEW}, f"{where}: serves neither model: {restarted.describe()}"
    assert served == expected, (
        f"{where}: journal {label(journal)} says serve {expected}: {restarted.describe()}")
    # An update cut before its swap waits for the next cycle to go on; anything
    # else is over once the restart has recovered it.
    left = restarted.result["journal"]["state"]
    assert left == resumed_state(journal), (
        f"{where}: {restarted.describe()}")

    finished = device.agent()
    try:
        assert_finished(finished, device)
    except AssertionError as e:
        raise AssertionError(f"{where}: the update did not finish after the crash") from e
    return Outcome(draw, killed.returncode == SIGKILLED, label(journal), served,
                   recovery_killed, device.release_floor() == NEW_COUNTER)


def test_kill_at_random_points_then_restart(fleet: Fleet) -> None:
    plan = draws(fleet)
    shares = [plan[i::len(fleet.devices)] for i in range(len(fleet.devices))]

    def work(device: Device, share: list[Draw]) -> list[Outcome]:
        return [crash_and_restart(device, draw) for draw in share]

    with ThreadPoolExecutor(len(fleet.devices)) as pool:
        futures = [pool.submit(work, d, s) for d, s in zip(fleet.devices, shares, strict=True)]
        outcomes = [o for f in futures for o in f.result()]

    kills = sum(o.killed for o in outcomes)
    write_kills = sum(o.killed for o in outcomes if o.draw.args[0] == "--kill-at-write")
    states = Counter(o.before_restart for o in outcomes if o.killed)
    served = Counter(o.served for o in outcomes if o.killed)
    lost_floor = [o.draw.args for o in outcomes if not o.floor_kept]
    print(f"\n{kills} kills of {len(outcomes)} draws over {fleet.points} durable-write points "
          f"({fleet.seconds:.2f} s per update); journal left in {dict(states)}; "
          f"restart served {dict(served)}; "
          f"{sum(o.recovery_killed for o in outcomes)} recoveries killed too; "
          f"release floor lost by {lost_floor}")
    assert write_kills == WRITE_DRAWS
    assert kills - write_kills >= MIN_TIMER_KILLS
    # The draws reach every part of the cycle: before it, mid-install, after commit.
    assert {"idle(1.0.0)", "downloading", "committed"} <= set(states), states
    assert served[OLD] and served[NEW], served
