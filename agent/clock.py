"""The agent's persisted time floor: when the system clock cannot be trusted.

A Raspberry Pi has no real-time clock: until NTP answers, it boots at the last
time systemd saved, or at 1970. TUF decides expiry by the local clock, so a
clock that is behind could make expired (perhaps replayed) metadata look
fresh, and a clock far ahead makes every update look expired. The agent keeps
a floor -- a time it has proof was already reached -- and while the system
clock is below it, update checks wait and the agent reports
``clock_untrusted`` instead of deciding anything with a wrong clock.

The floor only rises, and only after the clock was shown to be sane: call
:meth:`TimeFloor.advance` after a *successful verified* update cycle. That
cycle bounds the clock from above too -- a clock far in the future would have
found the metadata expired and failed -- so a clock set forward cannot push
the floor out of reach. ``advance(to=...)`` takes a time proven by other
means (e.g. verified metadata), on the caller's word.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from edgeota.protocol.errors import EdgeotaError
from edgeota.protocol.files import (
    PRIVATE_FILE_MODE,
    FileTooLargeError,
    InsecureKeyFileError,
    atomic_write,
    read_private_file,
)

__all__ = [
    "EPOCH",
    "FLOOR_FORMAT_VERSION",
    "REASON_CLOCK_UNTRUSTED",
    "ClockStatus",
    "ClockUntrustedError",
    "CorruptTimeFloorError",
    "TimeFloor",
]

logger = logging.getLogger(__name__)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FLOOR_FORMAT_VERSION = 1
REASON_CLOCK_UNTRUSTED = "clock_untrusted"
_MAX_FLOOR_BYTES = 1024  # the file is ~60 bytes


class ClockUntrustedError(EdgeotaError):
    """The system clock is below the persisted floor; no update check until it catches up."""

    def __init__(self, status: ClockStatus) -> None:
        super().__init__(
            f"{REASON_CLOCK_UNTRUSTED}: system clock {status.now.isoformat()} is before the "
            f"time floor {status.floor.isoformat()}; waiting for a correct clock (NTP)"
        )
        self.status = status


class CorruptTimeFloorError(EdgeotaError):
    """The floor file exists but is not one this agent wrote."""


@dataclass(frozen=True)
class ClockStatus:
    """One look at the clock against the floor; ``reason`` is set only when untrusted."""

    trusted: bool
    now: datetime
    floor: datetime
    reason: str | None = None


class TimeFloor:
    """A persisted, only-rising lower bound on the current time, at ``path``.

    ``tolerance`` lets the clock sit slightly below the floor without being
    distrusted: NTP may step a clock back by a little after the floor was
    raised from that same clock, and a few minutes cannot revive expired
    metadata in any useful way. All datetimes must be timezone-aware.
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], datetime],
        tolerance: timedelta = timedelta(minutes=5),
    ) -> None:
        if tolerance < timedelta(0):
            raise ValueError(f"tolerance must not be negative, got {tolerance}")
        self._path = Path(path)
        self._clock = clock
        self._tolerance = tolerance
        self._floor: datetime | None = None

    @property
    def path(self) -> Path:
        return self._path

    @property
    def floor(self) -> datetime:
        """The floor, read from disk on first use."""
        if self._floor is None:
            self._floor = self.load()
        return self._floor

    def load(self) -> datetime:
        """Read the floor; a missing file means no floor yet (the epoch: any clock is trusted).

        Raises:
            CorruptTimeFloorError: the file is not valid, has an unknown format,
                is oversized, or others may write it (a floor an attacker could
                lower is no floor).
            OSError: the disk failed.
        """
        try:
            data = read_private_file(self._path, _MAX_FLOOR_BYTES)
        except FileNotFoundError:
            floor = EPOCH
        except (FileTooLargeError, InsecureKeyFileError) as e:
            raise CorruptTimeFloorError(f"{self._path}: {e}") from e
        else:
            floor = _parse(data, self._path)
        self._floor = floor
        return floor

    def load_or_reset(self, fallback: datetime) -> datetime:
        """:meth:`load`, replacing a corrupt file by ``fallback`` (logged).

        Policy: the agent must not stay unable to update forever because of a
        damaged file, nor silently drop to the epoch (that would revive expired
        metadata). ``fallback`` is a time the caller knows was reached without
        trusting the clock -- e.g. the agent's build date or the newest
        modification time of its verified TUF metadata.
        """
        _aware(fallback, "fallback")
        try:
            return self.load()
        except CorruptTimeFloorError as e:
            logger.warning("time floor %s is corrupt (%s); resetting to %s",
                           self._path, e, fallback.isoformat())
        self._write(fallback)
        return fallback

    def status(self) -> ClockStatus:
        """Compare the clock with the floor (no I/O once the floor is loaded)."""
        now = _aware(self._clock(), "clock()")
        floor = self.floor
        if now < floor - self._tolerance:
            return ClockStatus(False, now, floor, REASON_CLOCK_UNTRUSTED)
        return ClockStatus(True, now, floor)

    def require_trusted(self) -> datetime:
        """The current time, or :class:`ClockUntrustedError`: call before every update check."""
        status = self.status()
        if not status.trusted:
            raise ClockUntrustedError(status)
        return status.now

    def advance(self, to: datetime | None = None) -> datetime:
        """Raise the floor to ``to`` (default: now) and return the floor; never lowers it.

        Without ``to`` the clock itself must be trusted: a clock below the
        floor is exactly the one that must not move it. Written atomically;
        nothing is written when the floor would not rise.

        Raises:
            ClockUntrustedError: ``to`` is None and the clock is untrusted.
        """
        if to is None:
            to = self.require_trusted()
        _aware(to, "to")
        if to <= self.floor:
            return self.floor
        self._write(to)
        return to

    def _write(self, floor: datetime) -> None:
        doc = {"format": FLOOR_FORMAT_VERSION, "floor": floor.astimezone(UTC).isoformat()}
        data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        self._path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self._path, data, mode=PRIVATE_FILE_MODE)
        self._floor = floor  # only once it is on disk


def _aware(value: datetime, what: str) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValueError(f"{what} must be a timezone-aware datetime, got {value!r}")
    return value


def _parse(data: bytes, path: Path) -> datetime:
    try:
        doc = json.loads(data.decode("utf-8"))
        if not isinstance(doc, dict) or set(doc) != {"format", "floor"}:
            raise ValueError("expected exactly the keys format and floor")
        if type(doc["format"]) is not int or doc["format"] != FLOOR_FORMAT_VERSION:
            raise ValueError(f"unknown format {doc['format']!r}")
        if not isinstance(doc["floor"], str):
            raise TypeError("floor is not a string")
        floor = datetime.fromisoformat(doc["floor"])
        if floor.tzinfo is None:
            raise ValueError("floor has no UTC offset")
    except (UnicodeDecodeError, ValueError, TypeError) as e:
        raise CorruptTimeFloorError(f"{path}: invalid time floor: {e}") from e
    return floor
