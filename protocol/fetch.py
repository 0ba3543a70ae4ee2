"""Wire format of the MQTT fetch protocol: requests, chunk frames and error frames.

A device asks for a repository file (the same paths as HTTP ``/repo/``) on
``devices/{id}/fetch`` with a small JSON request; the server answers on
``devices/{id}/rx`` with binary frames carrying raw bytes (no base64: a
64 KiB chunk costs 64 KiB plus a fixed header). Only MQTT 3.1.1 features are
used, so the protocol runs on any broker.

Request (device -> server, QoS 1), compact JSON with exactly these keys::

    {"v":1,"rid":"<request id>","path":"<repo path>","offset":N,"window":W,"max":M}

* ``rid``: 1..64 characters ``[A-Za-z0-9_-]``, chosen by the device; every
  frame of the answer repeats it so one device can run several fetches.
* ``offset``: first byte wanted; any offset up to the file size (resume).
* ``window``: how many chunks the server sends for this request (1..64).
  ``0`` cancels: the server stops sending frames for ``rid``, and drops the
  windows of ``rid`` it has queued.
* ``max``: the largest file the device accepts; a bigger file is refused
  with 413 before any byte is sent (ngclient's ``max_length``).

Flow control is one request per window, the simplest scheme that stays
robust over an at-least-once transport: the server sends at most ``window``
chunks per request and then nothing more until the device asks again, from
the next offset it needs, with the same ``rid``. A duplicate request (QoS 1
may deliver twice) is recognised by ``(rid, offset)``, and cancelling is
simply not asking again (``window`` 0 stops every window of ``rid`` being
sent or queued).

Pipelining: every chunk of one request id except the file's last has the same
length (the server's chunk size), so once the first chunk has arrived the
device knows that the request at offset ``o`` covers ``[o, o + window *
chunk)`` and may ask for the next one before the current one has arrived. A
device has a fetch window of chunks in flight (asked for and not yet
received) and asks for it as :data:`PIPELINE_DEPTH` requests of a share
each, the next one as soon as it fits in the window, so the pipe stays full
across request boundaries; it asks ahead only once the first chunk has told
it the file's size, so a small file costs one request. The server serves the
requests of one ``rid`` one after another, in the order asked, so frames
normally arrive in offset order; replicas behind a shared subscription may
still interleave two requests, and the device puts them back in order
(bounded by what it asked for). Replicas sharing a group must therefore use
the same chunk size. A lost request or a disconnect wastes at most the
device's window.

Frames (server -> device), all integers big-endian. The server publishes
them at QoS 1 (paho sends again what was queued when its link to the broker
comes back, and the PUBACKs pace it); devices subscribe at QoS 0, so the
broker delivers them without a PUBACK per chunk: the next request is the
device's acknowledgement, and a clean session loses undelivered frames at a
disconnect whatever their QoS::

    magic      4  b"EOTF"
    version    1  1
    kind       1  1 = data, 2 = error
    flags      1  bit 0: last frame of the file; bit 1: file_id is the content sha256
    rid_len    1  1..64
    rid        rid_len ASCII bytes
    -- data (kind 1)
    file_id   32  which file (see below)
    offset     8  u64, position of the first payload byte in the file
    total      8  u64, size of the whole file
    length     4  u32, payload length, at most 64 KiB
    crc32      4  u32, zlib CRC-32 of the payload (catches damage, not attacks:
                  TUF's signed hashes do that)
    payload   length bytes
    -- error (kind 2; flags 0; ends the request)
    code       2  u16 (400, 403, 404, 413, 416, 429, 503, ...)
    msg_len    2  u16, at most 512
    message   msg_len UTF-8 bytes

``file_id`` names the file independently of the request, so a future
shared-topic carousel can publish a popular bundle once and every device can
pick the chunks it misses by (file, offset): for a target file it is the
content sha256 (flag bit 1 set; the store keeps targets under that hash); for
metadata it is an opaque version tag, sha256 over the path, size, mtime and
inode, which changes whenever the file is replaced (the timestamp pointer), so
a reader resuming across windows notices a file that changed under it.

Decoding is strict: a frame whose size, magic, version, kind, flags, lengths,
offsets or checksum do not add up raises a :class:`FrameError` subclass, and
nothing partially decoded is returned. A decoded chunk's payload is a
read-only ``memoryview`` into the received message (no copy of 64 KiB per
frame); :func:`pack_chunk` builds a data frame in a buffer the payload was
read into, so the server does not copy it either.
"""

