"""Fuzz the agent's journal loader: ``JournalRecord.from_json`` and ``Journal.load_or_reset``.

Invariant: any bytes on disk either load as a valid record or raise
``CorruptJournalError`` from :meth:`Journal.load` -- never another exception --
and :meth:`Journal.load_or_reset` always returns a valid record (the bytes'
own, or ``failed(corrupt_journal)`` keeping at most a ``previous`` model the
file really named), which it has saved: a second load reads it back. An
accepted record round-trips through its canonical bytes.

Atomic writes mean a power cut leaves the old record or the new one; the
properties cover what the card itself can do on a power cut or with age
anyway (a torn sector, a zeroed tail, flipped bits, a write cut short), over
pairs of consecutive records of a real update.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import fuzz_support
from hypothesis import given
from hypothesis import strategies as st

with fuzz_support.instrumented(__name__):
    from edgeota.agent.journal import (
        REASON_CORRUPT_JOURNAL,
        CorruptJournalError,
        Event,
        Journal,
        JournalRecord,
        ModelRef,
        State,
    )

START = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
OLD = ModelRef("digits/1.0.0.bundle", "a" * 64, "digits", "1.0.0", 1, "/var/lib/edgeota/digits/1")
NEW = ModelRef("digits/2.0.0.bundle", "b" * 64, "digits", "2.0.0", 2)


class _Clock:
    """A clock that moves one second per reading: records differ, runs repeat."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


def load_checked(path: Path) -> JournalRecord:
    """Both loaders on the file at ``path``, with every invariant of the module docstring."""
    data = path.read_bytes()
    try:
        parsed: JournalRecord | None = JournalRecord.from_json(data)
    except CorruptJournalError:
        parsed = None
    if parsed is not None:
        assert JournalRecord.from_json(parsed.to_json()) == parsed, "record does not round-trip"
    try:
        loaded: JournalRecord | None = Journal(path, clock=_Clock()).load()
    except CorruptJournalError:
        loaded = None
    assert loaded == parsed, "Journal.load and JournalRecord.from_json disagree"
    record = Journal(path, clock=_Clock()).load_or_reset()
    if parsed is not None:
        assert record == parsed
    else:
        assert record.state is State.FAILED and record.reason == REASON_CORRUPT_JOURNAL
        assert record.target is None
    assert Journal(path, clock=_Clock()).load() == record, "the reset was not saved"
    return record


def one_input(data: bytes) -> None:
    folder = fuzz_support.scratch_dir()
    try:
        path = folder / "journal-digits.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        load_checked(path)
    finally:
        shutil.rmtree(folder)


@functools.cache
def update_records() -> list[tuple[str, bytes]]:
    """Every record a real journal saves through a committed update, a failed one and a revert."""
    folder = fuzz_support.scratch_dir()
    try:
        saved: list[tuple[str, bytes]] = []
        journal = Journal(folder / "journal-digits.json", clock=_Clock(),
                          on_saved=lambda r: saved.append((str(r.state), r.to_json())))
        journal.load()
        journal.begin(NEW, previous=OLD)
        journal.transition(Event.RECOVERED)
        journal.transition(Event.DOWNLOAD_DONE)
        journal.transition(Event.VERIFIED, target=ModelRef(
            NEW.target_path, NEW.sha256, NEW.name, NEW.version, NEW.release_counter,
            "/var/lib/edgeota/digits/2"))
        journal.transition(Event.VALID)
        journal.transition(Event.SWAPPED)
        journal.transition(Event.PROBATION_PASSED)
        journal.transition(Event.REPORTED)
        journal.begin(OLD)
        journal.transition(Event.FAILURE, reason="download_failed")
        journal.transition(Event.REPORTED)
        journal.begin(NEW)
        journal.transition(Event.DOWNLOAD_DONE)
        journal.transition(Event.VERIFIED)
        journal.transition(Event.VALID)
        journal.transition(Event.SWAPPED)
        journal.transition(Event.RECOVERED)
        return saved
    finally:
        shutil.rmtree(folder)


def seeds() -> Mapping[str, bytes]:
    records = update_records()
    picked: dict[str, bytes] = {}
    for state, data in records:  # one of each state, and the longest history
        picked.setdefault(state, data)
    picked["history"] = records[-1][1]
    return picked


# --------------------------------------------------------------------------- power loss

def _corrupt(old: bytes, new: bytes, kind: str, at: int, fill: int) -> bytes:
    cut = at % (len(new) + 1)
    if kind == "truncated":  # the write of the new record stopped at ``cut``
        return new[:cut]
    if kind == "torn":  # written in place over the old record, cut short
        return new[:cut] + old[cut:]
    if kind == "zeroed":  # the tail never reached the card: zeros (or erased flash)
        return new[:cut] + bytes([fill]) * (len(new) - cut)
    if kind == "sector":  # one 512-byte sector of the new record holds the old one's
        start = (at % max(1, -(-len(new) // 512))) * 512
        return new[:start] + old[start:start + 512] + new[start + 512:]
    flipped = bytearray(new)  # "bitflip": worn flash
    if flipped:
        flipped[cut % len(flipped)] ^= 1 << (fill % 8)
    return bytes(flipped)


@st.composite
def _power_cuts(draw: st.DrawFn) -> tuple[bytes, bytes, bytes, str]:
    records = [data for _, data in update_records()]
    index = draw(st.integers(1, len(records) - 1))
    old, new = records[index - 1], records[index]
    kind = draw(st.sampled_from(("truncated", "torn", "zeroed", "sector", "bitflip")))
    at = draw(st.integers(0, 4096))
    fill = draw(st.sampled_from((0x00, 0xFF, 0x20)) | st.integers(0, 255))
    return old, new, _corrupt(old, new, kind, at, fill), kind


@given(cut=_power_cuts())
def power_loss(check: Callable[[bytes], None], cut: tuple[bytes, bytes, bytes, str]) -> None:
    """A record damaged while written loads or resets, and a reset keeps only a real model."""
    old, new, damaged, kind = cut
    check(damaged)
    if kind == "bitflip":
        # The record carries no checksum: a flipped bit inside a name or a digit
        # can make another valid record, which only the model host's check of
        # the files catches. What a power cut does (below) must never.
        return
    folder = fuzz_support.scratch_dir()
    try:
        path = folder / "journal-digits.json"
        path.write_bytes(damaged)
        path.chmod(0o600)
        record = load_checked(path)
        known = {JournalRecord.from_json(old).previous, JournalRecord.from_json(new).previous,
                 None}
        assert record.previous in known, f"a reset kept a model neither record named: {record}"
    finally:
        shutil.rmtree(folder)


@given(data=fuzz_support.mutations("journal", fuzz_support.json_structure))
def field_mutations(check: Callable[[bytes], None], data: bytes) -> None:
    """A real record with one field replaced by any JSON value loads or resets."""
    check(data)


HARNESS = fuzz_support.Harness(
    name="journal",
    one_input=one_input,
    seeds=seeds,
    max_len=16 * 1024,
    structure=fuzz_support.json_structure,
    properties=(power_loss, field_mutations),
)

if __name__ == "__main__":
    sys.exit(fuzz_support.main(HARNESS))
