"""Resumable target downloads over MQTT: no finished chunk is ever fetched twice.

:class:`ResumableDownload` fetches a target into ``{sha256}.partial`` with
progress records in the file's tail: one rewritten after every chunk (a
``pwrite``, no sync) and two made durable in turn, once per request, on a
saver thread beside the transfer. A record names an offset and the sha256 of
the file's bytes up to it, so loading believes a record only if the bytes on
disk hash to it. A disconnect (the process lives on) resumes from the last
byte written and a restart of the whole agent from the last chunk written
(the page cache survives a killed process): neither fetches a received byte
again, each costs at most what the server had in flight, one window. A power
cut resumes from the last durable record (at most a request's worth of
chunks older). The sha256 is computed while the bytes arrive (one streaming
pass) and checked at the end.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuf.api import exceptions

from edgeota.agent.mqtt_fetcher import DEFAULT_WINDOW, MqttFetcher, repository_path
from edgeota.agent.mqtt_session import (
    ConnectionLostError,
    DeviceConnection,
    FrameRejectedError,
)
from edgeota.protocol.fetch import MAX_OFFSET

__all__ = [
    "RECORD_SLOTS",
    "RECORD_SLOT_BYTES",
    "DownloadStats",
    "ProgressRecord",
    "ProgressSaver",
    "ResumableDownload",
    "load_progress",
    "saved_offset",
]

logger = logging.getLogger(__name__)

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_RECORD_MAGIC = b"EOTP"
_RECORD_VERSION = 2
_RECORD = struct.Struct(">4sBQ32s")  # magic, version, offset, sha256 of the bytes before it
_CHECK = struct.Struct(">I")  # CRC-32 of the record: a torn slot is ignored
RECORD_SLOT_BYTES = 64  # bytes per progress record slot, after the file's bytes
_DURABLE_SLOTS = (0, 1)  # written in turn by the saver, each followed by an fdatasync
_LATEST_SLOT = 2  # rewritten after every chunk, never synced
RECORD_SLOTS = 3
_HASH_BLOCK = 1024 * 1024  # bytes read at a time when hashing a file


@dataclass(frozen=True)
class ProgressRecord:
    """A progress record, kept in a slot in the tail of ``{sha256}.partial``.

    ``offset`` bytes of the target are in the file, and ``digest`` is their
    sha256. Loading hashes the file's bytes (which resuming does anyway, to go
    on with the target's streaming sha256) and believes the largest record
    they match, so no write order between data and records matters: a record
    whose bytes did not reach the disk, or was written over a torn tail, does
    not match and a smaller one is used. Each slot carries a CRC-32 of its own,
    so a torn record is ignored. The records live in the partial file itself:
    one ``fdatasync`` makes data and record durable, where a record file of
    its own costs three syncs per save (data, temp file, folder).
    """

    offset: int
    digest: bytes  # sha256 of the file's bytes [0, offset)

    def to_bytes(self) -> bytes:
        body = _RECORD.pack(_RECORD_MAGIC, _RECORD_VERSION, self.offset, self.digest)
        return (body + _CHECK.pack(zlib.crc32(body))).ljust(RECORD_SLOT_BYTES, b"\x00")

    @classmethod
    def parse(cls, slot: bytes, length: int) -> ProgressRecord | None:
        if len(slot) < _RECORD.size + _CHECK.size:
            return None
        body = slot[:_RECORD.size]
        (check,) = _CHECK.unpack_from(slot, _RECORD.size)
        if zlib.crc32(body) != check:
            return None
        magic, version, offset, digest = _RECORD.unpack(body)
        if magic != _RECORD_MAGIC or version != _RECORD_VERSION or not 0 < offset <= length:
            return None
        return cls(offset, digest)


def saved_offset(partial: Path, length: int) -> int:
    """Bytes of the ``{sha256}.partial`` of a ``length``-byte target that a resume keeps.

    Hashes what the records claim (at most ``length`` bytes) to check it.
    """
    try:
        fd = os.open(partial, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return 0
    try:
        return load_progress(fd, length)[0]
    finally:
        os.close(fd)


def load_progress(fd: int, length: int) -> tuple[int, Any]:
    """The largest recorded offset whose bytes on disk match, with their sha256 object.

    Nothing matching (no record, torn records, bytes lost in a power cut, a
    file from an earlier version or of another size) is a fresh start: offset
    0. A complete file whose records were dropped but which was not renamed
    yet is recognised by :meth:`ResumableDownload.download` by its hash first.
    """
    hasher = hashlib.sha256()
    if os.fstat(fd).st_size < length + RECORD_SLOT_BYTES:
        return 0, hasher
    slots = os.pread(fd, RECORD_SLOTS * RECORD_SLOT_BYTES, length)
    size = RECORD_SLOT_BYTES
    records = [r for i in range(RECORD_SLOTS)
               if (r := ProgressRecord.parse(slots[i * size:(i + 1) * size], length)) is not None]
    if not records and any(slots):
        logger.warning("ignoring unusable progress records")
    best, best_hasher, position = 0, hasher.copy(), 0
    for record in sorted(records, key=lambda r: r.offset):
        _hash_range(fd, hasher, position, record.offset)
        position = record.offset
        if hasher.digest() == record.digest:
            best, best_hasher = record.offset, hasher.copy()
    return best, best_hasher


@dataclass
class DownloadStats:
    """What resumable downloads did, summed over a device's life (read by the simulator)."""

    completed: int = 0
    bytes_fetched: int = 0  # payload bytes received, re-fetched ones included
    resumes: int = 0  # continuations from a saved offset: after a drop, or a restart
    full_restarts: int = 0  # downloads thrown away (wrong digest) to begin again