from __future__ import annotations

import enum
import json
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from edgeota.protocol.errors import ProtocolError

__all__ = [
    "CHUNK_HEADER",
    "FILE_ID_SIZE",
    "FLAG_CONTENT_ID",
    "FLAG_LAST",
    "FRAME_VERSION",
    "MAGIC",
    "MAX_ERROR_MESSAGE",
    "MAX_FRAME_SIZE",
    "MAX_OFFSET",
    "MAX_PATH_LENGTH",
    "MAX_PAYLOAD",
    "MAX_REQUEST_ID",
    "MAX_REQUEST_SIZE",
    "MAX_WINDOW",
    "PIPELINE_DEPTH",
    "REQUEST_VERSION",
    "ChunkFrame",
    "ErrorCode",
    "ErrorFrame",
    "FetchRequest",
    "Frame",
    "FrameChecksumError",
    "FrameError",
    "FrameFormatError",
    "FrameTooLargeError",
    "FrameVersionError",
    "MalformedRequestError",
    "MqttTls",
    "chunk_header_size",
    "decode_frame",
    "decode_request",
    "encode_frame",
    "encode_request",
    "pack_chunk",
    "peek_request_id",
]

MAGIC = b"EOTF"
FRAME_VERSION = 1
REQUEST_VERSION = 1
KIND_DATA = 1
KIND_ERROR = 2
FLAG_LAST = 0x01
FLAG_CONTENT_ID = 0x02
_DATA_FLAGS = FLAG_LAST | FLAG_CONTENT_ID

FILE_ID_SIZE = 32  # bytes
MAX_PAYLOAD = 64 * 1024  # bytes per chunk
MAX_REQUEST_ID = 64  # characters
MAX_ERROR_MESSAGE = 512  # bytes of UTF-8
MAX_WINDOW = 64  # chunks per request
PIPELINE_DEPTH = 4  # requests a device splits its window of chunks in flight into
# Target paths are at most 1024 characters; add "image/targets/" and a sha256 prefix.
MAX_PATH_LENGTH = 1280  # characters
MAX_REQUEST_SIZE = 2048  # bytes of JSON
MAX_OFFSET = 2**63 - 1  # offsets, sizes and "max" stay within a signed 64-bit integer

_PREFIX = struct.Struct(">4sBBBB")  # magic, version, kind, flags, rid_len
_DATA = struct.Struct(">32sQQII")  # file_id, offset, total, length, crc32
_ERROR = struct.Struct(">HH")  # code, msg_len
CHUNK_HEADER = _PREFIX.size + MAX_REQUEST_ID + _DATA.size  # the largest data-frame header
MAX_FRAME_SIZE = CHUNK_HEADER + MAX_PAYLOAD

_RID_RE = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_REQUEST_ID}}}")
_REQUEST_KEYS = frozenset({"v", "rid", "path", "offset", "window", "max"})


@dataclass(frozen=True)
class MqttTls:
    """TLS for an MQTT connection (server or device); plain data, so the base install needs no paho.

    Devices present the client certificate the fleet CA issued (CN = device id),
    which is what the broker's ACL ties to ``devices/{id}/...``.
    """

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None


class FrameError(ProtocolError):
    """Bytes on the fetch topics that are not a valid request or frame.

    ``request_id`` is set when the frame's header was intact enough to tell
    which request it belongs to, so a receiver can fail that one fetch.
    """

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class FrameFormatError(FrameError):
    """Bad magic, unknown kind or flags, or lengths that do not add up."""


class FrameVersionError(FrameFormatError):
    """A frame or request version this build does not speak."""


class FrameTooLargeError(FrameError):
    """A frame, payload, request or field beyond the protocol's bounds."""


class FrameChecksumError(FrameError):
    """A chunk whose payload does not match its CRC-32: damaged in transit."""


class MalformedRequestError(FrameError):
    """A fetch request that is not the JSON object the protocol defines."""


class ErrorCode(enum.IntEnum):
    """Error frame codes, borrowed from HTTP so ngclient's 403/404 logic applies unchanged."""

    BAD_REQUEST = 400
    FORBIDDEN = 403  # another device's director files
    NOT_FOUND = 404  # no such repository file
    TOO_LARGE = 413  # the file is larger than the request's "max"
    BAD_RANGE = 416  # offset beyond the end of the file
    BUSY = 429  # too many concurrent requests from this device
    UNAVAILABLE = 503  # the server cannot serve now (queue full, read error)


