"""Sealed model bundles: one immutable encrypted file per release.

A bundle is ``seal(tar(manifest.json, model.onnx, external data...))`` with
the streaming AEAD of ``edgeota.protocol.stream``. The writer streams from the
model files into the sealed file and the reader streams from the sealed file
into a staging folder, so peak memory is a few chunks whatever the model size.

The reader trusts nothing until it is proven: chunks authenticate as they are
read, the manifest is schema-checked, each payload file must be exactly the
one the manifest pins (name, order, size, sha256), and the staging folder
becomes the destination only after the last chunk authenticated. On any error
the staging folder is removed, so no partial plaintext stays on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import secrets
import shutil
import tarfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from edgeota.protocol.archive import ExtractLimits, iter_members_from_blocks, write_member
from edgeota.protocol.digest import Digest, DigestWorker, SyncDigest
from edgeota.protocol.errors import (
    ManifestError,
    PlaintextDigestError,
    SealedDigestError,
    UnsafeArchiveError,
)
from edgeota.protocol.files import fsync_dir
from edgeota.protocol.manifest import MANIFEST_PATH, MAX_MANIFEST_SIZE, Manifest, PayloadFile
from edgeota.protocol.stream import (
    DEFAULT_CHUNK_SIZE,
    AeadSuite,
    SealedHeader,
    StreamOpener,
    StreamSealer,
    read_header,
)

__all__ = [
    "BundleInfo",
    "OpenedBundle",
    "describe_payload",
    "generate_content_key",
    "inspect_bundle",
    "open_bundle",
    "seal_bundle",
]

ProgressCallback = Callable[[int], None]
_READ_BLOCK = 256 * 1024
# Below this sealed size, hashing threads cost more than they save.
_THREADED_DIGEST_FROM = 4 * 1024 * 1024


def generate_content_key() -> bytes:
    """A fresh random content key: one per release, never reused."""
    return secrets.token_bytes(32)


def describe_payload(path: Path, name: str | None = None) -> PayloadFile:
    """Pin a file for a manifest: its bundle path, sha256 and size, read in one pass."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as source:
        while block := source.read(_READ_BLOCK):
            digest.update(block)
            size += len(block)
    return PayloadFile(name or path.name, digest.hexdigest(), size)


@dataclass(frozen=True)
class BundleInfo:
    """Facts about a sealed bundle: the sealed digest goes into TUF, the plaintext one in custom."""

    path: Path
    suite: AeadSuite
    chunk_size: int
    sealed_size: int
    sealed_sha256: str
    plaintext_size: int
    plaintext_sha256: str


class _CountingReader(io.RawIOBase):
    """Reads a payload file while hashing it: the writer checks what it seals in the same pass."""

    def __init__(self, source: BinaryIO, progress: ProgressCallback | None, digest: Digest) -> None:
        super().__init__()
        self._source = source
        self._progress = progress
        self.digest = digest
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        count = self._source.readinto(buffer)  # type: ignore[attr-defined]
        if count:
            self.digest.update(bytes(memoryview(buffer)[:count]))
            self.size += count
            if self._progress is not None:
                self._progress(count)
        return count or 0


