"""The MQTT fetch wire format: round trips, bounds, and every malformed input refused."""

from __future__ import annotations

import json
import struct
import zlib

import pytest

from edgeota.protocol.fetch import (
    CHUNK_HEADER,
    FILE_ID_SIZE,
    MAX_ERROR_MESSAGE,
    MAX_FRAME_SIZE,
    MAX_OFFSET,
    MAX_PATH_LENGTH,
    MAX_PAYLOAD,
    MAX_REQUEST_ID,
    MAX_REQUEST_SIZE,
    MAX_WINDOW,
    ChunkFrame,
    ErrorCode,
    ErrorFrame,
    FetchRequest,
    FrameChecksumError,
    FrameError,
    FrameFormatError,
    FrameTooLargeError,
    FrameVersionError,
    MalformedRequestError,
    decode_frame,
    decode_request,
    encode_frame,
    encode_request,
    peek_request_id,
)

FILE_ID = bytes(range(FILE_ID_SIZE))
RID = "r-1_A"


def chunk(**overrides: object) -> ChunkFrame:
    fields: dict[str, object] = {
        "request_id": RID, "file_id": FILE_ID, "offset": 10, "total": 100,
        "payload": b"abc", "last": False, "content_id": True,
    }
    fields.update(overrides)
    return ChunkFrame(**fields)  # type: ignore[arg-type]


def request_json(**overrides: object) -> bytes:
    obj: dict[str, object] = {"v": 1, "rid": RID, "path": "image/metadata/1.root.json",
                              "offset": 0, "window": 4, "max": 1000}
    obj.update(overrides)
    return json.dumps({k: v for k, v in obj.items() if v is not ...}).encode()


# -- requests -------------------------------------------------------------------


def test_request_round_trip_is_compact_json() -> None:
    request = FetchRequest(RID, "director/pi-1/metadata/timestamp.json", 65536, 8, 16384)
    data = encode_request(request)
    assert b" " not in data
    assert json.loads(data) == {"v": 1, "rid": RID, "path": request.path, "offset": 65536,
                                "window": 8, "max": 16384}
    assert decode_request(data) == request
    assert not request.cancel
    assert FetchRequest(RID, "image/x", 0, 0, 0).cancel


@pytest.mark.parametrize(("data", "error", "rid_known"), [
    (b"not json", MalformedRequestError, False),
    (b"\xff\xfe", MalformedRequestError, False),
    (b"[1, 2]", MalformedRequestError, False),
    (b"[" * 1500, MalformedRequestError, False),
    (request_json(extra=1), MalformedRequestError, True),
    (request_json(max=...), MalformedRequestError, True),
    (request_json(v=2), FrameVersionError, True),
    (request_json(v=True), FrameVersionError, True),
    (request_json(rid=""), MalformedRequestError, False),
    (request_json(rid="a/b"), MalformedRequestError, False),
    (request_json(rid="x" * (MAX_REQUEST_ID + 1)), MalformedRequestError, False),
    (request_json(path=""), MalformedRequestError, True),
    (request_json(path=7), MalformedRequestError, True),
    (request_json(path="/etc/passwd"), MalformedRequestError, True),
    (request_json(path="image/\x00"), MalformedRequestError, True),
    (request_json(path="image/\u00e9"), MalformedRequestError, True),
    (request_json(path="i" * (MAX_PATH_LENGTH + 1)), FrameTooLargeError, True),
    (request_json(offset=-1), FrameTooLargeError, True),
    (request_json(offset=MAX_OFFSET + 1), FrameTooLargeError, True),
    (request_json(offset=1.5), MalformedRequestError, True),
    (request_json(offset="0"), MalformedRequestError, True),
    (request_json(window=MAX_WINDOW + 1), FrameTooLargeError, True),
    (request_json(window=True), MalformedRequestError, True),
    (request_json(max=-5), FrameTooLargeError, True),
    (b" " * (MAX_REQUEST_SIZE + 1), FrameTooLargeError, False),
])
def test_malformed_requests_are_refused(data: bytes, error: type[FrameError],
                                        rid_known: bool) -> None:
    with pytest.raises(error) as caught:
        decode_request(data)
    # The server can answer with an error frame only when it knows the request id.
    assert caught.value.request_id == (RID if rid_known else None)


def test_request_bounds_are_inclusive() -> None:
    longest = "i" * MAX_PATH_LENGTH
    request = FetchRequest("x" * MAX_REQUEST_ID, longest, MAX_OFFSET, MAX_WINDOW, MAX_OFFSET)
    assert len(encode_request(request)) <= MAX_REQUEST_SIZE
    assert decode_request(encode_request(request)) == request


# -- frames ---------------------------------------------------------------------


