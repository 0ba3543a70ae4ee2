"""Safe streaming tar reading and deterministic tar writing for bundles.

Bundles are tar streams because tar streams: one pass, no index, no seeking,
so a device can decrypt and unpack while downloading. Tar is also a classic
way in for path traversal, so every member is checked before a byte is
written: a plain relative name, a regular file, within per-member and total
size caps, and at most a bounded number of members. Anything else is refused
with ``UnsafeArchiveError``; nothing is ever extracted by ``tarfile`` itself.

The reader frames the stream itself and leaves only the decoding of each
member's headers to ``tarfile`` (which sees those few hundred bytes and
nothing else). Member bytes go from the blocks they arrived in straight to
``os.writev``: reading them through ``tarfile``'s stream buffer and an
``io.BufferedReader`` copied every byte two or three times (~40 ms of a
~300 ms open of a 128 MiB bundle, measured). While a large member is
written, its pages are flushed on a background thread every 8 MiB, so the
fsync that makes it durable finds little left to do, the disk works while
the CPU decrypts, and a small device never holds the whole model as dirty
memory (the closing fsync of a 128 MiB model took 65 ms here, about half of
decrypt + sha256; flushing as it goes took ~55 ms off the open).
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import tarfile
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from edgeota.protocol.digest import Digest, SyncDigest
from edgeota.protocol.errors import UnsafeArchiveError

__all__ = [
    "ArchiveMember",
    "ExtractLimits",
    "iter_members",
    "iter_members_from_blocks",
    "write_member",
]

_COPY_BLOCK = 256 * 1024
# Member bytes are written in batches of about this size (one writev each).
_WRITE_BATCH = 1024 * 1024
# A member's written pages are flushed in the background every this many bytes.
_WRITEBACK_EVERY = 8 * 1024 * 1024
# Zero padding a tar writer may add after the end-of-archive marker.
_MAX_TAR_PADDING = 1024 * 1024
# Extended (pax / GNU long name) headers of one member, all told. Ours hold a
# path of at most ~520 bytes; a megabyte-long "header" is an attack.
_MAX_HEADER_GROUP = 64 * 1024
_BLOCK = tarfile.BLOCKSIZE
_EXTENSION_TYPES = (
    tarfile.XHDTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)
_ENCODING = "utf-8"
_SAFE_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class ExtractLimits:
    """Caps on what one bundle may unpack to. Generous for models, fatal for zip bombs."""

    max_members: int = 64
    max_member_size: int = 8 * 1024**3
    max_total_size: int = 16 * 1024**3
    max_path_depth: int = 4


@dataclass(frozen=True)
class ArchiveMember:
    """A checked member, after it was written to disk."""

    path: str
    size: int
    sha256: str | None  # None when the caller asked for no per-file digest


def check_member_name(name: str, limits: ExtractLimits) -> str:
    """Return ``name`` if it is a safe relative path, else raise ``UnsafeArchiveError``."""
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        raise UnsafeArchiveError(f"tar member {name!r} has an absolute or malformed path")
    parts = name.split("/")
    if ".." in parts:
        raise UnsafeArchiveError(f"tar member {name!r} climbs out of the bundle with '..'")
    if len(parts) > limits.max_path_depth:
        raise UnsafeArchiveError(f"tar member {name!r} is nested too deep")
    for part in parts:
        if not _SAFE_COMPONENT.fullmatch(part):
            raise UnsafeArchiveError(f"tar member {name!r} has an unsafe path component {part!r}")
    return name


def _check_member(member: tarfile.TarInfo, limits: ExtractLimits) -> None:
    check_member_name(member.name, limits)
    if member.issym() or member.islnk():
        raise UnsafeArchiveError(
            f"tar member {member.name!r} is a link to {member.linkname!r}: links are refused"
        )
    if member.isdev() or member.isfifo():
        raise UnsafeArchiveError(f"tar member {member.name!r} is a device or FIFO")
    # tarfile counts sparse files as regular, but their archived bytes are not
    # the file's bytes (a map of holes comes first): refused, never written.
    if not member.isreg() or member.issparse() or member.type == tarfile.GNUTYPE_SPARSE:
        raise UnsafeArchiveError(f"tar member {member.name!r} is not a regular file")
    if member.size > limits.max_member_size:
        raise UnsafeArchiveError(
            f"tar member {member.name!r} is {member.size} bytes (limit {limits.max_member_size})"
        )


class _Cursor:
    """Reads a sequence of blocks: exact copies for headers, zero-copy views for member bytes."""

    def __init__(self, blocks: Iterable[bytes | memoryview]) -> None:
        self._blocks = iter(blocks)
        self._view = memoryview(b"")
        self.offset = 0  # bytes consumed so far

    def _fill(self) -> bool:
        for block in self._blocks:
            if block:
                self._view = memoryview(block).cast("B")
                return True
        return False

    def views(self, size: int) -> Iterator[memoryview]:
        """Yield the next ``size`` bytes as views of the blocks (fewer at the end of the stream).

        The views are as read-only as the blocks, so a consumer may keep them
        (a digest thread does) without copying.
        """
        while size:
            if not self._view and not self._fill():
                return
            piece = self._view[:size]
            self._view = self._view[len(piece) :]
            self.offset += len(piece)
            size -= len(piece)
            yield piece

    def take(self, size: int) -> bytes:
        """The next ``size`` bytes as one ``bytes`` (shorter only at the end of the stream)."""
        return b"".join(self.views(size))

    def skip(self, size: int) -> int:
        """Discard up to ``size`` bytes; return how many there were."""
        return sum(len(piece) for piece in self.views(size))


class _Writeback:
    """Flushes a file being written with ``fdatasync`` on a thread, one request at a time.

    ``request`` returns at once (and is dropped while a flush is running: the
    next one catches up); ``wait`` blocks until no flush runs and re-raises the
    error a background flush met, which the final ``fsync`` of the same file
    descriptor would no longer report.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._fd: int | None = None
        self._busy = False
        self._stop = False
        self._error: OSError | None = None
        self._thread: threading.Thread | None = None

    def request(self, fd: int) -> None:
        with self._cond:
            if self._busy or self._fd is not None or self._stop:
                return
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="edgeota-writeback", daemon=True
                )
                self._thread.start()
            self._fd = fd
            self._cond.notify_all()

    def wait(self) -> None:
        with self._cond:
            while self._busy or self._fd is not None:
                self._cond.wait()
            error, self._error = self._error, None
        if error is not None:
            raise error

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._fd is None and not self._stop:
                    self._cond.wait()
                fd = self._fd
                if fd is None:  # stopped
                    return
                self._fd, self._busy = None, True
            try:
                os.fdatasync(fd)
            except OSError as e:
                with self._cond:
                    self._error = self._error or e
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def __enter__(self) -> _Writeback:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._cond:
            while self._busy or self._fd is not None:
                self._cond.wait()
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()