def seal_bundle(
    manifest: Manifest,
    payload: Mapping[str, Path],
    dst: Path,
    content_key: bytes,
    *,
    suite: AeadSuite = AeadSuite.CHACHA20_POLY1305,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: ProgressCallback | None = None,
) -> BundleInfo:
    """Seal ``manifest`` and the files it names into ``dst`` (written atomically).

    ``payload`` maps each manifest path to the local file holding it. A file
    whose bytes differ from what the manifest pins (changed since it was
    described) aborts the write and leaves no ``dst``.
    """
    wanted = {f.path for f in manifest.files}
    if set(payload) != wanted:
        raise ManifestError(
            f"payload files {sorted(payload)} do not match the manifest's {sorted(wanted)}"
        )
    manifest_bytes = manifest.to_json()
    if len(manifest_bytes) > MAX_MANIFEST_SIZE:
        raise ManifestError(f"manifest is {len(manifest_bytes)} bytes (limit {MAX_MANIFEST_SIZE})")
    partial = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.partial")
    try:
        with partial.open("xb") as raw_out, DigestWorker() as hasher:
            sealer = StreamSealer(
                raw_out, content_key, suite=suite, chunk_size=chunk_size, new_digest=hasher.digest
            )
            with sealer, tarfile.open(fileobj=sealer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                write_member(tar, MANIFEST_PATH, io.BytesIO(manifest_bytes), len(manifest_bytes))
                for pinned in manifest.files:
                    with payload[pinned.path].open("rb") as source:
                        reader = _CountingReader(source, progress, hasher.digest())
                        write_member(tar, pinned.path, reader, pinned.size)  # type: ignore[arg-type]
                    if reader.digest.hexdigest() != pinned.sha256 or reader.size != pinned.size:
                        raise ManifestError(
                            f"{payload[pinned.path]} changed while sealing: it no longer "
                            f"matches the manifest's sha256/size for {pinned.path!r}"
                        )
            raw_out.flush()
            os.fsync(raw_out.fileno())
            sealed_sha256, plaintext_sha256 = sealer.sealed_sha256, sealer.plaintext_sha256
        os.replace(partial, dst)
        fsync_dir(dst.parent)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return BundleInfo(
        path=dst,
        suite=suite,
        chunk_size=chunk_size,
        sealed_size=sealer.sealed_size,
        sealed_sha256=sealed_sha256,
        plaintext_size=sealer.plaintext_size,
        plaintext_sha256=plaintext_sha256,
    )


@dataclass(frozen=True)
class OpenedBundle:
    """An opened, fully authenticated bundle unpacked into ``folder``."""

    manifest: Manifest
    folder: Path
    header: SealedHeader
    plaintext_size: int
    plaintext_sha256: str

    @property
    def model_path(self) -> Path:
        return self.folder / self.manifest.model.path


@dataclass(frozen=True)
class BundleSummary:
    """What can be read from a sealed bundle without its key."""

    header: SealedHeader
    sealed_size: int
    plaintext_size: int
    chunk_count: int


def inspect_bundle(path: Path) -> BundleSummary:
    """Read a bundle's header and derived sizes; needs no key and authenticates nothing."""
    with path.open("rb") as source:
        header = read_header(source)
    sealed_size = path.stat().st_size
    return BundleSummary(
        header=header,
        sealed_size=sealed_size,
        plaintext_size=header.plaintext_size(sealed_size),
        chunk_count=header.chunk_count(sealed_size),
    )


class _Verifier:
    """Checks each tar member against the manifest before it is written."""

    def __init__(self) -> None:
        self.manifest: Manifest | None = None
        self.index = 0

    def before_write(self, name: str, size: int) -> None:
        if self.index == 0:
            if name != MANIFEST_PATH:
                raise ManifestError(f"first bundle member is {name!r}, not {MANIFEST_PATH}")
            if size > MAX_MANIFEST_SIZE:
                raise ManifestError(f"manifest is {size} bytes (limit {MAX_MANIFEST_SIZE})")
        else:
            assert self.manifest is not None
            files = self.manifest.files
            if self.index > len(files):
                raise UnsafeArchiveError(f"bundle member {name!r} is not named by the manifest")
            pinned = files[self.index - 1]
            if name != pinned.path or size != pinned.size:
                raise UnsafeArchiveError(
                    f"bundle member {name!r} ({size} bytes) is not the manifest's next file "
                    f"{pinned.path!r} ({pinned.size} bytes)"
                )
        self.index += 1


def open_bundle(
    src: Path,
    content_key: bytes,
    dest: Path,
    *,
    expected_plaintext_sha256: str | None = None,
    expected_sealed_sha256: str | None = None,
    limits: ExtractLimits | None = None,
    progress: ProgressCallback | None = None,
) -> OpenedBundle:
    """Decrypt, authenticate and unpack ``src`` into the new folder ``dest``.

    ``expected_sealed_sha256`` (the TUF target hash) and
    ``expected_plaintext_sha256`` (from the target's signed ``custom``) are
    checked in the same single pass over the file; a bundle that opens but
    does not match either is refused. Without ``expected_sealed_sha256`` the
    sealed bytes are not hashed at all (for a caller that has just checked
    them); every chunk still authenticates under ``content_key``. ``dest``
    must not exist: it appears, complete, only on success.
    """
    if dest.exists():
        raise FileExistsError(f"destination {dest} already exists")
    limits = limits or ExtractLimits()
    staging = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.partial")
    staging.mkdir(parents=True, mode=0o700)
    verifier = _Verifier()
    try:
        # Each stream to hash (sealed, plaintext, per-file) runs on a thread of
        # its own beside decryption and writing, for bundles big enough to pay
        # for the threads; small ones are hashed inline.
        threaded = src.stat().st_size >= _THREADED_DIGEST_FROM
        with src.open("rb", buffering=0) as raw_in, \
                (DigestWorker() if threaded else contextlib.nullcontext()) as worker:
            new_digest = worker.digest if worker is not None else SyncDigest
            opener = StreamOpener(raw_in, content_key, new_digest=new_digest,
                                  hash_sealed=expected_sealed_sha256 is not None)
            members = iter_members_from_blocks(
                opener.blocks(),
                staging,
                limits,
                on_bytes=progress,
                before_write=verifier.before_write,
                # The whole-plaintext digest from signed metadata covers every
                # member byte; hashing each file again would be a third pass.
                new_digest=None if expected_plaintext_sha256 is not None else new_digest,
            )
            # Closed on the way out, so a refusal stops its writeback thread now,
            # not whenever the traceback holding the generator is collected.
            with contextlib.closing(members):
                for member in members:
                    if member.path == MANIFEST_PATH and verifier.manifest is None:
                        raw_manifest = (staging / MANIFEST_PATH).read_bytes()
                        verifier.manifest = Manifest.from_json(raw_manifest)
                        continue
                    assert verifier.manifest is not None
                    pinned = verifier.manifest.files[verifier.index - 2]
                    if member.sha256 is not None and member.sha256 != pinned.sha256:
                        raise PlaintextDigestError(
                            f"{member.path} has sha256 {member.sha256}, the manifest pins "
                            f"{pinned.sha256}"
                        )
            if verifier.manifest is None:
                raise ManifestError(f"bundle holds no {MANIFEST_PATH}")
            missing = len(verifier.manifest.files) - (verifier.index - 1)
            if missing:
                raise UnsafeArchiveError(f"bundle lacks {missing} file(s) named by the manifest")
            if not opener.finished:  # pragma: no cover - draining reaches the last chunk
                raise UnsafeArchiveError("bundle stream did not reach its last chunk")
            if (
                expected_sealed_sha256 is not None
                and opener.sealed_sha256 != expected_sealed_sha256
            ):
                raise SealedDigestError(
                    f"sealed bundle has sha256 {opener.sealed_sha256}, the signed target hash "
                    f"is {expected_sealed_sha256}"
                )
            plaintext_sha256 = opener.plaintext_sha256
        if expected_plaintext_sha256 is not None and plaintext_sha256 != expected_plaintext_sha256:
            raise PlaintextDigestError(
                f"decrypted bundle has sha256 {plaintext_sha256}, signed metadata "
                f"says {expected_plaintext_sha256}"
            )
        # Each file was fsynced as it was written; their folder entries too.
        for folder in sorted({p.parent for p in staging.rglob("*")} | {staging}, reverse=True):
            fsync_dir(folder)
        os.replace(staging, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return OpenedBundle(
        manifest=verifier.manifest,
        folder=dest,
        header=opener.header,
        plaintext_size=opener.plaintext_size,
        plaintext_sha256=plaintext_sha256,
    )