def _check_request_id(rid: object) -> str:
    if not isinstance(rid, str) or _RID_RE.fullmatch(rid) is None:
        raise MalformedRequestError(
            f"request id must be 1..{MAX_REQUEST_ID} characters of [A-Za-z0-9_-]"
        )
    return rid


def _check_int(name: str, value: object, low: int, high: int, rid: str | None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise MalformedRequestError(f"{name} must be an integer", request_id=rid)
    if not low <= value <= high:
        raise FrameTooLargeError(f"{name} {value} outside {low}..{high}", request_id=rid)
    return value


def _check_path(path: object, rid: str | None) -> str:
    if not isinstance(path, str) or not path:
        raise MalformedRequestError("path must be a non-empty string", request_id=rid)
    if len(path) > MAX_PATH_LENGTH:
        raise FrameTooLargeError(f"path longer than {MAX_PATH_LENGTH} characters",
                                 request_id=rid)
    if not path.isascii() or not path.isprintable() or path.startswith("/"):
        raise MalformedRequestError("path must be printable ASCII and relative", request_id=rid)
    return path


@dataclass(frozen=True)
class FetchRequest:
    """One window of a repository file, asked for by a device (validated on construction)."""

    request_id: str
    path: str
    offset: int = 0
    window: int = 8
    max_length: int = MAX_OFFSET

    def __post_init__(self) -> None:
        rid = _check_request_id(self.request_id)
        _check_path(self.path, rid)
        _check_int("offset", self.offset, 0, MAX_OFFSET, rid)
        _check_int("window", self.window, 0, MAX_WINDOW, rid)
        _check_int("max", self.max_length, 0, MAX_OFFSET, rid)

    @property
    def cancel(self) -> bool:
        """A request with window 0 asks the server to stop sending frames for this id."""
        return self.window == 0


@dataclass(frozen=True)
class ChunkFrame:
    """Bytes ``[offset, offset + len(payload))`` of a file of ``total`` bytes.

    ``payload`` is ``bytes`` or, for decoded frames, a read-only ``memoryview``
    of the received message (it stays valid: the message is immutable).
    """

    request_id: str
    file_id: bytes
    offset: int
    total: int
    payload: bytes | memoryview
    last: bool = False
    content_id: bool = False  # file_id is the sha256 of the file's content

    def __post_init__(self) -> None:
        rid = _check_request_id(self.request_id)
        if not isinstance(self.file_id, bytes) or len(self.file_id) != FILE_ID_SIZE:
            raise FrameFormatError(f"file id must be {FILE_ID_SIZE} bytes", request_id=rid)
        if len(self.payload) > MAX_PAYLOAD:
            raise FrameTooLargeError(
                f"payload of {len(self.payload)} bytes exceeds {MAX_PAYLOAD}", request_id=rid)
        if not 0 <= self.offset <= self.total <= MAX_OFFSET:
            raise FrameFormatError(
                f"offset {self.offset} / total {self.total} out of range", request_id=rid)
        end = self.offset + len(self.payload)
        if end > self.total:
            raise FrameFormatError(
                f"chunk ends at {end}, beyond the file's {self.total} bytes", request_id=rid)
        # "last" must agree with the sizes, and only the last chunk may be empty,
        # so a frame can never claim progress it does not make.
        if self.last != (end == self.total):
            raise FrameFormatError("last flag contradicts offset and total", request_id=rid)
        if not self.payload and not self.last:
            raise FrameFormatError("empty chunk before the end of the file", request_id=rid)


@dataclass(frozen=True)
class ErrorFrame:
    """The request failed; ``code`` follows HTTP so 403/404 mean "no such file" to ngclient."""

    request_id: str
    code: int
    message: str = ""

    def __post_init__(self) -> None:
        rid = _check_request_id(self.request_id)
        if not isinstance(self.code, int) or not 400 <= self.code <= 599:
            raise FrameFormatError(f"error code {self.code!r} is not 400..599", request_id=rid)
        if len(self.message.encode()) > MAX_ERROR_MESSAGE:
            raise FrameTooLargeError(f"error message longer than {MAX_ERROR_MESSAGE} bytes",
                                     request_id=rid)


Frame = ChunkFrame | ErrorFrame


def encode_request(request: FetchRequest) -> bytes:
    """The compact JSON of ``request`` (fields already validated by the dataclass)."""
    return json.dumps(
        {"v": REQUEST_VERSION, "rid": request.request_id, "path": request.path,
         "offset": request.offset, "window": request.window, "max": request.max_length},
        separators=(",", ":"),
    ).encode()


def decode_request(data: bytes | bytearray) -> FetchRequest:
    """Parse and validate a request; ``FrameError.request_id`` is set once the id is known.

    Raises:
        FrameTooLargeError: the message or a field is beyond the protocol's bounds.
        FrameVersionError: a request version other than 1.
        MalformedRequestError: anything else that is not exactly a request.
    """
    if len(data) > MAX_REQUEST_SIZE:
        raise FrameTooLargeError(f"request larger than {MAX_REQUEST_SIZE} bytes")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise MalformedRequestError("request is not JSON") from e
    if not isinstance(obj, dict):
        raise MalformedRequestError("request is not a JSON object")
    rid = obj.get("rid")
    known = rid if isinstance(rid, str) and _RID_RE.fullmatch(rid) else None
    if set(obj) != _REQUEST_KEYS:
        raise MalformedRequestError(
            f"request keys must be exactly {sorted(_REQUEST_KEYS)}", request_id=known)
    if obj["v"] != REQUEST_VERSION or isinstance(obj["v"], bool):
        raise FrameVersionError(f"request version {obj['v']!r} is not {REQUEST_VERSION}",
                                request_id=known)
    return FetchRequest(
        request_id=_check_request_id(rid),
        path=obj["path"],
        offset=obj["offset"],
        window=obj["window"],
        max_length=obj["max"],
    )


def encode_frame(frame: Frame) -> bytes:
    """The binary form of a chunk or error frame."""
    rid = frame.request_id.encode("ascii")
    if isinstance(frame, ChunkFrame):
        flags = (FLAG_LAST if frame.last else 0) | (FLAG_CONTENT_ID if frame.content_id else 0)
        return b"".join((
            _PREFIX.pack(MAGIC, FRAME_VERSION, KIND_DATA, flags, len(rid)),
            rid,
            _DATA.pack(frame.file_id, frame.offset, frame.total, len(frame.payload),
                       zlib.crc32(frame.payload)),
            frame.payload,
        ))
    message = frame.message.encode()
    return b"".join((
        _PREFIX.pack(MAGIC, FRAME_VERSION, KIND_ERROR, 0, len(rid)),
        rid,
        _ERROR.pack(frame.code, len(message)),
        message,
    ))


def chunk_header_size(request_id: str) -> int:
    """Bytes before the payload in a data frame for ``request_id`` (see :func:`pack_chunk`)."""
    return _PREFIX.size + len(request_id) + _DATA.size


def pack_chunk(buffer: bytearray, *, request_id: str, file_id: bytes, offset: int, total: int,
               content_id: bool, crc: int | None = None) -> int:
    """Write the header of a data frame whose payload already fills the end of ``buffer``.

    The server reads each chunk straight into ``buffer`` after
    :func:`chunk_header_size` bytes and then calls this, so the payload is
    never copied to build the frame. The result is the same bytes as
    :func:`encode_frame` of the equivalent :class:`ChunkFrame`, and the same
    rules hold (checked here, cheaply, instead of by the dataclass). ``crc``
    is the payload's CRC-32 when the caller already knows it (a server may
    remember those of content-addressed files); the CRC written is returned.

    Raises:
        FrameFormatError, FrameTooLargeError: the frame would break the protocol's rules.
    """
    rid = _check_request_id(request_id).encode("ascii")
    if len(file_id) != FILE_ID_SIZE:
        raise FrameFormatError(f"file id must be {FILE_ID_SIZE} bytes", request_id=request_id)
    start = _PREFIX.size + len(rid) + _DATA.size
    length = len(buffer) - start
    end = offset + length
    if not 0 <= length <= MAX_PAYLOAD:
        raise FrameTooLargeError(f"payload of {length} bytes exceeds {MAX_PAYLOAD}",
                                 request_id=request_id)
    if not 0 <= offset <= end <= total <= MAX_OFFSET or (length == 0 and end != total):
        raise FrameFormatError(f"chunk [{offset}, {end}) of {total} bytes", request_id=request_id)
    last = end == total
    flags = (FLAG_LAST if last else 0) | (FLAG_CONTENT_ID if content_id else 0)
    _PREFIX.pack_into(buffer, 0, MAGIC, FRAME_VERSION, KIND_DATA, flags, len(rid))
    buffer[_PREFIX.size:_PREFIX.size + len(rid)] = rid
    if crc is None:
        with memoryview(buffer) as view:
            crc = zlib.crc32(view[start:])
    _DATA.pack_into(buffer, _PREFIX.size + len(rid), file_id, offset, total, length, crc)
    return crc


def _read_prefix(data: bytes | bytearray) -> tuple[int, int, str, int]:
    """Check magic and version; return (kind, flags, request id, header end)."""
    if len(data) > MAX_FRAME_SIZE:
        raise FrameTooLargeError(f"frame of {len(data)} bytes exceeds {MAX_FRAME_SIZE}")
    if len(data) < _PREFIX.size:
        raise FrameFormatError(f"frame of {len(data)} bytes is shorter than its header")
    magic, version, kind, flags, rid_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise FrameFormatError("bad frame magic")
    if version != FRAME_VERSION:
        raise FrameVersionError(f"frame version {version} is not {FRAME_VERSION}")
    end = _PREFIX.size + rid_len
    if not 1 <= rid_len <= MAX_REQUEST_ID or len(data) < end:
        raise FrameFormatError("bad request id length")
    try:
        rid = _check_request_id(data[_PREFIX.size:end].decode("ascii"))
    except (UnicodeDecodeError, MalformedRequestError) as e:
        raise FrameFormatError("bad request id") from e
    return kind, flags, rid, end


def peek_request_id(data: bytes | bytearray) -> str | None:
    """The request id of a frame whose prefix is intact, else ``None`` (for error routing)."""
    try:
        return _read_prefix(data)[2]
    except FrameError:
        return None


def decode_frame(data: bytes | bytearray) -> Frame:
    """Parse and check one frame.

    Raises:
        FrameTooLargeError: frame or payload beyond the bounds.
        FrameVersionError: a frame version this build does not know.
        FrameChecksumError: the payload does not match its CRC-32.
        FrameFormatError: anything else (magic, kind, flags, lengths, offsets).
    """
    kind, flags, rid, pos = _read_prefix(data)
    if kind == KIND_DATA:
        if flags & ~_DATA_FLAGS:
            raise FrameFormatError(f"unknown data flags {flags:#x}", request_id=rid)
        if len(data) < pos + _DATA.size:
            raise FrameFormatError("data frame shorter than its header", request_id=rid)
        file_id, offset, total, length, crc = _DATA.unpack_from(data, pos)
        pos += _DATA.size
        if length > MAX_PAYLOAD:
            raise FrameTooLargeError(f"payload length {length} exceeds {MAX_PAYLOAD}",
                                     request_id=rid)
        if len(data) != pos + length:
            raise FrameFormatError(
                f"payload length {length} but {len(data) - pos} bytes follow", request_id=rid)
        payload = memoryview(data)[pos:].toreadonly()  # no copy of the payload
        if zlib.crc32(payload) != crc:
            raise FrameChecksumError("chunk payload does not match its CRC-32", request_id=rid)
        return ChunkFrame(rid, file_id, offset, total, payload, last=bool(flags & FLAG_LAST),
                          content_id=bool(flags & FLAG_CONTENT_ID))
    if kind == KIND_ERROR:
        if flags:
            raise FrameFormatError(f"error frames carry no flags, got {flags:#x}",
                                   request_id=rid)
        if len(data) < pos + _ERROR.size:
            raise FrameFormatError("error frame shorter than its header", request_id=rid)
        code, msg_len = _ERROR.unpack_from(data, pos)
        pos += _ERROR.size
        if msg_len > MAX_ERROR_MESSAGE:
            raise FrameTooLargeError(f"error message of {msg_len} bytes", request_id=rid)
        if len(data) != pos + msg_len:
            raise FrameFormatError("error message length does not match the frame",
                                   request_id=rid)
        try:
            message = data[pos:].decode()
        except UnicodeDecodeError as e:
            raise FrameFormatError("error message is not UTF-8", request_id=rid) from e
        return ErrorFrame(rid, code, message)
    raise FrameFormatError(f"unknown frame kind {kind}", request_id=rid)
