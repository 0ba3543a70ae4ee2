"""Fuzz the device side of the MQTT fetch protocol: ``decode_frame`` and ``peek_request_id``.

A frame on ``devices/{id}/rx`` may come from anyone who can publish there (a
compromised broker, a bug in another replica). Invariant: any bytes either
decode into a ``ChunkFrame``/``ErrorFrame`` or raise a ``FrameError`` subclass
(the session counts it and fails that one fetch) -- never another exception,
which would kill paho's network thread. ``peek_request_id`` never raises. A
decoded frame is canonical: encoding it again gives exactly the bytes read,
so nothing in a frame is ignored.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Mapping

import fuzz_support
from hypothesis import given
from hypothesis import strategies as st

with fuzz_support.instrumented(__name__):
    from edgeota.protocol.fetch import (
        FILE_ID_SIZE,
        MAX_PAYLOAD,
        ChunkFrame,
        ErrorCode,
        ErrorFrame,
        FrameError,
        chunk_header_size,
        decode_frame,
        encode_frame,
        pack_chunk,
        peek_request_id,
    )


def one_input(data: bytes) -> None:
    rid = peek_request_id(data)
    try:
        frame = decode_frame(data)
    except FrameError:
        return
    assert rid == frame.request_id, "peek_request_id disagrees with decode_frame"
    assert encode_frame(frame) == data, "a decoded frame does not re-encode to its bytes"


def seeds() -> Mapping[str, bytes]:
    model = fuzz_support.sample_model_path().read_bytes()
    digest = hashlib.sha256(model).digest()
    first = bytearray(chunk_header_size("r0-bundle") + 2048)
    first[-2048:] = model[:2048]
    pack_chunk(first, request_id="r0-bundle", file_id=digest, offset=0, total=len(model),
               content_id=True)
    return {
        "chunk-first": bytes(first),
        "chunk-last": encode_frame(ChunkFrame("r0-bundle", digest, len(model) - 600, len(model),
                                              model[-600:], last=True, content_id=True)),
        "chunk-metadata": encode_frame(ChunkFrame(
            "ts_1", hashlib.sha256(b"timestamp.json").digest(), 0, 5, b'{"a":', last=True)),
        "error-404": encode_frame(ErrorFrame("r1", ErrorCode.NOT_FOUND,
                                             "image/metadata/3.root.json not found")),
        "error-429": encode_frame(ErrorFrame("r2", ErrorCode.BUSY, "")),
    }


_RID = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)


@st.composite
def _frames(draw: st.DrawFn) -> ChunkFrame | ErrorFrame:
    rid = draw(_RID)
    if draw(st.booleans()):
        return ErrorFrame(rid, draw(st.integers(400, 599)),
                          draw(st.text(max_size=100)).encode()[:512].decode("utf-8", "ignore"))
    total = draw(st.integers(0, 2**63 - 1))
    offset = draw(st.integers(0, total))
    size = draw(st.integers(0 if offset == total else 1, min(MAX_PAYLOAD, total - offset, 300)))
    payload = draw(st.binary(min_size=size, max_size=size))
    last = offset + size == total
    return ChunkFrame(rid, draw(st.binary(min_size=FILE_ID_SIZE, max_size=FILE_ID_SIZE)), offset,
                      total, payload, last=last, content_id=draw(st.booleans()))


@given(frame=_frames(), at=st.integers(0, 2**16), bits=st.integers(1, 255))
def frames_round_trip(check: Callable[[bytes], None], frame: ChunkFrame | ErrorFrame, at: int,
                      bits: int) -> None:
    """Every valid frame decodes to itself; one corrupted byte decodes canonically or is refused."""
    data = encode_frame(frame)
    assert decode_frame(data) == frame
    check(data)
    damaged = bytearray(data)
    damaged[at % len(damaged)] ^= bits
    check(bytes(damaged))


HARNESS = fuzz_support.Harness(
    name="fetch_frame",
    one_input=one_input,
    seeds=seeds,
    max_len=4096,
    properties=(frames_round_trip,),
)

if __name__ == "__main__":
    sys.exit(fuzz_support.main(HARNESS))
