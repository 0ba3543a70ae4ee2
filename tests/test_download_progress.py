"""The progress record in the tail of a partial download: what a crash can leave, and what loads.

``ResumableDownload`` saves progress with one ``fdatasync`` for data and record
together, so nothing orders the two on disk: a crash can leave a record whose
bytes are not all there, or a torn record. Network-free: the files are built
byte by byte as such a crash would leave them.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

from edgeota.agent.mqtt_fetcher import _SLOT, _Record, saved_offset

LENGTH = 10_000
DATA = os.urandom(LENGTH)


def partial(tmp_path: Path, *records: _Record | bytes, data: bytes = DATA) -> Path:
    """A partial file: ``data``, then the two slots (a record, raw bytes, or zeros)."""
    slots = [r.to_bytes() if isinstance(r, _Record) else r.ljust(_SLOT, b"\x00")
             for r in records]
    slots += [b"\x00" * _SLOT] * (2 - len(slots))
    path = tmp_path / "x.partial"
    path.write_bytes(data + b"".join(slots))
    return path


def record(seq: int, previous: int, offset: int, data: bytes = DATA) -> _Record:
    return _Record(seq, previous, offset, zlib.crc32(data[previous:offset]))


def test_the_newest_intact_record_wins(tmp_path: Path) -> None:
    # Slots are written in turn: seq 3 in slot 1, seq 4 in slot 0.
    path = partial(tmp_path, record(4, 6000, 8000), record(3, 4000, 6000))
    assert saved_offset(path, LENGTH) == 8000


def test_a_torn_record_leaves_the_one_before(tmp_path: Path) -> None:
    torn = bytearray(record(4, 6000, 8000).to_bytes())
    torn[20] ^= 0xFF
    assert saved_offset(partial(tmp_path, bytes(torn), record(3, 4000, 6000)), LENGTH) == 6000


def test_bytes_that_did_not_reach_the_disk_fall_back_to_the_save_before(tmp_path: Path) -> None:
    # The record of seq 4 is on disk, part of its bytes is not (zeros after a power cut).
    damaged = DATA[:7000] + b"\x00" * 1000 + DATA[8000:]
    path = partial(tmp_path, record(4, 6000, 8000), record(3, 4000, 6000), data=damaged)
    assert saved_offset(path, LENGTH) == 6000


def test_no_usable_record_is_a_fresh_start(tmp_path: Path) -> None:
    assert saved_offset(tmp_path / "missing.partial", LENGTH) == 0
    assert saved_offset(partial(tmp_path), LENGTH) == 0  # slots never written
    assert saved_offset(partial(tmp_path, b"\xff" * _SLOT, b"junk"), LENGTH) == 0
    # A record beyond the file, or a file of another size, is not believed.
    beyond = _Record(1, 0, LENGTH + 1, 0)
    assert saved_offset(partial(tmp_path, beyond), LENGTH) == 0
    assert saved_offset(partial(tmp_path, record(1, 0, 5000)), LENGTH + 1) == 0
    (tmp_path / "short.partial").write_bytes(DATA[:5000])  # an earlier version's layout
    assert saved_offset(tmp_path / "short.partial", LENGTH) == 0
