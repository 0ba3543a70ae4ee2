"""The persisted time floor: trusted clocks, clocks set back, persistence, corrupt files."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from edgeota.agent.clock import (
    EPOCH,
    REASON_CLOCK_UNTRUSTED,
    ClockStatus,
    ClockUntrustedError,
    CorruptTimeFloorError,
    TimeFloor,
)

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


class SetClock:
    """A clock the test sets by hand, like an operator (or a Pi booting before NTP)."""

    def __init__(self, now: datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> SetClock:
    return SetClock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "time_floor.json"


def test_missing_file_means_floor_at_epoch_and_trusted(path: Path, clock: SetClock) -> None:
    floor = TimeFloor(path, clock=clock)
    assert floor.load() == EPOCH
    assert floor.status() == ClockStatus(trusted=True, now=NOW, floor=EPOCH, reason=None)
    assert not path.exists()  # reading writes nothing


def test_even_a_1970_clock_is_trusted_before_any_floor(path: Path) -> None:
    status = TimeFloor(path, clock=SetClock(EPOCH)).status()
    assert status.trusted


def test_advance_persists_atomically_and_privately(path: Path, clock: SetClock) -> None:
    floor = TimeFloor(path, clock=clock)
    assert floor.advance() == NOW
    assert floor.floor == NOW
    assert TimeFloor(path, clock=clock).load() == NOW  # survives a restart
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_advance_only_raises(path: Path, clock: SetClock) -> None:
    floor = TimeFloor(path, clock=clock)
    floor.advance()
    before = path.read_bytes()
    assert floor.advance(NOW - timedelta(days=1)) == NOW
    assert floor.advance(NOW) == NOW
    assert path.read_bytes() == before  # nothing rewritten when the floor would not rise
    later = NOW + timedelta(hours=1)
    clock.now = later
    assert floor.advance() == later
    assert TimeFloor(path, clock=clock).load() == later


def test_clock_set_before_the_floor_is_untrusted(path: Path, clock: SetClock) -> None:
    TimeFloor(path, clock=clock).advance()
    clock.now = NOW - timedelta(days=400)  # booted before NTP with a stale saved time
    floor = TimeFloor(path, clock=clock)
    status = floor.status()
    assert (status.trusted, status.reason, status.floor) == (False, REASON_CLOCK_UNTRUSTED, NOW)
    with pytest.raises(ClockUntrustedError, match=REASON_CLOCK_UNTRUSTED) as caught:
        floor.require_trusted()
    assert caught.value.status == status
    # A wrong clock cannot move the floor either.
    with pytest.raises(ClockUntrustedError):
        floor.advance()
    assert TimeFloor(path, clock=clock).load() == NOW


@pytest.mark.parametrize(
    ("behind", "trusted"),
    [
        (timedelta(0), True),
        (timedelta(minutes=4, seconds=59), True),
        (timedelta(minutes=5), True),  # exactly at the tolerance is still trusted
        (timedelta(minutes=5, microseconds=1), False),
        (timedelta(hours=1), False),
    ],
)
def test_tolerance(path: Path, clock: SetClock, behind: timedelta, trusted: bool) -> None:
    TimeFloor(path, clock=clock).advance()
    clock.now = NOW - behind
    status = TimeFloor(path, clock=clock).status()
    assert status.trusted is trusted
    assert status.reason == (None if trusted else REASON_CLOCK_UNTRUSTED)


def test_custom_tolerance(path: Path, clock: SetClock) -> None:
    TimeFloor(path, clock=clock).advance()
    clock.now = NOW - timedelta(seconds=1)
    assert not TimeFloor(path, clock=clock, tolerance=timedelta(0)).status().trusted
    with pytest.raises(ValueError, match="tolerance"):
        TimeFloor(path, clock=clock, tolerance=timedelta(seconds=-1))


def test_clock_catching_up_is_trusted_again(path: Path, clock: SetClock) -> None:
    TimeFloor(path, clock=clock).advance()
    floor = TimeFloor(path, clock=clock)
    clock.now = NOW - timedelta(days=1)
    assert not floor.status().trusted
    clock.now = NOW + timedelta(seconds=30)  # NTP answered
    assert floor.require_trusted() == clock.now


def test_explicit_time_may_raise_the_floor_while_untrusted(path: Path, clock: SetClock) -> None:
    floor = TimeFloor(path, clock=clock)
    floor.advance()
    clock.now = NOW - timedelta(days=1)
    proven = NOW + timedelta(hours=2)  # e.g. a time proven by verified metadata
    assert floor.advance(proven) == proven
    assert TimeFloor(path, clock=clock).load() == proven


def test_floor_is_stored_in_utc(path: Path, clock: SetClock) -> None:
    plus_two = NOW.astimezone(timezone(timedelta(hours=2)))
    TimeFloor(path, clock=SetClock(plus_two)).advance()
    assert json.loads(path.read_bytes())["floor"] == "2025-03-01T12:00:00+00:00"
    assert TimeFloor(path, clock=clock).load() == NOW


def test_naive_datetimes_are_refused(path: Path) -> None:
    naive = datetime(2025, 1, 1)
    with pytest.raises(ValueError, match="timezone-aware"):
        TimeFloor(path, clock=lambda: naive).status()
    with pytest.raises(ValueError, match="timezone-aware"):
        TimeFloor(path, clock=SetClock()).advance(naive)


def test_crash_during_the_write_keeps_the_old_floor(
    path: Path, clock: SetClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    floor = TimeFloor(path, clock=clock)
    floor.advance()

    def power_cut(src: object, dst: object) -> None:
        raise OSError("power lost during rename")

    monkeypatch.setattr(os, "replace", power_cut)
    with pytest.raises(OSError, match="power lost"):
        floor.advance(NOW + timedelta(days=1))
    monkeypatch.undo()
    assert floor.floor == NOW
    assert TimeFloor(path, clock=clock).load() == NOW
    assert [p.name for p in path.parent.iterdir()] == [path.name]


CORRUPT = [
    ("empty", b""),
    ("not_json", b"{"),
    ("not_utf8", b"\xff"),
    ("array", b"[]"),
    ("unknown_format", b'{"format": 2, "floor": "2025-01-01T00:00:00+00:00"}'),
    ("format_true", b'{"format": true, "floor": "2025-01-01T00:00:00+00:00"}'),
    ("extra_key", b'{"format": 1, "floor": "2025-01-01T00:00:00+00:00", "x": 1}'),
    ("missing_floor", b'{"format": 1}'),
    ("floor_not_string", b'{"format": 1, "floor": 1700000000}'),
    ("floor_not_a_date", b'{"format": 1, "floor": "yesterday"}'),
    ("naive_floor", b'{"format": 1, "floor": "2025-01-01T00:00:00"}'),
    ("oversized", b" " * 2048),
]


@pytest.mark.parametrize("data", [c[1] for c in CORRUPT], ids=[c[0] for c in CORRUPT])
def test_corrupt_file_is_a_typed_error(path: Path, clock: SetClock, data: bytes) -> None:
    path.parent.mkdir()
    path.write_bytes(data)
    path.chmod(0o600)
    floor = TimeFloor(path, clock=clock)
    with pytest.raises(CorruptTimeFloorError):
        floor.load()
    with pytest.raises(CorruptTimeFloorError):
        floor.status()  # never silently trusted


def test_floor_others_can_write_is_not_trusted(path: Path, clock: SetClock) -> None:
    TimeFloor(path, clock=clock).advance()
    path.chmod(0o666)
    with pytest.raises(CorruptTimeFloorError):
        TimeFloor(path, clock=clock).load()


def test_load_or_reset_uses_the_fallback_not_the_epoch(path: Path, clock: SetClock) -> None:
    path.parent.mkdir()
    path.write_bytes(b"garbage")
    fallback = NOW - timedelta(days=30)  # e.g. the agent's build date
    floor = TimeFloor(path, clock=clock)
    assert floor.load_or_reset(fallback) == fallback
    assert TimeFloor(path, clock=clock).load() == fallback
    assert floor.status().trusted


def test_load_or_reset_of_a_good_file_is_load(path: Path, clock: SetClock) -> None:
    TimeFloor(path, clock=clock).advance()
    before = path.read_bytes()
    assert TimeFloor(path, clock=clock).load_or_reset(EPOCH) == NOW
    assert path.read_bytes() == before
