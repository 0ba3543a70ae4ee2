"""The update journal: transition table, save-on-enter, atomic writes, crash recovery, save cap.

Crash tests are table-driven in the Mender style: (case, events that lead to
the crash state, expected recovery action, state after the restart is saved).
A "crash" is a fresh ``Journal`` loading the same file, which is all a
rebooted agent has.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from edgeota.agent.journal import (
    HISTORY_LIMIT,
    MAX_JOURNAL_BYTES,
    REASON_CORRUPT_JOURNAL,
    REASON_CRASH_IN_PROBATION,
    REASON_CRASH_IN_SWAP,
    REASON_STATE_LOOP,
    RECOVERY,
    TRANSITIONS,
    CorruptJournalError,
    Event,
    IllegalTransitionError,
    Journal,
    JournalRecord,
    ModelRef,
    RecoveryAction,
    State,
    StateLoopError,
    model_to_serve,
    models_to_keep,
    record_is_terminal,
    recovery_action,
)
from edgeota.protocol.files import atomic_write

S, E, A = State, Event, RecoveryAction

OLD = ModelRef("digits/1.0.0.bundle", "a" * 64, "digits", "1.0.0", 1, "/models/digits/1.0.0")
NEW = ModelRef("digits/2.0.0.bundle", "b" * 64, "digits", "2.0.0", 2)
START = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

# Written out by hand on purpose: the test is that the module's table is
# exactly this design, not a copy of itself.
EXPECTED_TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.IDLE, E.UPDATE_FOUND): S.DOWNLOADING,
    (S.DOWNLOADING, E.DOWNLOAD_DONE): S.VERIFYING,
    (S.DOWNLOADING, E.FAILURE): S.FAILED,
    (S.DOWNLOADING, E.RECOVERED): S.DOWNLOADING,
    (S.VERIFYING, E.VERIFIED): S.VALIDATING,
    (S.VERIFYING, E.FAILURE): S.FAILED,
    (S.VERIFYING, E.RECOVERED): S.VERIFYING,
    (S.VALIDATING, E.VALID): S.SWAPPING,
    (S.VALIDATING, E.FAILURE): S.FAILED,
    (S.VALIDATING, E.RECOVERED): S.VERIFYING,
    (S.SWAPPING, E.SWAPPED): S.PROBATION,
    (S.SWAPPING, E.FAILURE): S.ROLLED_BACK,
    (S.SWAPPING, E.RECOVERED): S.ROLLED_BACK,
    (S.PROBATION, E.PROBATION_PASSED): S.COMMITTED,
    (S.PROBATION, E.PROBATION_FAILED): S.ROLLED_BACK,
    (S.PROBATION, E.FAILURE): S.ROLLED_BACK,
    (S.PROBATION, E.RECOVERED): S.ROLLED_BACK,
    (S.COMMITTED, E.REPORTED): S.IDLE,
    (S.ROLLED_BACK, E.REPORTED): S.IDLE,
    (S.FAILED, E.REPORTED): S.IDLE,
}

EXPECTED_RECOVERY: dict[State, RecoveryAction] = {
    S.IDLE: A.NONE,
    S.DOWNLOADING: A.RESUME_DOWNLOAD,
    S.VERIFYING: A.REVERIFY_DOWNLOAD,
    S.VALIDATING: A.REVERIFY_DOWNLOAD,
    S.SWAPPING: A.REVERT_TO_PREVIOUS,
    S.PROBATION: A.REVERT_TO_PREVIOUS,
    S.COMMITTED: A.NONE,
    S.ROLLED_BACK: A.NONE,
    S.FAILED: A.NONE,
}

Step = tuple[Event, dict[str, Any]]
HAPPY: list[Step] = [
    (E.UPDATE_FOUND, {"target": NEW}),
    (E.DOWNLOAD_DONE, {}),
    (E.VERIFIED, {}),
    (E.VALID, {"target": replace(NEW, model_dir="/models/digits/2.0.0")}),
    (E.SWAPPED, {}),
    (E.PROBATION_PASSED, {}),
]
HAPPY_STATES = [S.DOWNLOADING, S.VERIFYING, S.VALIDATING, S.SWAPPING, S.PROBATION,
                S.COMMITTED]


class FakeClock:
    """A clock that moves one second per reading: distinct, ordered timestamps, no sleeps."""

    def __init__(self, start: datetime = START) -> None:
        self.now = start

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """A journal of a device already running OLD, as an enrolled device would be."""
    p = tmp_path / "state" / "journal.json"
    p.parent.mkdir()
    write_record(p, JournalRecord(S.IDLE, entered_at=START.isoformat(), previous=OLD))
    return p


def write_record(p: Path, record: JournalRecord) -> None:
    atomic_write(p, record.to_json(), mode=0o600)


def open_journal(p: Path, **kwargs: Any) -> Journal:
    journal = Journal(p, clock=FakeClock(), **kwargs)
    journal.load()
    return journal


def run(journal: Journal, steps: list[Step]) -> JournalRecord:
    record = journal.current
    for event, changes in steps:
        record = journal.transition(event, **changes)
    return record


def record_in(state: State) -> JournalRecord:
    """A valid record in ``state``, with the fields that state requires."""
    has_target = state is not S.IDLE
    return JournalRecord(
        state,
        entered_at=START.isoformat(),
        target=NEW if has_target else None,
        previous=OLD,
        reason="some_reason" if state in (S.FAILED, S.ROLLED_BACK) else None,
        update_id="0" * 32 if has_target else "",
        saves=1,
    )


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name != "journal.json"]


# --- the tables ------------------------------------------------------------


def test_transition_table_is_the_design() -> None:
    assert dict(TRANSITIONS) == EXPECTED_TRANSITIONS


def test_recovery_table_is_the_design_and_total() -> None:
    assert dict(RECOVERY) == EXPECTED_RECOVERY
    assert set(RECOVERY) == set(State)


def test_tables_are_immutable() -> None:
    with pytest.raises(TypeError):
        TRANSITIONS[(S.IDLE, E.SWAPPED)] = S.COMMITTED  # type: ignore[index]
    with pytest.raises(TypeError):
        RECOVERY[S.IDLE] = A.RESUME_DOWNLOAD  # type: ignore[index]


def test_every_state_is_reachable_and_every_non_terminal_state_can_fail() -> None:
    reached = {S.IDLE} | set(TRANSITIONS.values())
    assert reached == set(State)
    for state in State:
        if state is S.IDLE or record_is_terminal(state):
            continue
        assert TRANSITIONS[(state, E.FAILURE)] in (S.FAILED, S.ROLLED_BACK)
        assert (state, E.RECOVERED) in TRANSITIONS


@pytest.mark.parametrize(
    ("row", "expected"),
    sorted(EXPECTED_TRANSITIONS.items()),
    ids=[f"{s}-{e}" for s, e in sorted(EXPECTED_TRANSITIONS)],
)
def test_allowed_transition(path: Path, row: tuple[State, Event], expected: State) -> None:
    state, event = row
    write_record(path, record_in(state))
    journal = open_journal(path)
    changes: dict[str, Any] = {}
    if event is E.UPDATE_FOUND:
        changes["target"] = NEW
    if expected in (S.FAILED, S.ROLLED_BACK) and event is not E.RECOVERED:
        changes["reason"] = "test_reason"
    record = journal.transition(event, **changes)
    assert record.state is expected
    assert journal.current == record
    # Save-on-enter: what transition returned is already what is on disk.
    assert JournalRecord.from_json(path.read_bytes()) == record
    assert record.history[-1] == (expected, record.entered_at)
    # The known-good model is never dropped; a reported commit replaces it by the new one.
    assert record.previous == (NEW if state is S.COMMITTED else OLD)


@pytest.mark.parametrize(
    ("state", "event"),
    [(s, e) for s in State for e in Event if (s, e) not in EXPECTED_TRANSITIONS],
)
def test_illegal_transition_raises_and_writes_nothing(
    path: Path, state: State, event: Event
) -> None:
    write_record(path, record_in(state))
    before = path.read_bytes()
    journal = open_journal(path)
    with pytest.raises(IllegalTransitionError):
        journal.transition(event, target=NEW, reason="x")
    assert path.read_bytes() == before
    assert journal.current.state is state


def test_happy_path_walks_every_state_and_commits(path: Path) -> None:
    journal = open_journal(path)
    states = []
    for event, changes in HAPPY:
        states.append(journal.transition(event, **changes).state)
    assert states == HAPPY_STATES
    record = journal.current
    assert model_to_serve(record) == record.target
    assert record.target is not None and record.target.model_dir == "/models/digits/2.0.0"
    # Reporting the outcome makes the committed model the known-good one.
    idle = journal.transition(E.REPORTED)
    assert (idle.state, idle.target, idle.previous) == (S.IDLE, None, record.target)
    assert (idle.saves, idle.update_id) == (0, "")


@pytest.mark.parametrize("outcome", [E.PROBATION_FAILED, E.FAILURE])
def test_reporting_a_revert_keeps_the_previous_model(path: Path, outcome: Event) -> None:
    journal = open_journal(path)
    run(journal, HAPPY[:5])
    assert journal.transition(outcome, reason="latency").state is S.ROLLED_BACK
    idle = journal.transition(E.REPORTED)
    assert (idle.target, idle.previous, idle.reason) == (None, OLD, None)


def test_failure_needs_a_reason_and_other_states_refuse_one(path: Path) -> None:
    journal = open_journal(path)
    journal.begin(NEW)
    with pytest.raises(IllegalTransitionError):
        journal.transition(E.FAILURE)
    with pytest.raises(IllegalTransitionError):
        journal.transition(E.DOWNLOAD_DONE, reason="nothing")
    with pytest.raises(ValueError, match="reason code"):
        journal.transition(E.FAILURE, reason="not a code!")
    assert journal.transition(E.FAILURE, reason="below_floor").reason == "below_floor"


def test_known_good_model_is_declared_only_when_an_update_begins(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.json", clock=FakeClock())
    journal.load()
    assert journal.begin(NEW, previous=OLD).previous == OLD
    with pytest.raises(IllegalTransitionError, match="previous"):
        journal.transition(E.DOWNLOAD_DONE, previous=NEW)
    assert journal.current.previous == OLD


def test_idle_takes_no_target(path: Path) -> None:
    journal = open_journal(path)
    journal.begin(NEW)
    journal.transition(E.FAILURE, reason="disk_full")
    with pytest.raises(IllegalTransitionError, match="no target"):
        journal.transition(E.REPORTED, target=NEW)


def test_update_found_needs_a_target(path: Path) -> None:
    journal = open_journal(path)
    with pytest.raises(IllegalTransitionError):
        journal.transition(E.UPDATE_FOUND)


def test_begin_issues_a_new_update_id_and_resets_saves(path: Path) -> None:
    journal = open_journal(path)
    ids = []
    for _ in range(2):
        record = journal.begin(NEW)
        assert (record.state, record.target, record.saves) == (S.DOWNLOADING, NEW, 1)
        assert len(record.update_id) == 32
        ids.append(record.update_id)
        assert journal.transition(E.DOWNLOAD_DONE).saves == 2
        journal.transition(E.FAILURE, reason="sealed_digest")
        journal.transition(E.REPORTED)
    assert ids[0] != ids[1]


def test_idle_has_no_update_id(path: Path) -> None:
    journal = open_journal(path)
    journal.begin(NEW)
    journal.transition(E.FAILURE, reason="disk_full")
    record = journal.transition(E.REPORTED)
    assert (record.state, record.update_id, record.saves, record.target) == (
        S.IDLE, "", 0, None)


def test_missing_file_is_idle_and_not_written(tmp_path: Path) -> None:
    p = tmp_path / "journal.json"
    journal = Journal(p, clock=FakeClock())
    record = journal.load()
    assert (record.state, record.target, record.previous, record.saves) == (S.IDLE, None, None, 0)
    assert not p.exists()
    journal.begin(NEW)
    assert JournalRecord.from_json(p.read_bytes()).state is S.DOWNLOADING


def test_current_before_load_is_a_caller_mistake(path: Path) -> None:
    journal = Journal(path, clock=FakeClock())
    with pytest.raises(RuntimeError, match="load"):
        journal.begin(NEW)


def test_naive_clock_is_refused(path: Path) -> None:
    journal = Journal(path, clock=lambda: datetime(2025, 1, 1))
    journal.load()
    with pytest.raises(ValueError, match="timezone"):
        journal.begin(NEW)


# --- atomic writes ---------------------------------------------------------


def test_writes_leave_no_temp_files_and_a_private_file(path: Path) -> None:
    journal = open_journal(path)
    run(journal, HAPPY)
    assert temp_files(path.parent) == []
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("step", range(len(HAPPY)), ids=[e for e, _ in HAPPY])
def test_crash_during_the_write_keeps_the_old_record(
    path: Path, monkeypatch: pytest.MonkeyPatch, step: int
) -> None:
    journal = open_journal(path)
    before = run(journal, HAPPY[:step])
    on_disk = path.read_bytes()

    def power_cut(src: object, dst: object) -> None:
        raise OSError("power lost during rename")

    monkeypatch.setattr(os, "replace", power_cut)
    event, changes = HAPPY[step]
    with pytest.raises(OSError, match="power lost"):
        journal.transition(event, **changes)
    monkeypatch.undo()
    assert path.read_bytes() == on_disk
    assert journal.current == before  # memory never runs ahead of the disk
    assert temp_files(path.parent) == []
    assert open_journal(path).current == before


# --- crash recovery --------------------------------------------------------

# (case, events leading to the crash state, recovery action, state saved on restart, reason)
CRASH_CASES: list[tuple[str, list[Step], RecoveryAction, State, str | None]] = [
    ("idle", [], A.NONE, S.IDLE, None),
    ("downloading", HAPPY[:1], A.RESUME_DOWNLOAD, S.DOWNLOADING, None),
    ("verifying", HAPPY[:2], A.REVERIFY_DOWNLOAD, S.VERIFYING, None),
    # Unpacked files from before the crash are not trusted: back to verifying.
    ("validating", HAPPY[:3], A.REVERIFY_DOWNLOAD, S.VERIFYING, None),
    ("swapping", HAPPY[:4], A.REVERT_TO_PREVIOUS, S.ROLLED_BACK, REASON_CRASH_IN_SWAP),
    ("probation", HAPPY[:5], A.REVERT_TO_PREVIOUS, S.ROLLED_BACK, REASON_CRASH_IN_PROBATION),
    ("committed", HAPPY, A.NONE, S.COMMITTED, None),
    ("rolled_back", [*HAPPY[:5], (E.PROBATION_FAILED, {"reason": "error_rate"})],
     A.NONE, S.ROLLED_BACK, "error_rate"),
    ("failed", [*HAPPY[:2], (E.FAILURE, {"reason": "sealed_digest"})],
     A.NONE, S.FAILED, "sealed_digest"),
]


@pytest.mark.parametrize(
    ("steps", "action", "after", "reason"),
    [case[1:] for case in CRASH_CASES],
    ids=[case[0] for case in CRASH_CASES],
)
def test_crash_right_after_entering_a_state(
    path: Path, steps: list[Step], action: RecoveryAction, after: State, reason: str | None
) -> None:
    crashed = run(open_journal(path), steps)

    rebooted = open_journal(path)  # all a rebooted agent has is the file
    assert rebooted.current == crashed
    assert recovery_action(rebooted.current) is action is EXPECTED_RECOVERY[crashed.state]
    got, record = rebooted.recover()
    assert got is action
    assert (record.state, record.reason) == (after, reason)
    assert JournalRecord.from_json(path.read_bytes()) == record
    # Never a half-installed model after a reboot, never the known-good one lost.
    expected_model = NEW if after is S.COMMITTED else OLD
    served = model_to_serve(record)
    assert served is not None and served.target_path == expected_model.target_path
    assert OLD in models_to_keep(record)


def test_crash_loop_ends_in_state_loop_failure(path: Path) -> None:
    run(open_journal(path, max_saves_per_update=8), HAPPY[:1])  # downloading, saves == 1
    restarts = 0
    while True:
        journal = open_journal(path, max_saves_per_update=8)
        restarts += 1
        assert restarts <= 8, "the save cap did not stop the crash loop"
        try:
            action, _ = journal.recover()
        except StateLoopError as e:
            final = e.record
            break
        assert action is A.RESUME_DOWNLOAD
    assert restarts == 8  # saves 2..8 resumed, the 9th save is forced to failed
    assert (final.state, final.reason, final.saves) == (S.FAILED, REASON_STATE_LOOP, 9)
    assert JournalRecord.from_json(path.read_bytes()) == final
    assert model_to_serve(final) == OLD
    assert recovery_action(final) is A.NONE  # the loop is over


def test_save_cap_applies_in_process_too(path: Path) -> None:
    journal = open_journal(path, max_saves_per_update=3)
    run(journal, HAPPY[:3])  # begin resets: downloading 1, verifying 2, validating 3
    with pytest.raises(StateLoopError) as caught:
        journal.transition(E.VALID)
    assert caught.value.record.state is S.FAILED
    assert journal.current == caught.value.record
    # A way out always exists: outcomes are never blocked by the cap.
    assert journal.transition(E.REPORTED).state is S.IDLE


def test_crash_in_probation_past_the_cap_still_reverts(path: Path) -> None:
    journal = open_journal(path, max_saves_per_update=5)
    run(journal, HAPPY[:5])  # probation at saves 5
    action, record = open_journal(path, max_saves_per_update=5).recover()
    assert (action, record.state) == (A.REVERT_TO_PREVIOUS, S.ROLLED_BACK)


# --- corrupt journals ------------------------------------------------------


def good_doc() -> dict[str, Any]:
    return json.loads(record_in(S.VALIDATING).to_json())


def mutated(**changes: Any) -> bytes:
    doc = good_doc()
    for key, value in changes.items():
        if value is ...:
            del doc[key]
        else:
            doc[key] = value
    return json.dumps(doc).encode()


CORRUPT_FILES: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("not_json", b"{\"state\": "),
    ("not_utf8", b"\xff\xfe"),
    ("array", b"[]"),
    ("oversized", b" " * (MAX_JOURNAL_BYTES + 1)),
    ("unknown_format", mutated(format=2)),
    ("format_true", mutated(format=True)),
    ("missing_format", mutated(format=...)),
    ("extra_key", mutated(extra=1)),
    ("missing_key", mutated(saves=...)),
    ("duplicate_key", b'{"format": 1, ' + mutated()[1:]),
    ("nan", mutated(saves=float("nan"))),
    ("unknown_state", mutated(state="exploded")),
    ("bad_sha256", mutated(target={**good_doc()["target"], "sha256": "zz"})),
    ("target_extra_key", mutated(target={**good_doc()["target"], "x": 1})),
    ("staged_without_target", mutated(target=None)),
    ("naive_timestamp", mutated(entered_at="2025-01-01T00:00:00")),
    ("negative_saves", mutated(saves=-1)),
    ("bool_saves", mutated(saves=True)),
    ("history_too_long", mutated(history=[["idle", START.isoformat()]] * (HISTORY_LIMIT + 1))),
    ("failed_without_reason", mutated(state="failed")),
]


@pytest.mark.parametrize("data", [c[1] for c in CORRUPT_FILES], ids=[c[0] for c in CORRUPT_FILES])
def test_corrupt_journal_is_a_typed_error(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    with pytest.raises(CorruptJournalError):
        Journal(path, clock=FakeClock()).load()


def test_journal_others_can_write_is_not_trusted(path: Path) -> None:
    path.chmod(0o666)
    with pytest.raises(CorruptJournalError):
        Journal(path, clock=FakeClock()).load()


def test_load_or_reset_keeps_the_previous_model_when_it_parses(path: Path) -> None:
    path.write_bytes(mutated(state="exploded"))
    journal = Journal(path, clock=FakeClock())
    record = journal.load_or_reset()
    assert (record.state, record.reason) == (S.FAILED, REASON_CORRUPT_JOURNAL)
    assert (record.previous, record.target) == (OLD, None)
    assert model_to_serve(record) == OLD
    assert open_journal(path).current == record  # the reset is on disk
    assert journal.transition(E.REPORTED).previous == OLD


@pytest.mark.parametrize("old_state", ["checking", "staged"])
def test_a_journal_in_a_state_this_version_dropped_keeps_the_known_good_model(
        path: Path, old_state: str) -> None:
    """Earlier versions saved ``checking`` and ``staged``; such a record is unreadable here."""
    path.write_bytes(mutated(state=old_state))
    record = Journal(path, clock=FakeClock()).load_or_reset()
    assert (record.state, record.reason, record.previous) == (
        S.FAILED, REASON_CORRUPT_JOURNAL, OLD)
    assert model_to_serve(record) == OLD


@pytest.mark.parametrize("data", [b"garbage", mutated(previous={"name": "x"})])
def test_load_or_reset_without_a_salvageable_previous(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    record = Journal(path, clock=FakeClock()).load_or_reset()
    assert (record.state, record.previous, record.target) == (S.FAILED, None, None)


def test_load_or_reset_does_not_salvage_from_a_file_others_can_write(path: Path) -> None:
    path.write_bytes(mutated(state="exploded"))
    path.chmod(0o666)
    record = Journal(path, clock=FakeClock()).load_or_reset()
    assert record.previous is None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_load_or_reset_of_a_good_journal_is_load(path: Path) -> None:
    before = path.read_bytes()
    assert Journal(path, clock=FakeClock()).load_or_reset().previous == OLD
    assert path.read_bytes() == before


# --- record details --------------------------------------------------------


def test_history_is_bounded(path: Path) -> None:
    journal = open_journal(path)
    for _ in range(HISTORY_LIMIT):
        journal.begin(NEW)
        journal.transition(E.FAILURE, reason="disk_full")
        journal.transition(E.REPORTED)
    record = journal.current
    assert len(record.history) == HISTORY_LIMIT
    assert record.history[-1] == (S.IDLE, record.entered_at)
    stamps = [at for _, at in record.history]
    assert stamps == sorted(stamps)
    assert len(path.read_bytes()) < 4096


def test_round_trip_is_exact_and_canonical() -> None:
    record = replace(record_in(S.ROLLED_BACK), history=((S.PROBATION, START.isoformat()),))
    data = record.to_json()
    assert JournalRecord.from_json(data) == record
    assert JournalRecord.from_json(data).to_json() == data
    assert json.loads(data)["format"] == 1


def test_model_ref_from_decision() -> None:
    decision = SimpleNamespace(
        target_path="digits/2.0.0.bundle",
        sha256="b" * 64,
        image=SimpleNamespace(name="digits", version="2.0.0", release_counter=2),
    )
    assert ModelRef.from_decision(decision) == NEW  # type: ignore[arg-type]
    with_dir = ModelRef.from_decision(decision, Path("/m/d"))  # type: ignore[arg-type]
    assert with_dir.model_dir == "/m/d"


@pytest.mark.parametrize(
    "bad",
    [{"sha256": "A" * 64}, {"release_counter": -1}, {"release_counter": True}, {"name": ""},
     {"version": "v" * 600}],
)
def test_model_ref_validates(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        replace(NEW, **bad)


def test_models_to_keep_always_holds_the_known_good_one() -> None:
    for state in State:
        record = record_in(state)
        assert OLD in models_to_keep(record)
        assert model_to_serve(record) == (NEW if state is S.COMMITTED else OLD)


def test_terminal_states() -> None:
    assert {s for s in State if record_is_terminal(s)} == {S.COMMITTED, S.ROLLED_BACK, S.FAILED}
