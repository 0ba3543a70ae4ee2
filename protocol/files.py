"""The one place edgeota writes files that must survive a power cut or stay secret.

Devices run on SD cards that lose power mid-write, and the server keeps
private keys next to ordinary files, so every writer in the project (agent
journal, keystores, identity folders, blob store) goes through these helpers
instead of ``Path.write_bytes``:

* :func:`atomic_write` -- a reader sees the old content or the new content,
  never a torn mix, even after a power loss: temp file in the same folder,
  write, ``fsync`` the file, ``os.replace``, ``fsync`` the folder (without the
  last step the rename itself may be lost).
* :func:`write_private_file` -- the same, with mode 0600 fixed on the file
  descriptor before the first byte is written, so a secret never exists on disk
  with wider permissions, whatever the process umask is.
* :func:`read_private_file` -- reads a secret back, refusing a file that other
  users could read (the way ``ssh`` refuses a private key with mode 0644) and
  bounding its size, so a wrong path cannot make the reader swallow a huge file.

POSIX only: the permission checks are meaningless on Windows, which edgeota
does not target.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path

from edgeota.protocol.errors import ProtocolError

__all__ = [
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "PUBLIC_FILE_MODE",
    "FileTooLargeError",
    "InsecureKeyFileError",
    "atomic_write",
    "drop_cached_pages",
    "fsync_dir",
    "make_private_dir",
    "read_bounded",
    "read_private_file",
    "write_private_file",
]

PRIVATE_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
PRIVATE_DIR_MODE = 0o700
# Any group or other bit on a secret is refused, not only the read bits: a file
# others may write can be swapped for a key the attacker knows.
_FORBIDDEN_PRIVATE_BITS = 0o077
_TEMP_SUFFIX = ".tmp"


class InsecureKeyFileError(ProtocolError):
    """A private file that users other than its owner may access, or that is not a regular file."""


class FileTooLargeError(ProtocolError):
    """A file larger than the bound its reader set: not the file the caller expects."""


def drop_cached_pages(path: Path) -> bool:
    """Ask the kernel to drop the page cache of ``path``; ``False`` if it could not be asked.

    For a file whose bytes now live elsewhere in memory (a model onnxruntime
    has parsed): its cached copy only doubles what the weights take, which a
    small device pays for in memory and the kernel in reclaim. Clean pages
    go at once; dirty ones are left (the kernel starts their writeback), and
    pages a process has mapped stay mapped. Best effort: the file is only
    read, and a system without ``posix_fadvise`` keeps its cache.
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:  # pragma: no cover - every POSIX system edgeota runs on has it
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (new names, renames) to stable storage.

    ``os.replace`` changes the folder, not the file; until the folder itself is
    synced a power cut can bring back the old name or lose the new one.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some filesystems (certain FUSE and network mounts) cannot sync a
        # folder at all; there is nothing stronger to do there, so only that
        # specific refusal is tolerated. Every other error propagates.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = PUBLIC_FILE_MODE) -> None:
    """Replace ``path`` with ``data`` so that readers never see a partial file.

    The temp file is created in the destination folder (``os.replace`` is only
    atomic within one filesystem) with ``O_EXCL`` and the final ``mode`` set on
    its descriptor before writing, so it is never wider than ``mode`` even for
    an instant and the umask cannot change the result. On any failure the temp
    file is removed and the old content of ``path`` is left untouched.
    """
    path = Path(path)
    folder = path.parent
    tmp = folder / f".{path.name}.{secrets.token_hex(8)}{_TEMP_SUFFIX}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(tmp, flags, mode & 0o777)
    try:
        # The umask only ever narrows the creation mode; fchmod makes the
        # result exact (e.g. 0644 stays 0644 under umask 077, 0600 stays 0600).
        os.fchmod(fd, mode & 0o777)
        with os.fdopen(fd, "wb", closefd=True) as f:
            fd = -1  # owned by the file object from here on
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(folder)


def write_private_file(path: Path, data: bytes) -> None:
    """Atomically write a secret (private key) as a file readable by its owner only (0600).

    Overwriting an existing file is allowed; the replacement is a new inode
    created 0600, so even a previous file with wider permissions does not leak
    the new content.
    """
    atomic_write(path, data, mode=PRIVATE_FILE_MODE)


def read_private_file(path: Path, max_size: int) -> bytes:
    """Read a secret written by :func:`write_private_file`, refusing unsafe files.

    Raises:
        InsecureKeyFileError: the file grants any permission to group or others,
            or is not a regular file.
        FileTooLargeError: the file is larger than ``max_size`` bytes.
        OSError: the file cannot be opened (``FileNotFoundError`` if missing).
    """
    if max_size < 0:
        raise ValueError(f"max_size must be >= 0, got {max_size}")
    # O_NONBLOCK keeps a FIFO planted at the path from blocking the open; it
    # changes nothing for regular files. The checks use fstat on the opened
    # descriptor, so the file checked is the file read (no check-then-open race).
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InsecureKeyFileError(f"private file {path} is not a regular file")
        perms = stat.S_IMODE(st.st_mode)
        if perms & _FORBIDDEN_PRIVATE_BITS:
            raise InsecureKeyFileError(
                f"private file {path} has mode {perms:04o}; it must not be accessible to "
                f"group or others (fix with: chmod 600 {path})"
            )
        if st.st_size > max_size:
            raise FileTooLargeError(
                f"private file {path} is {st.st_size} bytes, more than the {max_size} allowed"
            )
        chunks: list[bytes] = []
        remaining = max_size + 1  # one byte more tells a file that grew since fstat
        while remaining > 0:
            chunk = os.read(fd, remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_size:
        raise FileTooLargeError(f"private file {path} is more than {max_size} bytes")
    return data


def read_bounded(path: Path, max_size: int, what: str) -> bytes:
    """Read a small file whole, refusing one larger than ``max_size`` bytes.

    Raises ``FileTooLargeError`` for an oversized file and ``OSError`` as
    ``open`` does; ``what`` names the file in messages ("certificate", ...).
    """
    with Path(path).open("rb") as f:
        raw = f.read(max_size + 1)
    if len(raw) > max_size:
        raise FileTooLargeError(f"{what} file {path} is larger than {max_size} bytes")
    return raw


def make_private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) with mode 0700 if it does not exist yet.

    An existing folder keeps its mode: changing the permissions of a folder the
    operator chose is not this function's call. Returns ``path``.
    """
    path = Path(path)
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
        # mkdir's mode is narrowed by the umask; chmod makes it exactly 0700.
        path.chmod(PRIVATE_DIR_MODE)
    return path