def _write_all(fd: int, views: list[memoryview], size: int) -> None:
    written = os.writev(fd, views)
    if written == size:
        return
    # A short write (a disk filling up, a signal): finish piece by piece, so
    # the next call raises the error if there is one.
    rest = memoryview(b"".join(views)[written:])
    while rest:
        rest = rest[os.write(fd, rest) :]


def _read_header_group(cursor: _Cursor) -> bytes | None:
    """The raw headers of the next member (extended headers and all); None at the archive's end."""
    start = cursor.offset
    group: list[bytes] = []
    size = 0
    while True:
        block = cursor.take(_BLOCK)
        if not group:
            if not block:
                if start == 0:
                    raise UnsafeArchiveError("bundle payload is not a tar stream: it is empty")
                return None  # the stream ended on a member boundary, as tarfile accepts
            if len(block) == _BLOCK and block.count(0) == _BLOCK:
                return None  # end-of-archive marker
        if len(block) < _BLOCK:
            raise UnsafeArchiveError("corrupt tar header: the stream ends inside a header")
        try:
            info = tarfile.TarInfo.frombuf(block, _ENCODING, "surrogateescape")
        except tarfile.HeaderError as e:
            if start == 0 and not group:
                raise UnsafeArchiveError(f"bundle payload is not a tar stream: {e}") from e
            raise UnsafeArchiveError(f"corrupt tar header at byte {cursor.offset - _BLOCK}: "
                                     f"{e}") from e
        group.append(block)
        size += _BLOCK
        if info.type == tarfile.XGLTYPE:
            raise UnsafeArchiveError("tar stream carries a global pax header: refused")
        if info.type not in _EXTENSION_TYPES:
            return b"".join(group)
        padded = -(-info.size // _BLOCK) * _BLOCK
        if size + padded > _MAX_HEADER_GROUP:
            raise UnsafeArchiveError(
                f"tar member headers exceed {_MAX_HEADER_GROUP} bytes (extended header of "
                f"{info.size} bytes)"
            )
        extension = cursor.take(padded)
        if len(extension) < padded:
            raise UnsafeArchiveError("corrupt tar header: the stream ends inside a header")
        group.append(extension)
        size += padded


def _parse_header_group(group: bytes) -> tarfile.TarInfo:
    """Decode one member's headers with ``tarfile`` (pax and GNU long names applied)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(group), mode="r|") as tar:
            member = tar.next()
    except tarfile.TarError as e:
        raise UnsafeArchiveError(f"corrupt tar header: {e}") from e
    if member is None:  # pragma: no cover - the group holds a checked header block
        raise UnsafeArchiveError("corrupt tar header")
    return member


def iter_members(
    stream: BinaryIO,
    dest: Path,
    limits: ExtractLimits,
    *,
    on_bytes: Callable[[int], None] | None = None,
    before_write: Callable[[str, int], None] | None = None,
    new_digest: Callable[[], Digest] | None = SyncDigest,
    durable: bool = True,
) -> Generator[ArchiveMember, None, None]:
    """Unpack the tar stream read from ``stream``: see ``iter_members_from_blocks``."""
    blocks = iter(functools.partial(stream.read, _COPY_BLOCK), b"")
    return iter_members_from_blocks(
        blocks, dest, limits, on_bytes=on_bytes, before_write=before_write,
        new_digest=new_digest, durable=durable,
    )


def iter_members_from_blocks(
    blocks: Iterable[bytes | memoryview],
    dest: Path,
    limits: ExtractLimits,
    *,
    on_bytes: Callable[[int], None] | None = None,
    before_write: Callable[[str, int], None] | None = None,
    new_digest: Callable[[], Digest] | None = SyncDigest,
    durable: bool = True,
) -> Generator[ArchiveMember, None, None]:
    """Unpack a tar stream, given as consecutive blocks, into ``dest`` member by member.

    Each member is yielded once it is written (and, with ``durable``, fsynced).
    ``dest`` must be a fresh folder the caller discards on any error: a later
    failure leaves the earlier members behind for the caller to remove.
    ``before_write(name, size)`` may refuse a member (by raising) after the
    generic checks and before any of its bytes touch the disk.
    ``new_digest=None`` skips per-member hashing. Blocks are written and
    hashed without a copy, so each must stay unchanged once passed: ``bytes``,
    or a read-only view of a buffer no one writes while the view lives
    (``digest`` takes a read-only view at that word).
    """
    cursor = _Cursor(blocks)
    total = 0
    count = 0
    with _Writeback() as writeback:
        while True:
            group = _read_header_group(cursor)
            if group is None:
                _drain_after_end(cursor)
                return
            member = _parse_header_group(group)
            count += 1
            if count > limits.max_members:
                raise UnsafeArchiveError(f"bundle has more than {limits.max_members} members")
            _check_member(member, limits)
            total += member.size
            if total > limits.max_total_size:
                raise UnsafeArchiveError(
                    f"bundle unpacks to more than {limits.max_total_size} bytes"
                )
            if before_write is not None:
                before_write(member.name, member.size)
            target = dest / member.name
            if target.exists():
                raise UnsafeArchiveError(f"tar member {member.name!r} appears twice")
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = new_digest() if new_digest is not None else None
            written = _write_file(cursor, target, member.size, digest, on_bytes,
                                  writeback if durable else None)
            if written != member.size:
                raise UnsafeArchiveError(
                    f"tar member {member.name!r} holds {written} bytes, its header says "
                    f"{member.size}"
                )
            padding = -member.size % _BLOCK
            if cursor.skip(padding) != padding:
                raise UnsafeArchiveError("corrupt tar header: unexpected end of data")
            yield ArchiveMember(
                member.name, written, digest.hexdigest() if digest is not None else None
            )


def _write_file(
    cursor: _Cursor,
    target: Path,
    size: int,
    digest: Digest | None,
    on_bytes: Callable[[int], None] | None,
    writeback: _Writeback | None,
) -> int:
    """Write the next ``size`` bytes of ``cursor`` to the new file ``target``; return the count.

    With ``writeback`` the file is flushed in the background as it grows and
    fsynced before this returns.
    """
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        written = unflushed = batched = 0
        batch: list[memoryview] = []
        for piece in cursor.views(size):
            if digest is not None:
                digest.update(piece)
            batch.append(piece)
            batched += len(piece)
            if batched < _WRITE_BATCH:
                continue
            _write_all(fd, batch, batched)
            if on_bytes is not None:
                on_bytes(batched)
            written += batched
            unflushed += batched
            batch, batched = [], 0
            if writeback is not None and unflushed >= _WRITEBACK_EVERY:
                writeback.request(fd)
                unflushed = 0
        if batch:
            _write_all(fd, batch, batched)
            if on_bytes is not None:
                on_bytes(batched)
            written += batched
        if writeback is not None:
            # fsync first: it waits for a background flush still running (the
            # pages under writeback) instead of after it. Then ``wait`` for that
            # flush, which re-raises an error it took from this descriptor.
            os.fsync(fd)
            writeback.wait()
    except BaseException:
        if writeback is not None:
            # Never close a descriptor a background flush still uses. Its own
            # error, if any, matters less than the one already propagating.
            with contextlib.suppress(OSError):
                writeback.wait()
        raise
    finally:
        os.close(fd)
    return written


def _drain_after_end(cursor: _Cursor) -> None:
    """Read what follows the end-of-archive marker; only zero padding may."""
    seen = 0
    while block := cursor.take(_COPY_BLOCK):
        seen += len(block)
        if seen > _MAX_TAR_PADDING or block.count(0) != len(block):
            raise UnsafeArchiveError("bundle carries data after the end of its tar archive")


def write_member(tar: tarfile.TarFile, name: str, source: BinaryIO, size: int) -> None:
    """Append one regular file with fixed metadata, so equal inputs make equal tars."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, source)
