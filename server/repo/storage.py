"""The blob-store folder that holds both TUF repositories, shared by every server replica.

Several replicas may serve and write one folder at the same time, so the
layout is built from files that never change once written:

* every metadata version is its own file, ``{N}.{role}.json``, created with a
  no-clobber link of a fully written temp file (the ``O_EXCL`` rule, made
  crash-safe): two writers can never both produce version N -- the second gets
  :class:`VersionConflictError` -- and a reader never sees a torn file;
* the only mutable name is the current-timestamp pointer ``timestamp.json``,
  replaced atomically (a hard link to the new ``{N}.timestamp.json`` renamed
  over it) and only by a newer version, so the repository a client sees never
  moves backwards;
* target files are stored under their sha256 (``targets/{dir}/{sha256}.{name}``,
  the URL ngclient builds for consistent snapshots), so they are immutable too.

Layout under the root folder::

    image/metadata/{N}.root.json, {N}.targets.json, {N}.bins-xx.json,
                   {N}.snapshot.json, {N}.timestamp.json, timestamp.json
    image/targets/models/{name}/{sha256}.{version}.eotb
    director/root/{N}.root.json
    director/devices/{device}/metadata/{N}.targets.json, {N}.snapshot.json,
                                       {N}.timestamp.json, timestamp.json

Repositories are named ``"image"``, ``"director"`` (the shared director root
only) and ``"director/{device}"``. A device repository reads its root from the
shared director root: every device is served the same root bytes.

This module only moves bytes; it verifies no signature. The ``*_for_request``
functions are what the HTTP and MQTT front ends call with a client-supplied
path: they accept only the exact names a TUF client asks for and answer
:class:`RepoFileNotFoundError` (a 404) for everything else, so no request can
name a file outside the store or a file that is not repository content.

``lock`` serialises read-modify-write sequences (new snapshot + timestamp)
between threads and processes with ``flock``; the no-clobber version files
stay the backstop where ``flock`` is not shared (some network filesystems).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tuf.api.metadata import TargetFile

from edgeota.protocol.errors import EdgeotaError
from edgeota.protocol.files import fsync_dir
from edgeota.protocol.identity import InvalidDeviceIdError, validate_device_id

__all__ = [
    "BIN_PREFIX",
    "DIRECTOR",
    "IMAGE",
    "RepoError",
    "RepoFileNotFoundError",
    "RepoStore",
    "TargetConflictError",
    "UploadArea",
    "UploadQuotaError",
    "VersionConflictError",
    "validate_target_path",
]

IMAGE = "image"
DIRECTOR = "director"
BIN_PREFIX = "bins"  # succinct hash-bin name prefix: bins-00 .. bins-3f (6 bits)

_TOP_LEVEL_ROLES = ("root", "targets", "snapshot", "timestamp")
# Bins with up to 32 bits (TAP 15's limit) have at most 8 hex digits.
_IMAGE_ROLE_RE = re.compile(rf"root|targets|snapshot|timestamp|{BIN_PREFIX}-[0-9a-f]{{1,8}}")
_DIRECTOR_ROLE_RE = re.compile(r"root|targets|snapshot|timestamp")
# No leading zeros: "01.root.json" must not alias "1.root.json". 18 digits stay below 2**63.
_VERSION_PATTERN = r"[1-9][0-9]{0,17}"
_REQUEST_NAME_RE = re.compile(rf"(?:(?P<version>{_VERSION_PATTERN})\.)?(?P<role>[a-z0-9-]+)\.json")
_VERSIONED_NAME_RE = re.compile(rf"(?P<version>{_VERSION_PATTERN})\.(?P<role>[a-z0-9-]+)\.json")
# Target path segments: plain names (semver may carry "+build"), never "." or ".." or hidden.
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_MAX_TARGET_DEPTH = 8
_MAX_TARGET_PATH = 1024  # characters
_MAX_METADATA_SIZE = 16 * 1024 * 1024  # bytes; the largest file ngclient accepts is 5 MB
_COPY_CHUNK = 1024 * 1024  # bytes
_DIR_MODE = 0o755
_FILE_MODE = 0o644
_POINTER = "timestamp.json"
_LOCK_FILE = ".lock"


class RepoError(EdgeotaError):
    """Base of every error of the TUF repositories (storage, image, director)."""


class VersionConflictError(RepoError):
    """A metadata version that already exists: another writer got there first; rebuild and retry."""


class RepoFileNotFoundError(RepoError):
    """No such repository file, or a request name that can never be one (HTTP 404)."""


class TargetConflictError(RepoError):
    """A stored target file whose size contradicts its content-hash name: the store is damaged."""


def _not_found(what: str) -> RepoFileNotFoundError:
    return RepoFileNotFoundError(f"no such repository file: {what[:200]!r}")


def _split_target_path(target_path: str) -> list[str]:
    """Return the segments of a servable target path, or raise ``ValueError``."""
    if not isinstance(target_path, str) or not 0 < len(target_path) <= _MAX_TARGET_PATH:
        raise ValueError("target path must be 1 to 1024 characters")
    segments = target_path.split("/")
    if len(segments) > _MAX_TARGET_DEPTH or not all(_SEGMENT_RE.fullmatch(s) for s in segments):
        raise ValueError(
            f"target path {target_path[:200]!r} must be up to {_MAX_TARGET_DEPTH} '/'-separated "
            f"plain names matching {_SEGMENT_RE.pattern} (no '.', '..', empty or hidden parts)"
        )
    return segments


def validate_target_path(target_path: str) -> str:
    """Return ``target_path`` if the store can hold and serve it, else raise ``ValueError``."""
    _split_target_path(target_path)
    return target_path


def _embedded_version_and_type(data: bytes) -> tuple[int, str]:
    try:
        signed = json.loads(data)["signed"]
        version, kind = signed["version"], signed["_type"]
    except (ValueError, KeyError, TypeError) as e:
        raise RepoError("metadata bytes are not TUF metadata JSON with signed.version") from e
    if not isinstance(version, int) or isinstance(version, bool) or not isinstance(kind, str):
        raise RepoError("metadata signed.version must be an integer and signed._type a string")
    return version, kind


def _link_new(tmp: Path, path: Path, *, sync: bool = True) -> None:
    """Give the fully written ``tmp`` the name ``path`` unless ``path`` exists (no clobber).

    ``sync=False`` leaves the folder sync to the caller (one for several links).
    """
    try:
        os.link(tmp, path)
    except FileExistsError as e:
        raise VersionConflictError(f"{path.name} already exists in {path.parent}") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    if sync:
        fsync_dir(path.parent)


def _write_temp(path: Path, data: bytes) -> Path:
    """Write ``data`` to a new synced temp file next to ``path``; return the temp file."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                 _FILE_MODE)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb", closefd=True) as f:
            fd = -1
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return tmp