class ResumableDownload:
    """Download targets into ``folder`` so that no finished chunk is ever fetched twice.

    Layout: ``{sha256}.partial`` (the file's bytes so far, then three progress
    record slots, see :class:`ProgressRecord`) and ``{sha256}`` once complete and
    verified. ``{sha256}.progress`` was the record of earlier versions; it is
    removed (such a download starts over, as one with records of an earlier
    layout does).

    ``window`` is the number of chunks in flight (see :class:`MqttFetcher`);
    an interruption of any kind re-fetches at most that many.
    """

    def __init__(
        self,
        connection: DeviceConnection,
        folder: Path,
        *,
        timeout: float = 30.0,  # seconds without a frame
        window: int = DEFAULT_WINDOW,  # chunks in flight
        max_retries: int = 5,  # consecutive failed attempts without progress
        reconnect_timeout: float = 120.0,  # seconds to wait for the broker per attempt
        on_progress: Callable[[int, int], None] | None = None,  # (offset, length)
        stats: DownloadStats | None = None,
        save_timeout: float = 60.0,  # seconds one durable progress save may take
    ) -> None:
        self._connection = connection
        self._save_timeout = save_timeout
        self.stats = stats if stats is not None else DownloadStats()
        self._window = window
        self._fetcher = MqttFetcher(connection, timeout=timeout, window=window)
        self._folder = Path(folder)
        self._max_retries = max_retries
        self._reconnect_timeout = reconnect_timeout
        self._on_progress = on_progress

    def partial_path(self, sha256: str) -> Path:
        return self._folder / f"{sha256}.partial"

    def progress_path(self, sha256: str) -> Path:
        """The separate progress record of earlier versions (never written now)."""
        return self._folder / f"{sha256}.progress"

    def saved_offset(self, sha256: str, length: int) -> int:
        """Bytes already downloaded for this target that a resume keeps (checked, see above)."""
        return saved_offset(self.partial_path(sha256), length)

    def download(self, url: str, *, length: int, sha256: str) -> Path:
        """Fetch the target at ``url`` (repository path or ``mqtt://`` URL); return its file.

        Raises:
            exceptions.LengthOrHashMismatchError: the complete file has another
                sha256 (the partial files are removed: the next try starts over).
            exceptions.DownloadHTTPError: the server refused (404, 403, ...).
            exceptions.DownloadError: the transfer failed ``max_retries`` times
                in a row without progress, or the broker stayed away.
        """
        if _SHA256_RE.fullmatch(sha256) is None:
            raise ValueError("sha256 must be 64 lower-case hex digits")
        if not 0 <= length <= MAX_OFFSET:
            raise ValueError("length out of range")
        path = repository_path(url)
        final = self._folder / sha256
        if final.exists() and _sha256_of(final) == sha256:
            return final
        self._folder.mkdir(parents=True, exist_ok=True)
        partial = self.partial_path(sha256)
        self.progress_path(sha256).unlink(missing_ok=True)  # an earlier version's record
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            # One streaming pass: the bytes kept from before are hashed once (which
            # also checks the records), the new ones as they arrive, so the file is
            # not read again at the end.
            complete = None
            if os.fstat(fd).st_size == length:  # complete; killed before the rename?
                complete = _hash_range(fd, hashlib.sha256(), 0, length)
            if complete is not None and complete.hexdigest() == sha256:
                kept, hasher = length, complete
            else:
                kept, hasher = load_progress(fd, length)
            if kept:
                self.stats.resumes += 1  # picked up after an agent restart
            else:
                os.ftruncate(fd, 0)  # nothing matched: nothing kept
            # Bytes past the kept offset may be torn by a crash: never trusted,
            # only overwritten.
            self._fill(fd, path, length, sha256, kept, hasher)
            if (actual := hasher.hexdigest()) == sha256:
                os.ftruncate(fd, length)  # drop the records: the file is complete
                os.fdatasync(fd)
        finally:
            os.close(fd)
        if actual != sha256:
            partial.unlink(missing_ok=True)
            self.stats.full_restarts += 1
            raise exceptions.LengthOrHashMismatchError(
                f"{path}: downloaded sha256 {actual}, expected {sha256}")
        partial.replace(final)
        self.stats.completed += 1
        return final

    def _fill(self, fd: int, path: str, length: int, sha256: str, offset: int,
              hasher: Any) -> None:
        """Fetch until the partial file holds ``length`` bytes, retrying transfers.

        Frames come in file order, so each is written and added to ``hasher``
        as it arrives, and the latest record slot then names the new offset (a
        ``pwrite``: what a killed process wrote stays in the page cache). Once
        per request's worth of chunks a record is made durable on a thread of
        its own (:class:`ProgressSaver`: one ``fdatasync``), so the transfer
        goes on while the data is synced. A disconnect, which keeps the
        process, continues from the last byte written.
        """
        expected_id = bytes.fromhex(sha256)
        latest_slot = length + _LATEST_SLOT * RECORD_SLOT_BYTES
        save_every = self._fetcher.request_window
        stats, on_progress = self.stats, self._on_progress
        failures = 0
        unsaved_frames = 0
        record = b""
        saver = ProgressSaver(fd, length, timeout=self._save_timeout)
        try:
            while offset < length:
                try:
                    for frame in self._fetcher.stream(path, offset=offset, max_length=length):
                        payload = frame.payload
                        if frame.total != length or (
                                frame.content_id and frame.file_id != expected_id):
                            raise exceptions.LengthOrHashMismatchError(
                                f"{path}: the server offers another file ({frame.total} bytes)")
                        _pwrite_all(fd, payload, frame.offset)
                        hasher.update(payload)
                        stats.bytes_fetched += len(payload)
                        offset = frame.offset + len(payload)
                        if not frame.last:  # complete: the caller drops the records
                            record = ProgressRecord(offset, hasher.digest()).to_bytes()
                            _pwrite_all(fd, record, latest_slot)
                            unsaved_frames += 1
                            if unsaved_frames >= save_every:
                                unsaved_frames = 0
                                saver.save(record)
                        failures = 0
                        if on_progress is not None:
                            on_progress(offset, length)
                except (ConnectionLostError, FrameRejectedError,
                        exceptions.SlowRetrievalError) as e:
                    if record:
                        saver.save(record)  # durable too, in case the wait ends in a power cut
                    failures += 1
                    if failures > self._max_retries:
                        raise
                    logger.info("download of %s interrupted at %d (%s); resuming",
                                path, offset, e)
                    self.stats.resumes += 1
                    if not self._connection.wait_ready(self._reconnect_timeout):
                        raise ConnectionLostError(
                            f"broker unreachable for {self._reconnect_timeout}s") from e
            # Complete: the caller checks the hash and syncs the file before renaming
            # it, so no record is needed for the end, only the saves still running.
            saver.flush()
        finally:
            saver.close()


