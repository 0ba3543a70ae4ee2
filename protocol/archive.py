"""Safe streaming tar reading and deterministic tar writing for bundles.

Bundles are tar streams because tar streams: one pass, no index, no seeking,
so a device can decrypt and unpack while downloading. Tar is also a classic
way in for path traversal, so every member is checked before a byte is
written: a plain relative name, a regular file, within per-member and total
size caps, and at most a bounded number of members. Anything else is refused
with ``UnsafeArchiveError``; nothing is ever extracted by ``tarfile`` itself.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from edgeota.protocol.digest import Digest, SyncDigest
from edgeota.protocol.errors import UnsafeArchiveError

__all__ = ["ArchiveMember", "ExtractLimits", "iter_members", "write_member"]

_COPY_BLOCK = 256 * 1024
# Zero padding a tar writer may add after the end-of-archive marker.
_MAX_TAR_PADDING = 1024 * 1024
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
    if not member.isreg():
        raise UnsafeArchiveError(f"tar member {member.name!r} is not a regular file")
    if member.size > limits.max_member_size:
        raise UnsafeArchiveError(
            f"tar member {member.name!r} is {member.size} bytes (limit {limits.max_member_size})"
        )


def iter_members(
    stream: BinaryIO,
    dest: Path,
    limits: ExtractLimits,
    *,
    on_bytes: Callable[[int], None] | None = None,
    before_write: Callable[[str, int], None] | None = None,
    new_digest: Callable[[], Digest] | None = SyncDigest,
) -> Iterator[ArchiveMember]:
    """Unpack a tar stream into ``dest`` member by member, yielding each when written.

    ``dest`` must be a fresh folder the caller discards on any error: a member
    is yielded only after it is fully on disk, but a later failure leaves the
    earlier ones behind for the caller to remove. ``before_write(name, size)``
    may refuse a member (by raising) after the generic checks and before any
    of its bytes touch the disk. ``new_digest=None`` skips per-member hashing.
    """
    total = 0
    count = 0
    try:
        tar = tarfile.open(fileobj=stream, mode="r|", bufsize=_COPY_BLOCK)  # noqa: SIM115
    except tarfile.ReadError as e:
        raise UnsafeArchiveError(f"bundle payload is not a tar stream: {e}") from e
    with tar:
        while True:
            try:
                member = tar.next()
            except tarfile.TarError as e:
                raise UnsafeArchiveError(f"corrupt tar header: {e}") from e
            if member is None:
                _drain_after_end(tar)
                return
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
            # Read the member straight from tarfile's stream: extractfile() adds
            # two buffering layers that cost a copy of every byte.
            stream_in = tar.fileobj
            digest = new_digest() if new_digest is not None else None
            written = 0
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as out:
                while written < member.size:
                    block = stream_in.read(min(_COPY_BLOCK, member.size - written))  # type: ignore[union-attr]
                    if not block:
                        break
                    out.write(block)
                    if digest is not None:
                        digest.update(block)
                    written += len(block)
                    if on_bytes is not None:
                        on_bytes(len(block))
            if written != member.size:
                raise UnsafeArchiveError(
                    f"tar member {member.name!r} holds {written} bytes, its header says "
                    f"{member.size}"
                )
            yield ArchiveMember(
                member.name, written, digest.hexdigest() if digest is not None else None
            )


def _drain_after_end(tar: tarfile.TarFile) -> None:
    """Read what follows the end-of-archive marker; only zero padding may.

    Reads through ``tar.fileobj`` (tarfile's own stream) because tarfile has
    already buffered past the marker: reading the source stream would miss it.
    """
    seen = 0
    while block := tar.fileobj.read(_COPY_BLOCK):  # type: ignore[union-attr]
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