@pytest.mark.parametrize("frame", [
    chunk(),
    chunk(offset=97, last=True, content_id=False),
    chunk(offset=0, total=0, payload=b"", last=True),
    chunk(offset=0, total=MAX_PAYLOAD, payload=b"\x00" * MAX_PAYLOAD, last=True),
    chunk(offset=MAX_OFFSET - 3, total=MAX_OFFSET, last=True),
    ErrorFrame(RID, ErrorCode.NOT_FOUND, "no such file"),
    ErrorFrame(RID, 403),
    ErrorFrame(RID, 599, "\u00e9" * (MAX_ERROR_MESSAGE // 2)),
], ids=lambda f: type(f).__name__)
def test_frame_round_trip(frame: ChunkFrame | ErrorFrame) -> None:
    data = encode_frame(frame)
    assert decode_frame(data) == frame
    assert peek_request_id(data) == RID
    assert len(data) <= MAX_FRAME_SIZE


def test_chunk_layout_is_the_documented_one() -> None:
    data = encode_frame(chunk(last=True, offset=97))
    assert data[:4] == b"EOTF"
    assert data[4:8] == bytes([1, 1, 0x03, len(RID)])
    pos = 8 + len(RID)
    assert data[8:pos] == RID.encode()
    assert data[pos:pos + 32] == FILE_ID
    offset, total, length, crc = struct.unpack_from(">QQII", data, pos + 32)
    assert (offset, total, length, crc) == (97, 100, 3, zlib.crc32(b"abc"))
    assert data[pos + 56:] == b"abc"
    assert CHUNK_HEADER == 8 + MAX_REQUEST_ID + 56


def _valid() -> bytes:
    return encode_frame(chunk())


def _patched(pos: int, value: bytes) -> bytes:
    data = bytearray(_valid())
    data[pos:pos + len(value)] = value
    return bytes(data)


_DATA_AT = 8 + len(RID)  # first byte after the request id


@pytest.mark.parametrize(("data", "error", "rid_known"), [
    (b"", FrameFormatError, False),
    (b"EOTF\x01", FrameFormatError, False),
    (_patched(0, b"XOTF"), FrameFormatError, False),
    (_patched(4, b"\x02"), FrameVersionError, False),
    (_patched(5, b"\x03"), FrameFormatError, True),  # unknown kind
    (_patched(6, b"\x04"), FrameFormatError, True),  # unknown flag
    (_patched(7, b"\x00"), FrameFormatError, False),  # rid length 0
    (_patched(7, b"\x41"), FrameFormatError, False),  # rid length 65
    (_patched(7, b"\x30"), FrameFormatError, False),  # rid longer than the frame
    (_patched(8, b"/"), FrameFormatError, False),  # rid character outside the alphabet
    (_valid()[:_DATA_AT + 20], FrameFormatError, True),  # header cut short
    (_valid()[:-1], FrameFormatError, True),  # payload shorter than its length
    (_valid() + b"x", FrameFormatError, True),  # bytes after the payload
    (_patched(len(_valid()) - 1, b"X"), FrameChecksumError, True),  # damaged payload
    (_patched(_DATA_AT + 48, struct.pack(">I", MAX_PAYLOAD + 1)), FrameTooLargeError, True),
    (_patched(_DATA_AT + 32, struct.pack(">QQ", 99, 100)), FrameFormatError, True),  # end > total
    (_patched(_DATA_AT + 32, struct.pack(">QQ", 200, 100)), FrameFormatError, True),
    (_patched(_DATA_AT + 32, struct.pack(">QQ", 0, 2**64 - 1)), FrameFormatError, True),
    (_patched(6, b"\x03"), FrameFormatError, True),  # "last" but the file goes on
    (encode_frame(chunk(offset=97, last=True))[:6] + b"\x02"
     + encode_frame(chunk(offset=97, last=True))[7:], FrameFormatError, True),  # end, not last
    (b"\x00" * (MAX_FRAME_SIZE + 1), FrameTooLargeError, False),
])
def test_malformed_frames_are_refused(data: bytes, error: type[FrameError],
                                      rid_known: bool) -> None:
    with pytest.raises(error) as caught:
        decode_frame(data)
    assert caught.value.request_id == (RID if rid_known else None)


def test_empty_chunk_before_the_end_is_refused() -> None:
    data = encode_frame(chunk(offset=97, last=True))
    empty = bytearray(data[:_DATA_AT + 48] + struct.pack(">II", 0, zlib.crc32(b"")))
    empty[_DATA_AT + 32:_DATA_AT + 40] = struct.pack(">Q", 50)
    empty[6] = 0x00
    with pytest.raises(FrameFormatError, match="empty chunk"):
        decode_frame(bytes(empty))


def test_malformed_error_frames_are_refused() -> None:
    good = encode_frame(ErrorFrame(RID, 404, "gone"))
    pos = 8 + len(RID)
    cases: list[tuple[bytes, type[FrameError]]] = [
        (good[:6] + b"\x01" + good[7:], FrameFormatError),  # flags on an error
        (good[:pos + 1], FrameFormatError),  # short header
        (good[:pos] + struct.pack(">HH", 404, 5) + b"gone", FrameFormatError),
        (good[:pos] + struct.pack(">HH", 404, 2) + b"\xff\xfe", FrameFormatError),
        (good[:pos] + struct.pack(">HH", 200, 0), FrameFormatError),  # not an error code
        (good[:pos] + struct.pack(">HH", 404, MAX_ERROR_MESSAGE + 1)
         + b"x" * (MAX_ERROR_MESSAGE + 1), FrameTooLargeError),
    ]
    for data, error in cases:
        with pytest.raises(error):
            decode_frame(data)


@pytest.mark.parametrize(("fields", "error"), [
    ({"file_id": b"short"}, FrameFormatError),
    ({"payload": b"x" * (MAX_PAYLOAD + 1), "total": 10**6}, FrameTooLargeError),
    ({"offset": 99}, FrameFormatError),  # 99 + 3 > 100
    ({"offset": 97}, FrameFormatError),  # reaches the end but not flagged last
    ({"last": True}, FrameFormatError),
    ({"total": MAX_OFFSET + 1}, FrameFormatError),
    ({"request_id": "bad id"}, MalformedRequestError),
])
def test_frames_are_validated_when_built(fields: dict[str, object],
                                         error: type[FrameError]) -> None:
    with pytest.raises(error):
        chunk(**fields)


def test_error_frame_bounds() -> None:
    with pytest.raises(FrameTooLargeError):
        ErrorFrame(RID, 404, "x" * (MAX_ERROR_MESSAGE + 1))
    with pytest.raises(FrameFormatError):
        ErrorFrame(RID, 302)
    assert peek_request_id(b"garbage") is None