class ProgressSaver:
    """Makes download progress durable on its own thread: a record, one ``fdatasync``.

    The two durable slots are written in turn by one thread, one save at a
    time: so while a save runs, the other slot holds a record whose
    ``fdatasync`` had completed, which a power cut in the middle of this save
    leaves usable. Asking for a save never waits: a record asked for while a
    save runs waits its turn, replacing any older one still waiting (the
    latest slot covers a killed process meanwhile; a power cut falls back at
    most to the save running), so a slow disk never stalls the transfer.
    """

    def __init__(self, fd: int, length: int, *, timeout: float) -> None:
        self._fd = fd
        self._length = length
        self._timeout = timeout
        self._cond = threading.Condition()
        self._wanted: bytes | None = None
        self._asked = b""  # the latest record asked for
        self._saves = 0
        self._busy = False
        self._closed = False
        self._error: OSError | None = None
        self._thread: threading.Thread | None = None

    def save(self, record: bytes) -> None:
        """Queue an encoded record for saving (replacing one not yet started); never waits.

        Raises:
            OSError: an earlier save failed.
        """
        with self._cond:
            if self._error is not None:
                raise self._error
            if record == self._asked:
                return
            self._wanted = self._asked = record
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="download-saver",
                                                daemon=True)
                self._thread.start()

    def flush(self) -> None:
        """Wait until every queued save is on disk.

        Raises:
            OSError: a save failed, or did not finish within the timeout.
        """
        with self._cond:
            self._wait_idle()

    def close(self) -> None:
        """Stop the thread once the save in progress (if any) is done (bounded wait)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(self._timeout)

    def _wait_idle(self) -> None:
        if not self._cond.wait_for(
                lambda: self._error is not None or (self._wanted is None and not self._busy),
                self._timeout):
            raise OSError(f"saving download progress took more than {self._timeout}s")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._wanted is not None or self._closed)
                record, self._wanted = self._wanted, None
                if record is None:
                    return
                self._busy = True
            try:
                slot = _DURABLE_SLOTS[self._saves % len(_DURABLE_SLOTS)]
                _pwrite_all(self._fd, record, self._length + slot * RECORD_SLOT_BYTES)
                os.fdatasync(self._fd)
                self._saves += 1
            except OSError as e:
                with self._cond:
                    self._error, self._busy = e, False
                    self._cond.notify_all()
                return
            with self._cond:
                self._busy = False
                self._cond.notify_all()


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``os.pwrite`` may write less than asked)."""
    written = os.pwrite(fd, data, offset)
    if written == len(data):
        return
    view, position = memoryview(data)[written:], offset + written
    while view:
        written = os.pwrite(fd, view, position)
        if written <= 0:
            raise OSError(f"wrote nothing at offset {position}")
        view, position = view[written:], position + written


def _hash_range(fd: int, hasher: Any, start: int, end: int) -> Any:
    """Feed the bytes ``[start, end)`` of the open file ``fd`` to ``hasher``; return it.

    Raises:
        OSError: the file ends before ``end``.
    """
    position = start
    while position < end:
        block = os.pread(fd, min(_HASH_BLOCK, end - position), position)
        if not block:
            raise OSError("partial download shorter than its progress record")
        hasher.update(block)
        position += len(block)
    return hasher


def _sha256_of(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            hasher.update(block)
    return hasher.hexdigest()


