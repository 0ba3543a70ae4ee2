"""Streaming authenticated encryption of a bundle (the STREAM construction).

Why STREAM rather than one AEAD call: a model can be larger than a device's
free memory, so both sealing and opening must work chunk by chunk, and a
chunk-level AEAD alone would let an attacker drop, reorder or cut chunks.
STREAM (Hoang, Reyhanitabar, Rogaway, Vizár 2015) fixes each chunk's position
and finality into its nonce::

    nonce = prefix (7 bytes) || counter (u32, big-endian) || last-flag (1 byte)

and the header is the associated data of every chunk, so a header edit breaks
every chunk. A separate HMAC over the header (keyed from the content key)
lets a reader refuse a wrong key or an edited header before reading any body.

Sealed layout::

    header:  magic "EOTB" | version u8 | suite u8 | chunk size u32 | nonce prefix 7B
             | reserved u8 (=0) | header MAC 32B (HMAC-SHA256)
    body:    chunk 0 || chunk 1 || ... || chunk n-1, each plaintext chunk + 16-byte tag;
             every chunk but the last holds exactly ``chunk_size`` plaintext bytes,
             the last holds 0..chunk_size bytes and carries last-flag 1.

The content key never encrypts directly: HKDF-SHA256 derives one key for the
AEAD and one for the header MAC, salted with the random nonce prefix.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import io
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edgeota.protocol.digest import Digest, SyncDigest
from edgeota.protocol.errors import (
    ChunkAuthenticationError,
    ChunkOrderError,
    HeaderAuthenticationError,
    MalformedBundleError,
    TrailingDataError,
    TruncatedBundleError,
    UnsupportedSuiteError,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "HEADER_SIZE",
    "TAG_SIZE",
    "AeadSuite",
    "SealedHeader",
    "StreamOpener",
    "StreamSealer",
    "read_header",
    "sealed_size_for",
]

MAGIC = b"EOTB"
FORMAT_VERSION = 1
DEFAULT_CHUNK_SIZE = 64 * 1024
MIN_CHUNK_SIZE = 1024
MAX_CHUNK_SIZE = 4 * 1024 * 1024
TAG_SIZE = 16
NONCE_PREFIX_SIZE = 7
MAC_SIZE = 32
_FIXED = struct.Struct(">4sBBI7sB")
HEADER_SIZE = _FIXED.size + MAC_SIZE
# The counter is 32 bits: with 64 KiB chunks that is 256 TiB per bundle.
_MAX_CHUNKS = 2**32
# How far from the expected position a failing chunk is probed to tell
# "reordered or duplicated" from "modified". Bounded so a tampered file
# costs at most this many extra AEAD attempts, and only once.
_ORDER_PROBE_WINDOW = 64


class AeadSuite(enum.Enum):
    """Chunk ciphers; ChaCha20-Poly1305 is the default (fast on Pi cores lacking AES units)."""

    CHACHA20_POLY1305 = "chacha20-poly1305"
    AES_256_GCM = "aes-256-gcm"

    @property
    def wire_id(self) -> int:
        return 1 if self is AeadSuite.CHACHA20_POLY1305 else 2

    @classmethod
    def from_wire_id(cls, wire_id: int) -> AeadSuite:
        if wire_id == 1:
            return cls.CHACHA20_POLY1305
        if wire_id == 2:
            return cls.AES_256_GCM
        raise UnsupportedSuiteError(
            f"unknown bundle cipher suite id {wire_id} (known: 1 = chacha20-poly1305, "
            "2 = aes-256-gcm)"
        )

    def cipher(self, key: bytes) -> ChaCha20Poly1305 | AESGCM:
        return ChaCha20Poly1305(key) if self is AeadSuite.CHACHA20_POLY1305 else AESGCM(key)


@dataclass(frozen=True)
class SealedHeader:
    """The parsed, not yet authenticated, header of a sealed bundle."""

    version: int
    suite: AeadSuite
    chunk_size: int
    nonce_prefix: bytes
    mac: bytes
    raw: bytes

    @property
    def mac_input(self) -> bytes:
        return self.raw[: _FIXED.size]

    def plaintext_size(self, sealed_size: int) -> int:
        """The plaintext size implied by a sealed file's total size.

        Raises ``MalformedBundleError`` when no sequence of chunks has that size,
        which already betrays a truncation inside a chunk.
        """
        body = sealed_size - HEADER_SIZE
        stride = self.chunk_size + TAG_SIZE
        if body < TAG_SIZE:
            raise MalformedBundleError(f"sealed size {sealed_size} is too small for even one chunk")
        full, rest = divmod(body, stride)
        if rest == 0:
            return full * self.chunk_size
        if rest < TAG_SIZE:
            raise MalformedBundleError(
                f"sealed size {sealed_size} ends inside a chunk tag (truncated or padded)"
            )
        return full * self.chunk_size + rest - TAG_SIZE

    def chunk_count(self, sealed_size: int) -> int:
        return max(1, -(-self.plaintext_size(sealed_size) // self.chunk_size))


def sealed_size_for(plaintext_size: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    """Size of the sealed file for a plaintext of ``plaintext_size`` bytes."""
    chunks = max(1, -(-plaintext_size // chunk_size))
    return HEADER_SIZE + plaintext_size + chunks * TAG_SIZE


def _derive(content_key: bytes, nonce_prefix: bytes, purpose: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=nonce_prefix, info=b"edgeota/v1 " + purpose
    ).derive(content_key)


def _nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    return prefix + counter.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def parse_header(raw: bytes) -> SealedHeader:
    """Parse the fixed header; checks structure only, not authenticity."""
    if len(raw) < HEADER_SIZE:
        raise MalformedBundleError(
            f"file is {len(raw)} bytes, shorter than the {HEADER_SIZE}-byte bundle header"
        )
    magic, version, suite_id, chunk_size, prefix, reserved = _FIXED.unpack_from(raw)
    if magic != MAGIC:
        raise MalformedBundleError(f"not a sealed edgeota bundle (magic {magic!r}, want {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise UnsupportedSuiteError(f"unsupported bundle format version {version}")
    suite = AeadSuite.from_wire_id(suite_id)
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise MalformedBundleError(
            f"chunk size {chunk_size} outside [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]"
        )
    if reserved != 0:
        raise UnsupportedSuiteError(f"unknown header flags {reserved:#04x}")
    return SealedHeader(
        version=version,
        suite=suite,
        chunk_size=chunk_size,
        nonce_prefix=prefix,
        mac=raw[_FIXED.size : HEADER_SIZE],
        raw=raw[:HEADER_SIZE],
    )


def read_header(src: BinaryIO) -> SealedHeader:
    """Read and parse the header at the current position of ``src`` (no key needed)."""
    return parse_header(_read_exactly(src, HEADER_SIZE, allow_short=True))


def _read_exactly(src: BinaryIO, size: int, *, allow_short: bool = False) -> bytes:
    parts: list[bytes] = []
    remaining = size
    while remaining:
        part = src.read(remaining)
        if not part:
            break
        parts.append(part)
        remaining -= len(part)
    data = b"".join(parts)
    if remaining and not allow_short:
        raise TruncatedBundleError(f"stream ended {remaining} bytes early")
    return data


class StreamSealer(io.RawIOBase):
    """A writable stream that seals everything written to it into ``dst``.

    Memory is one chunk whatever the total size. ``close()`` writes the final
    chunk; a sealer dropped without ``close()`` leaves a file no reader accepts
    (it lacks the last-flag chunk), which is the safe failure.
    """

    def __init__(
        self,
        dst: BinaryIO,
        content_key: bytes,
        *,
        suite: AeadSuite = AeadSuite.CHACHA20_POLY1305,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        new_digest: Callable[[], Digest] = SyncDigest,
    ) -> None:
        super().__init__()
        if len(content_key) != 32:
            raise ValueError("content key must be 32 bytes")
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk size must be in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]")
        self._dst = dst
        self._chunk_size = chunk_size
        self._prefix = os.urandom(NONCE_PREFIX_SIZE)
        self._cipher = suite.cipher(_derive(content_key, self._prefix, b"aead"))
        fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, suite.wire_id, chunk_size, self._prefix, 0)
        mac_key = _derive(content_key, self._prefix, b"header-mac")
        self._header = fixed + hmac.new(mac_key, fixed, hashlib.sha256).digest()
        self._buffer = bytearray()
        self._counter = 0
        self.plaintext_size = 0
        self.sealed_size = 0
        self._plain_hash = new_digest()
        self._sealed_hash = new_digest()
        self._emit(self._header)

    def writable(self) -> bool:
        return True

    def _emit(self, data: bytes) -> None:
        self._dst.write(data)
        self._sealed_hash.update(data)
        self.sealed_size += len(data)

    def _seal_chunk(self, chunk: bytes, last: bool) -> None:
        if self._counter >= _MAX_CHUNKS:
            raise ValueError("bundle exceeds the 2**32-chunk limit of the nonce counter")
        nonce = _nonce(self._prefix, self._counter, last)
        self._emit(self._cipher.encrypt(nonce, chunk, self._header))
        self._counter += 1

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        if self.closed:
            raise ValueError("write to a closed sealer")
        view = memoryview(data).cast("B")
        size = len(view)
        self._plain_hash.update(bytes(view))
        self.plaintext_size += size
        self._buffer += view
        # Hold back a full chunk: it may turn out to be the last one, and the
        # last chunk's nonce differs.
        while len(self._buffer) > self._chunk_size:
            self._seal_chunk(bytes(self._buffer[: self._chunk_size]), last=False)
            del self._buffer[: self._chunk_size]
        return size

    def close(self) -> None:
        if not self.closed:
            self._seal_chunk(bytes(self._buffer), last=True)
            self._buffer.clear()
            self._dst.flush()
        super().close()

    @property
    def plaintext_sha256(self) -> str:
        return self._plain_hash.hexdigest()

    @property
    def sealed_sha256(self) -> str:
        return self._sealed_hash.hexdigest()


class _BufferPool:
    """Plaintext buffers handed out again once nothing views them any more.

    Zeroing a fresh 1 MiB ``bytearray`` for every block cost ~10 ms of a
    128 MiB open. A buffer is reused only when no ``memoryview`` of it is
    alive anywhere (a digest thread's queue, a write batch): CPython refuses
    to resize a ``bytearray`` that is still exported (``BufferError``), and
    that refusal is the test. So whoever holds a view of a block sees it
    unchanged for as long as it holds it.
    """

    def __init__(self, size: int, keep: int = 8) -> None:
        self._size = size
        self._keep = keep
        self._buffers: list[bytearray] = []

    def get(self) -> bytearray:
        for buffer in self._buffers:
            try:
                buffer.append(0)  # raises while any view of the buffer is alive
            except BufferError:
                continue
            del buffer[-1]
            return buffer
        buffer = bytearray(self._size + 1)
        del buffer[-1]  # room for the probe's byte: it never reallocates
        if len(self._buffers) < self._keep:
            self._buffers.append(buffer)
        return buffer



class StreamOpener(io.RawIOBase):
    """A readable stream of authenticated plaintext from a sealed source.

    Every byte returned by ``read`` (or yielded by ``chunks``) has passed its
    chunk's AEAD check; the end of the stream is reported only after the
    chunk sealed as last has been verified, so a truncated file raises instead
    of looking complete.

    The source is read ``read_chunks`` sealed chunks at a time (about 1 MiB by
    default): one read call and one sealed-digest update per block instead of
    per 64 KiB chunk. Only ciphertext is read ahead; each chunk is still
    authenticated, and its plaintext handed out, one at a time.
    """

    def __init__(
        self,
        src: BinaryIO,
        content_key: bytes,
        *,
        new_digest: Callable[[], Digest] = SyncDigest,
        hash_sealed: bool = True,
        read_chunks: int = 16,
    ) -> None:
        super().__init__()
        if len(content_key) != 32:
            raise ValueError("content key must be 32 bytes")
        if read_chunks < 1:
            raise ValueError("read_chunks must be at least 1")
        self._src = src
        self.header = read_header(src)
        # The sealed bytes are hashed as they are read, so a caller holding the
        # TUF target hash needs no second pass over the file; a caller that has
        # just checked that hash itself (the agent's download) skips the pass.
        self._sealed_hash: Digest | None = new_digest() if hash_sealed else None
        if self._sealed_hash is not None:
            self._sealed_hash.update(self.header.raw)
        mac_key = _derive(content_key, self.header.nonce_prefix, b"header-mac")
        expected = hmac.new(mac_key, self.header.mac_input, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, self.header.mac):
            raise HeaderAuthenticationError(
                "bundle header does not authenticate: the header was modified or the "
                "content key is not this bundle's"
            )
        self._cipher = self.header.suite.cipher(
            _derive(content_key, self.header.nonce_prefix, b"aead")
        )
        self._stride = self.header.chunk_size + TAG_SIZE
        self._block_size = read_chunks * self._stride
        self._buffers = _BufferPool(read_chunks * self.header.chunk_size)
        self._counter = 0
        self._done = False
        self._chunks: Iterator[memoryview] | None = None
        self._pending = memoryview(b"")
        self._plain_hash = new_digest()
        self.plaintext_size = 0

    def readable(self) -> bool:
        return True

    @property
    def plaintext_sha256(self) -> str:
        """Digest of the plaintext returned so far (complete once EOF was reached)."""
        return self._plain_hash.hexdigest()

    @property
    def sealed_sha256(self) -> str:
        """Digest of the sealed bytes consumed so far (the whole file once EOF was reached).

        Raises:
            RuntimeError: the opener was made with ``hash_sealed=False``.
        """
        if self._sealed_hash is None:
            raise RuntimeError("this opener does not hash the sealed bytes (hash_sealed=False)")
        return self._sealed_hash.hexdigest()

    @property
    def finished(self) -> bool:
        """True once the last chunk authenticated and was fully read."""
        return self._done and not self._pending

    def _read_block(self) -> bytes:
        block = _read_exactly(self._src, self._block_size, allow_short=True)
        if block and self._sealed_hash is not None:
            self._sealed_hash.update(block)
        return block

    def chunks(self) -> Iterator[memoryview]:
        """Yield the plaintext chunk by chunk, each one authenticated before it is yielded.

        Each chunk is a read-only view of a buffer that is not written again
        while any view of it lives, so a consumer may keep it (or hand it to
        another thread) without a copy. Exhausting the iterator means the last
        chunk authenticated; any defect raises instead. Use one of ``chunks``,
        ``blocks`` and ``read``.
        """
        return self._start(per_chunk=True)

    def blocks(self) -> Iterator[memoryview]:
        """Like ``chunks``, but one view per read block (``read_chunks`` chunks, ~1 MiB).

        A block is yielded once every chunk in it authenticated, so a defect
        anywhere in a block withholds all of it; in exchange the consumer
        handles 16 times fewer pieces (``open_bundle`` uses this).
        """
        return self._start(per_chunk=False)

    def _start(self, *, per_chunk: bool) -> Iterator[memoryview]:
        if self._chunks is not None:
            raise RuntimeError("the plaintext of this opener is already being read")
        self._chunks = self._iter_plaintext(per_chunk)
        return self._chunks

    def _iter_plaintext(self, per_chunk: bool) -> Iterator[memoryview]:
        stride, chunk_size = self._stride, self.header.chunk_size
        block = self._read_block()
        while True:
            # Lookahead of one block: a chunk is the last one exactly when
            # nothing follows it, and that decides its nonce.
            following = self._read_block() if len(block) == self._block_size else b""
            sealed_view = memoryview(block)
            count = max(1, -(-len(block) // stride))
            # The block's chunks are decrypted side by side into one buffer, so
            # the plaintext digest takes the block in one update (one hand-over
            # to its thread instead of one per chunk).
            plain = memoryview(self._buffers.get())
            used = 0
            for index in range(count):
                sealed = sealed_view[index * stride : (index + 1) * stride]
                last = not following and index == count - 1
                size = self._open_chunk(sealed, last, plain[used : used + chunk_size])
                chunk = plain[used : used + size].toreadonly()
                used += size
                if index == count - 1:  # the whole block authenticated: hash it
                    self._plain_hash.update(plain[:used].toreadonly())
                if per_chunk:
                    yield chunk
            if not per_chunk:
                yield plain[:used].toreadonly()
            if not following:
                return
            block = following

    def _open_chunk(self, sealed: memoryview, last: bool, into: memoryview) -> int:
        """Authenticate and decrypt one chunk into ``into``; return its plaintext size."""
        if len(sealed) < TAG_SIZE:
            raise TruncatedBundleError(
                f"bundle ends inside chunk {self._counter} ({len(sealed)} bytes where a "
                f"chunk needs at least {TAG_SIZE})"
            )
        size = len(sealed) - TAG_SIZE
        if not last and size != self.header.chunk_size:  # pragma: no cover - read in strides
            raise ChunkAuthenticationError(f"chunk {self._counter} has a wrong length")
        nonce = _nonce(self.header.nonce_prefix, self._counter, last)
        try:
            # On a bad tag nothing is written: ``into`` stays zero.
            self._cipher.decrypt_into(nonce, sealed, self.header.raw, into[:size])
        except InvalidTag:
            self._diagnose_failure(sealed, last)
        self._counter += 1
        self._done = last
        self.plaintext_size += size
        return size

    def _try_open(self, counter: int, last: bool, sealed: memoryview) -> bytes | None:
        try:
            return self._cipher.decrypt(
                _nonce(self.header.nonce_prefix, counter, last), sealed, self.header.raw
            )
        except InvalidTag:
            return None

    def _diagnose_failure(self, sealed: memoryview, last: bool) -> NoReturn:
        """Name what is wrong with a chunk that failed, then raise.

        Only runs on failure, so the extra AEAD attempts cost nothing on the
        good path; the probe window bounds them on a hostile file.
        """
        counter = self._counter
        if self._try_open(counter, not last, sealed) is not None:
            if last:
                raise TruncatedBundleError(
                    f"bundle ends after chunk {counter}, but that chunk was not sealed "
                    "as the last one (truncated at a chunk boundary)"
                )
            raise TrailingDataError(
                f"chunk {counter} was sealed as the last one, but more data follows it"
            )
        low = max(0, counter - _ORDER_PROBE_WINDOW)
        for other in range(low, counter + _ORDER_PROBE_WINDOW + 1):
            if other == counter:
                continue
            for flag in (False, True):
                if self._try_open(other, flag, sealed) is not None:
                    what = "duplicated" if other < counter else "reordered"
                    raise ChunkOrderError(
                        f"chunk at position {counter} is chunk {other} of this bundle: "
                        f"chunks were {what}"
                    )
        raise ChunkAuthenticationError(
            f"chunk {counter} (sealed bytes {HEADER_SIZE + counter * self._stride}.."
            f"{HEADER_SIZE + counter * self._stride + len(sealed)}) fails authentication: "
            "its bytes were modified"
        )

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        target = memoryview(buffer).cast("B")
        if self._chunks is None:
            self._chunks = self._iter_plaintext(per_chunk=True)
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = chunk
        count = min(len(target), len(self._pending))
        target[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count

    def read_all_remaining(self, block: int = DEFAULT_CHUNK_SIZE) -> int:
        """Drain the rest of the stream (authenticating it); return the bytes skipped."""
        skipped = 0
        while True:
            data = self.read(block)
            if not data:
                return skipped
            skipped += len(data)