def _write_new_file(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Create ``path`` holding ``data``; never replaces an existing file, never leaves a torn one.

    A plain ``O_EXCL`` create would leave a half-written version file behind a
    crash, and that name could then never be written again; so the bytes go to
    an ``O_EXCL`` temp file first, are synced, and the final name is added with
    ``link``, which fails atomically if the name exists.
    """
    _link_new(_write_temp(path, data), path, sync=sync)


def _point_to(folder: Path, version_file: Path) -> None:
    """Make ``timestamp.json`` the file ``version_file`` (a hard link renamed over it).

    The bytes are already synced under their version name, so the pointer
    costs no second copy and no file sync, only the folder sync after the rename.
    """
    tmp = folder / f".{_POINTER}.{secrets.token_hex(8)}.tmp"
    os.link(version_file, tmp)
    try:
        tmp.replace(folder / _POINTER)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(folder)


class RepoStore:
    """Byte-level access to the repository folder; no state besides the folder path."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    # -- naming ------------------------------------------------------------

    def _repo_parts(self, repo: str) -> tuple[str, str | None]:
        """Split a repository name into (kind, device id); raise ``ValueError`` if malformed."""
        if repo == IMAGE:
            return IMAGE, None
        if repo == DIRECTOR:
            return DIRECTOR, None
        kind, sep, device = repo.partition("/") if isinstance(repo, str) else ("", "", "")
        if kind == DIRECTOR and sep:
            try:
                return DIRECTOR, validate_device_id(device)
            except InvalidDeviceIdError as e:
                raise ValueError(f"repository {repo[:100]!r}: {e}") from e
        raise ValueError(f"unknown repository {str(repo)[:100]!r}: use 'image', 'director' "
                         "or 'director/{device}'")

    def _metadata_dir(self, repo: str, role: str) -> Path:
        """The folder holding ``role`` of ``repo``; raise ``ValueError`` for impossible pairs."""
        kind, device = self._repo_parts(repo)
        if kind == IMAGE:
            if not _IMAGE_ROLE_RE.fullmatch(role):
                raise ValueError(f"unknown image role {role[:100]!r}")
            return self.root / IMAGE / "metadata"
        if not _DIRECTOR_ROLE_RE.fullmatch(role):
            raise ValueError(f"unknown director role {role[:100]!r}")
        if role == "root":
            return self.root / DIRECTOR / "root"
        if device is None:
            raise ValueError("the shared 'director' repository holds only root: use "
                             "'director/{device}' for targets, snapshot and timestamp")
        return self._device_dir(device)

    def _device_dir(self, device: str) -> Path:
        return self.root / DIRECTOR / "devices" / device / "metadata"

    def metadata_dir(self, repo: str) -> Path:
        """The folder clients' ``{N}.{role}.json`` names resolve in (for targets-type roles)."""
        return self._metadata_dir(repo, "targets" if repo != DIRECTOR else "root")

    # -- metadata ----------------------------------------------------------

    def write_metadata(self, repo: str, role: str, version: int, data: bytes) -> None:
        """Store ``data`` as ``{version}.{role}.json``; for timestamp also move the pointer.

        The bytes must be that role's metadata at that version (checked on the
        ``signed`` part), so a mixed-up call can never publish a file whose name lies.

        Raises:
            VersionConflictError: that version exists already, or (timestamp) a
                newer timestamp is already current.
            RepoError: ``data`` is not metadata of that version and type.
            ValueError: unknown repository or role; root through a device repository.
        """
        self.write_metadata_set(repo, [(role, version, data)])

    def write_metadata_set(self, repo: str, files: Sequence[tuple[str, int, bytes]]) -> None:
        """Store several new versions of ``repo``'s roles, e.g. targets, snapshot, timestamp.

        Each ``(role, version, data)`` is checked and written as by
        :meth:`write_metadata`, in order: every file synced under a temp name,
        then published with a no-clobber link. What is shared is the folder
        sync: one after all the links -- so every new version file is durable
        before the timestamp pointer can move -- and, if a timestamp is in the
        set (it must be last), one after the pointer. Three roles cost five
        fsyncs instead of eight; the crash guarantees are those of one call per
        file: a crash leaves at most unreferenced new version files, and the
        pointer names either the old timestamp or the new one.

        Raises:
            VersionConflictError, RepoError, ValueError: as :meth:`write_metadata`;
                files before the one that failed stay published (as with one
                call per file), never the pointer.
        """
        if not files:
            return
        folders = set()
        for index, (role, version, data) in enumerate(files):
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise ValueError(f"version must be a positive integer, got {version!r}")
            folders.add(self._metadata_dir(repo, role))
            if role == "root" and repo not in (IMAGE, DIRECTOR):
                raise ValueError("director root is shared: write it to the 'director' repository")
            if role == "timestamp" and index != len(files) - 1:
                raise ValueError("a timestamp must be the last file of a metadata set")
            embedded, kind = _embedded_version_and_type(data)
            expected_kind = role if role in _TOP_LEVEL_ROLES else "targets"
            if embedded != version or kind != expected_kind:
                raise RepoError(
                    f"refusing to store {kind} v{embedded} as {version}.{role}.json in {repo}"
                )
        if len(folders) != 1:
            raise ValueError(f"a metadata set must live in one folder, not {len(folders)}")
        folder = folders.pop()
        folder.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
        for role, version, data in files:
            if role == "timestamp":
                break
            _write_new_file(folder / f"{version}.{role}.json", data, sync=False)
        else:
            fsync_dir(folder)
            return
        version, data = files[-1][1], files[-1][2]
        with self._flock(folder / f"{_LOCK_FILE}-pointer"):
            current = self._pointer_version(folder)
            if current is not None and version <= current:
                fsync_dir(folder)  # the files linked above are published all the same
                raise VersionConflictError(
                    f"timestamp v{version} is not newer than the current v{current} in {repo}"
                )
            new = folder / f"{version}.timestamp.json"
            _write_new_file(new, data, sync=False)
            fsync_dir(folder)
            _point_to(folder, new)

    def _pointer_version(self, folder: Path) -> int | None:
        try:
            data = _read_bounded(folder / _POINTER)
        except FileNotFoundError:
            return None
        return _embedded_version_and_type(data)[0]

    def read_metadata(self, repo: str, role: str, version: int | None = None) -> bytes:
        """Return ``{version}.{role}.json``; ``None`` means the current one.

        The current timestamp is the pointer file; for other roles it is the
        highest stored version.

        Raises:
            RepoFileNotFoundError: no such version (or none at all).
        """
        folder = self._metadata_dir(repo, role)
        if version is None:
            if role == "timestamp":
                try:
                    return _read_bounded(folder / _POINTER)
                except FileNotFoundError as e:
                    raise _not_found(f"{repo}/timestamp.json") from e
            version = self.latest_version(repo, role)
            if version is None:
                raise _not_found(f"{repo}/{role}.json (no version stored)")
        try:
            return _read_bounded(folder / f"{version}.{role}.json")
        except FileNotFoundError as e:
            raise _not_found(f"{repo}/{version}.{role}.json") from e

    def latest_version(self, repo: str, role: str) -> int | None:
        """The highest stored version of ``role`` in ``repo``, or ``None`` if there is none."""
        folder = self._metadata_dir(repo, role)
        best: int | None = None
        for name in _list_names(folder):
            match = _VERSIONED_NAME_RE.fullmatch(name)
            if match is not None and match["role"] == role:
                version = int(match["version"])
                best = version if best is None or version > best else best
        return best

    def latest_versions(self, repo: str) -> dict[str, int]:
        """The highest stored version of every role in ``repo``'s metadata folder (one listing).

        For ``"director/{device}"`` this covers the device's own roles, not the shared root.
        """
        folder = self.metadata_dir(repo)
        best: dict[str, int] = {}
        for name in _list_names(folder):
            match = _VERSIONED_NAME_RE.fullmatch(name)
            if match is None:
                continue
            version = int(match["version"])
            if version > best.get(match["role"], 0):
                best[match["role"]] = version
        return best

    def devices(self) -> list[str]:
        """Device ids that have a director metadata folder, sorted."""
        base = self.root / DIRECTOR / "devices"
        found = []
        for name in sorted(_list_names(base)):
            try:
                validate_device_id(name)
            except InvalidDeviceIdError:
                continue
            if (base / name / "metadata").is_dir():
                found.append(name)
        return found

    @contextlib.contextmanager
    def lock(self, repo: str) -> Iterator[None]:
        """Hold the exclusive lock of ``repo`` (threads and processes) for a read-modify-write."""
        folder = self.metadata_dir(repo)
        folder.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
        with self._flock(folder / _LOCK_FILE):
            yield

    @staticmethod
    @contextlib.contextmanager
    def _flock(path: Path) -> Iterator[None]:
        # One open file description per acquisition: flock then also excludes
        # other threads of this process, not only other processes.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, _FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    # -- requests from clients ----------------------------------------------

    def metadata_file_for_request(self, repo: str, filename: str) -> Path:
        """Map a client's metadata request to a file: ``{N}.{role}.json`` or ``timestamp.json``.

        ``repo`` is ``"image"`` or ``"director/{device}"`` as taken from the
        request path; director root requests map to the shared root.

        Raises:
            RepoFileNotFoundError: a name no client may ask for, an unknown
                device, or a file that does not exist.
        """
        if not isinstance(repo, str) or not isinstance(filename, str):
            raise _not_found(str(filename))
        match = _REQUEST_NAME_RE.fullmatch(filename)
        if match is None or (match["version"] is None and match["role"] != "timestamp"):
            raise _not_found(filename)
        role = match["role"]
        try:
            kind, device = self._repo_parts(repo)
            if kind == DIRECTOR and device is None:
                raise ValueError("the shared director repository is served per device")
            folder = self._metadata_dir(repo, role)
        except ValueError as e:
            raise _not_found(f"{repo}/{filename}") from e
        if device is not None and not self._device_dir(device).is_dir():
            raise _not_found(f"{repo}/{filename}")
        return self._existing_file(folder / filename, f"{repo}/{filename}")

    def target_file_for_request(self, filename_path: str) -> Path:
        """Map a client's ``image/targets/{filename_path}`` request to the stored file.

        Only hash-prefixed names (``dir/{sha256}.{name}``) exist; the path must
        already be URL-decoded by the caller and is never decoded again here.

        Raises:
            RepoFileNotFoundError: a path no client may ask for or a missing file.
        """
        try:
            segments = _split_target_path(filename_path)
        except ValueError as e:
            raise _not_found(str(filename_path)) from e
        digest, dot, rest = segments[-1].partition(".")
        if not dot or not rest or _SHA256_RE.fullmatch(digest) is None:
            raise _not_found(filename_path)
        return self._existing_file(self._targets_dir().joinpath(*segments), filename_path)

    def file_for_request(self, path: str) -> Path:
        """Map a repository request path (the same over HTTP ``/repo/`` and MQTT) to a file.

        Accepts ``image/metadata/{file}``, ``image/targets/{path}`` and
        ``director/{device}/metadata/{file}``.

        Raises:
            RepoFileNotFoundError: anything else, or a missing file.
        """
        if not isinstance(path, str):
            raise _not_found(str(path))
        parts = path.split("/")
        if len(parts) == 3 and parts[0] == IMAGE and parts[1] == "metadata":
            return self.metadata_file_for_request(IMAGE, parts[2])
        if len(parts) >= 3 and parts[0] == IMAGE and parts[1] == "targets":
            return self.target_file_for_request("/".join(parts[2:]))
        if len(parts) == 4 and parts[0] == DIRECTOR and parts[2] == "metadata":
            return self.metadata_file_for_request(f"{DIRECTOR}/{parts[1]}", parts[3])
        raise _not_found(path)

    def _existing_file(self, candidate: Path, what: str) -> Path:
        # Defence in depth: the name rules above already exclude separators
        # and dot segments, but a symlink planted in the store must not lead out.
        resolved = candidate.resolve()
        if not resolved.is_relative_to(self.root) or not resolved.is_file():
            raise _not_found(what)
        return resolved

    # -- targets -----------------------------------------------------------

    def _targets_dir(self) -> Path:
        return self.root / IMAGE / "targets"

    def _stored_target_path(self, target_path: str, sha256: str) -> Path:
        segments = _split_target_path(target_path)
        return self._targets_dir().joinpath(*segments[:-1], f"{sha256}.{segments[-1]}")

    def put_target(self, target_path: str, source: Path) -> TargetFile:
        """Store the file ``source`` as target ``target_path``; return its length and sha256.

        The file is read once, hashed while it is copied into a temp file next
        to its final name, and published under its hash with a no-clobber link.
        Storing the same content again is a no-op.

        Raises:
            ValueError: ``target_path`` is not a servable path.
            TargetConflictError: a stored file under that hash has another size.
            OSError: ``source`` cannot be read.
        """
        segments = _split_target_path(target_path)
        folder = self._targets_dir().joinpath(*segments[:-1])
        folder.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
        tmp = folder / f".{segments[-1]}.{secrets.token_hex(8)}.tmp"
        hasher = hashlib.sha256()
        length = 0
        try:
            with Path(source).open("rb") as src, _open_new(tmp) as dst:
                while chunk := src.read(_COPY_CHUNK):
                    hasher.update(chunk)
                    dst.write(chunk)
                    length += len(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            digest = hasher.hexdigest()
            final = folder / f"{digest}.{segments[-1]}"
            try:
                _link_new(tmp, final)
            except VersionConflictError:
                existing = final.stat().st_size
                if existing != length:
                    raise TargetConflictError(
                        f"stored target {final} is {existing} bytes but its name says it is the "
                        f"{length}-byte file with sha256 {digest}: the store is damaged"
                    ) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return TargetFile(length, {"sha256": digest}, target_path)

    def check_target(self, target: TargetFile) -> Path:
        """Return the stored file of ``target`` after checking its length.

        Raises:
            RepoFileNotFoundError: no sha256 in ``target`` or no such stored file.
            TargetConflictError: the stored file has another length.
        """
        digest = target.hashes.get("sha256")
        if not isinstance(digest, str) or _SHA256_RE.fullmatch(digest) is None:
            raise RepoFileNotFoundError(f"target {target.path!r} has no sha256 hash to find it by")
        try:
            path = self._stored_target_path(target.path, digest)
        except ValueError as e:
            raise RepoFileNotFoundError(
                f"target path {target.path[:200]!r} cannot be stored"
            ) from e
        try:
            size = path.stat().st_size
        except FileNotFoundError as e:
            raise RepoFileNotFoundError(
                f"target {target.path!r} (sha256 {digest}) has not been uploaded"
            ) from e
        if size != target.length:
            raise TargetConflictError(
                f"stored target {target.path!r} (sha256 {digest}) is {size} bytes, "
                f"metadata says {target.length}"
            )
        return path


@contextlib.contextmanager
def _open_new(path: Path) -> Iterator[BinaryIO]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                 _FILE_MODE)
    try:
        os.fchmod(fd, _FILE_MODE)
        f = os.fdopen(fd, "wb", closefd=True)
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


def _list_names(folder: Path) -> list[str]:
    try:
        return [entry.name for entry in folder.iterdir()]
    except FileNotFoundError:
        return []


def _read_bounded(path: Path) -> bytes:
    """Read a metadata file, refusing one larger than any client would accept."""
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_METADATA_SIZE + 1)
    except IsADirectoryError as e:
        raise FileNotFoundError(errno.ENOENT, "not a file", str(path)) from e
    if len(data) > _MAX_METADATA_SIZE:
        raise RepoError(f"metadata file {path} is larger than {_MAX_METADATA_SIZE} bytes")
    return data


