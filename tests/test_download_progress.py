"""The progress records in the tail of a partial download: what a crash can leave, and what loads.

``ResumableDownload`` rewrites the latest record after every chunk (no sync) and
makes one of two other slots durable once per request, with one ``fdatasync``
for data and record together, so nothing orders data and records on disk: a
crash can leave a record whose bytes are not all there, or a torn record. A
record names an offset and the sha256 of the bytes before it; loading keeps the
largest offset whose bytes on disk match. Network-free: the files are built
byte by byte as such a crash would leave them.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from pathlib import Path

import pytest

from edgeota.agent.resumable import (
    RECORD_SLOT_BYTES,
    RECORD_SLOTS,
    ProgressRecord,
    load_progress,
    saved_offset,
)

LENGTH = 10_000
DATA = os.urandom(LENGTH)


def partial(tmp_path: Path, *records: ProgressRecord | bytes, data: bytes = DATA) -> Path:
    """A partial file: ``data``, then the slots (a record, raw bytes, or zeros)."""
    slots = [r.to_bytes() if isinstance(r, ProgressRecord) else r.ljust(RECORD_SLOT_BYTES, b"\x00")
             for r in records]
    slots += [b"\x00" * RECORD_SLOT_BYTES] * (RECORD_SLOTS - len(slots))
    path = tmp_path / "x.partial"
    path.write_bytes(data + b"".join(slots))
    return path


def record(offset: int, data: bytes = DATA) -> ProgressRecord:
    return ProgressRecord(offset, hashlib.sha256(data[:offset]).digest())


def test_the_largest_matching_record_wins_whatever_its_slot(tmp_path: Path) -> None:
    # Two durable slots (4000, 6000) and the latest (8000), in any order.
    assert saved_offset(partial(tmp_path, record(6000), record(4000), record(8000)),
                        LENGTH) == 8000
    assert saved_offset(partial(tmp_path, record(8000), record(6000), record(4000)),
                        LENGTH) == 8000


def test_the_sha256_object_continues_from_the_kept_bytes(tmp_path: Path) -> None:
    path = partial(tmp_path, record(4000), record(6000), record(8000))
    fd = os.open(path, os.O_RDONLY)
    try:
        kept, hasher = load_progress(fd, LENGTH)
    finally:
        os.close(fd)
    assert kept == 8000
    hasher.update(DATA[8000:])
    assert hasher.hexdigest() == hashlib.sha256(DATA).hexdigest()


def test_a_torn_record_leaves_the_others(tmp_path: Path) -> None:
    torn = bytearray(record(8000).to_bytes())
    torn[20] ^= 0xFF
    path = partial(tmp_path, record(4000), record(6000), bytes(torn))
    assert saved_offset(path, LENGTH) == 6000


def test_bytes_that_did_not_reach_the_disk_fall_back_to_a_smaller_record(
        tmp_path: Path) -> None:
    # The latest record (8000) is on disk, part of its bytes is not (zeros after a power cut).
    damaged = DATA[:7000] + b"\x00" * 1000 + DATA[8000:]
    path = partial(tmp_path, record(4000), record(6000), record(8000), data=damaged)
    assert saved_offset(path, LENGTH) == 6000
    # Damage below every record but the smallest: only that one still matches.
    damaged = DATA[:5000] + bytes(b ^ 1 for b in DATA[5000:5010]) + DATA[5010:]
    path = partial(tmp_path, record(4000), record(6000), record(8000), data=damaged)
    assert saved_offset(path, LENGTH) == 4000


def test_a_record_of_another_file_is_not_believed(tmp_path: Path) -> None:
    other = os.urandom(LENGTH)
    assert saved_offset(partial(tmp_path, record(6000, other)), LENGTH) == 0


def test_no_usable_record_is_a_fresh_start(tmp_path: Path) -> None:
    assert saved_offset(tmp_path / "missing.partial", LENGTH) == 0
    assert saved_offset(partial(tmp_path), LENGTH) == 0  # slots never written
    assert saved_offset(partial(tmp_path, b"\xff" * RECORD_SLOT_BYTES, b"junk"), LENGTH) == 0
    # A record beyond the file, or a file of another size, is not believed.
    beyond = ProgressRecord(LENGTH + 1, hashlib.sha256(DATA).digest())
    assert saved_offset(partial(tmp_path, beyond), LENGTH) == 0
    assert saved_offset(partial(tmp_path, record(5000)), LENGTH + 1) == 0
    (tmp_path / "short.partial").write_bytes(DATA[:5000])  # no room for a record
    assert saved_offset(tmp_path / "short.partial", LENGTH) == 0


def test_records_of_the_earlier_layout_are_a_fresh_start(tmp_path: Path) -> None:
    # Version 1: magic, version, seq, previous, offset, CRC-32 of [previous, offset).
    body = struct.pack(">4sBQQQI", b"EOTP", 1, 1, 0, 5000, zlib.crc32(DATA[:5000]))
    old = body + struct.pack(">I", zlib.crc32(body))
    assert saved_offset(partial(tmp_path, old), LENGTH) == 0


@pytest.mark.parametrize("offset", [0, -1])
def test_an_empty_or_negative_offset_is_no_record(tmp_path: Path, offset: int) -> None:
    if offset < 0:
        with pytest.raises(struct.error):
            ProgressRecord(offset, b"\x00" * 32).to_bytes()
        return
    assert ProgressRecord.parse(ProgressRecord(offset, b"\x00" * 32).to_bytes(), LENGTH) is None


def test_a_failed_durable_save_surfaces_at_the_next_save_or_flush(tmp_path: Path) -> None:
    from edgeota.agent.resumable import ProgressSaver

    fd = os.open(tmp_path / "x.partial", os.O_RDONLY | os.O_CREAT, 0o600)  # writes fail
    saver = ProgressSaver(fd, LENGTH, timeout=5.0)
    try:
        saver.save(record(4000).to_bytes())  # never waits, even for a save that will fail
        with pytest.raises(OSError):
            saver.flush()
        with pytest.raises(OSError):
            saver.save(record(6000).to_bytes())
    finally:
        saver.close()
        os.close(fd)


def test_durable_saves_alternate_between_the_two_slots(tmp_path: Path) -> None:
    from edgeota.agent.resumable import ProgressSaver

    path = partial(tmp_path)
    fd = os.open(path, os.O_RDWR)
    saver = ProgressSaver(fd, LENGTH, timeout=5.0)
    try:
        for offset in (2000, 4000, 6000):
            saver.save(record(offset).to_bytes())
            saver.flush()
    finally:
        saver.close()
        os.close(fd)
    tail = path.read_bytes()[LENGTH:]
    size = RECORD_SLOT_BYTES
    slots = [ProgressRecord.parse(tail[i * size:(i + 1) * size], LENGTH)
             for i in range(RECORD_SLOTS)]
    assert [s.offset if s else None for s in slots] == [6000, 4000, None]
    assert saved_offset(path, LENGTH) == 6000