class UploadQuotaError(RepoError):
    """An upload that would take the uploads folder past its quota."""


@dataclass(frozen=True)
class UploadArea:
    """The folder of bundles uploaded for releases not yet published: bounded and swept.

    Holds ``<sha256>`` files (complete uploads), ``.<sha256>.<random>.partial``
    files (uploads in progress, or left by a crash) and the scratch folders
    release acceptance opens bundles in. Everything in it counts against
    ``quota_bytes``; :meth:`sweep` removes what nothing needs any more.
    """

    root: Path
    quota_bytes: int
    stale_seconds: float
    clock: Callable[[], float] = time.time

    def usage(self) -> int:
        """Bytes of every file below the folder (a few uploads: a walk is cheap)."""
        total = 0
        for folder, _dirs, files in os.walk(self.root):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    total += (Path(folder) / name).lstat().st_size
        return total

    def check_room(self, more: int) -> None:
        """Refuse ``more`` bytes that the quota has no room for.

        Raises:
            UploadQuotaError: usage plus ``more`` exceeds the quota.
        """
        used = self.usage()
        if used + more > self.quota_bytes:
            raise UploadQuotaError(
                f"uploads hold {used} bytes; {more} more would pass the quota of "
                f"{self.quota_bytes} (submit or abandon pending uploads first)")

    def path(self, sha256: str) -> Path:
        if _SHA256_RE.fullmatch(sha256) is None:
            raise ValueError("an upload is named by a lowercase sha256 hex digest")
        return self.root / sha256

    def remove(self, sha256: str) -> bool:
        """Delete the complete upload ``sha256``; whether there was one."""
        try:
            self.path(sha256).unlink()
        except FileNotFoundError:
            return False
        return True

    def sweep(self, keep: Collection[str]) -> list[str]:
        """Remove entries untouched for ``stale_seconds`` whose name is not in ``keep``.

        ``keep`` names the uploads pending releases still need. A partial file
        being written is touched by every write, so only abandoned ones go.
        Returns the names removed.
        """
        cutoff = self.clock() - self.stale_seconds
        removed: list[str] = []
        for entry in _list_names(self.root):
            if entry in keep:
                continue
            path = self.root / entry
            try:
                if path.lstat().st_mtime > cutoff:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except FileNotFoundError:
                continue
            removed.append(entry)
        return removed
