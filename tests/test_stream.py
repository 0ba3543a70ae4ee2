"""The STREAM construction: round trips and every way a sealed stream can be damaged."""

from __future__ import annotations

import io
import os

import pytest

from edgeota.protocol.errors import (
    ChunkAuthenticationError,
    ChunkOrderError,
    HeaderAuthenticationError,
    MalformedBundleError,
    TrailingDataError,
    TruncatedBundleError,
    UnsupportedSuiteError,
)
from edgeota.protocol.stream import (
    HEADER_SIZE,
    TAG_SIZE,
    AeadSuite,
    StreamOpener,
    StreamSealer,
    parse_header,
    sealed_size_for,
)

CHUNK = 4096  # small chunks keep multi-chunk cases fast; the format is the same
STRIDE = CHUNK + TAG_SIZE
KEY = bytes(range(32))


def seal(data: bytes, suite: AeadSuite = AeadSuite.CHACHA20_POLY1305, key: bytes = KEY) -> bytes:
    out = io.BytesIO()
    with StreamSealer(out, key, suite=suite, chunk_size=CHUNK) as sealer:
        # Uneven writes: chunking must not depend on how the caller slices data.
        for start in range(0, len(data), 1000):
            sealer.write(data[start : start + 1000])
    return out.getvalue()


def open_all(sealed: bytes, key: bytes = KEY) -> bytes:
    return StreamOpener(io.BytesIO(sealed), key).read()


def chunk_span(index: int) -> slice:
    start = HEADER_SIZE + index * STRIDE
    return slice(start, start + STRIDE)


SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 123]


@pytest.mark.parametrize("suite", list(AeadSuite))
@pytest.mark.parametrize("size", SIZES)
def test_round_trip(suite: AeadSuite, size: int) -> None:
    data = os.urandom(size)
    sealed = seal(data, suite)
    assert len(sealed) == sealed_size_for(size, CHUNK)
    header = parse_header(sealed)
    assert header.suite is suite
    assert header.plaintext_size(len(sealed)) == size
    opener = StreamOpener(io.BytesIO(sealed), KEY)
    assert opener.read() == data
    assert opener.finished
    assert opener.plaintext_size == size


def test_ciphertext_differs_per_seal_even_for_the_same_key() -> None:
    data = b"same model" * 1000
    assert seal(data)[HEADER_SIZE:] != seal(data)[HEADER_SIZE:]


def test_wrong_key_is_refused_at_the_header() -> None:
    sealed = seal(b"weights")
    with pytest.raises(HeaderAuthenticationError, match="content key is not this bundle's"):
        StreamOpener(io.BytesIO(sealed), bytes(32))


def test_flip_in_body_names_the_chunk() -> None:
    sealed = bytearray(seal(os.urandom(3 * CHUNK)))
    sealed[chunk_span(1).start + 10] ^= 0x80
    opener = StreamOpener(io.BytesIO(bytes(sealed)), KEY)
    with pytest.raises(ChunkAuthenticationError, match="chunk 1"):
        opener.read()


def test_no_plaintext_of_a_bad_chunk_is_ever_returned() -> None:
    data = os.urandom(3 * CHUNK)
    sealed = bytearray(seal(data))
    sealed[chunk_span(1).start] ^= 1
    opener = StreamOpener(io.BytesIO(bytes(sealed)), KEY)
    assert opener.read(CHUNK) == data[:CHUNK]  # chunk 0 is intact and authentic
    with pytest.raises(ChunkAuthenticationError):
        opener.read(1)


def test_truncation_at_a_chunk_boundary() -> None:
    sealed = seal(os.urandom(3 * CHUNK + 10))
    cut = sealed[: chunk_span(3).start]  # drop the last chunk entirely
    with pytest.raises(TruncatedBundleError, match="not sealed as the last one"):
        open_all(cut)


def test_truncation_of_everything_but_the_header() -> None:
    sealed = seal(b"x")
    with pytest.raises(TruncatedBundleError):
        open_all(sealed[:HEADER_SIZE])


def test_trailing_data_after_the_last_chunk() -> None:
    sealed = seal(os.urandom(2 * CHUNK))  # last chunk is full-size
    with pytest.raises(TrailingDataError):
        open_all(sealed + sealed[chunk_span(0)])


def test_reordered_chunks() -> None:
    sealed = seal(os.urandom(4 * CHUNK + 1))
    swapped = (
        sealed[:HEADER_SIZE] + sealed[chunk_span(0)] + sealed[chunk_span(2)]
        + sealed[chunk_span(1)] + sealed[chunk_span(3).start :]
    )
    with pytest.raises(ChunkOrderError, match=r"position 1 is chunk 2.*reordered"):
        open_all(swapped)


def test_duplicated_chunk() -> None:
    sealed = seal(os.urandom(4 * CHUNK + 1))
    duplicated = (
        sealed[:HEADER_SIZE] + sealed[chunk_span(0)] + sealed[chunk_span(1)]
        + sealed[chunk_span(1)] + sealed[chunk_span(3).start :]
    )
    with pytest.raises(ChunkOrderError, match=r"position 2 is chunk 1.*duplicated"):
        open_all(duplicated)


def test_chunk_from_another_bundle_with_the_same_key() -> None:
    first = seal(os.urandom(2 * CHUNK + 1))
    second = seal(os.urandom(2 * CHUNK + 1))
    spliced = first[: chunk_span(1).start] + second[chunk_span(1).start :]
    with pytest.raises(ChunkAuthenticationError):
        open_all(spliced)


def test_unknown_suite_id_is_refused_before_any_crypto() -> None:
    sealed = bytearray(seal(b"weights"))
    sealed[5] = 9
    with pytest.raises(UnsupportedSuiteError, match="suite id 9"):
        StreamOpener(io.BytesIO(bytes(sealed)), KEY)


def test_switching_suite_id_between_known_suites_fails_authentication() -> None:
    sealed = bytearray(seal(b"weights", AeadSuite.CHACHA20_POLY1305))
    sealed[5] = AeadSuite.AES_256_GCM.wire_id
    with pytest.raises(HeaderAuthenticationError):
        StreamOpener(io.BytesIO(bytes(sealed)), KEY)


@pytest.mark.parametrize(
    ("raw", "error", "message"),
    [
        (b"", MalformedBundleError, "shorter than"),
        (b"PK\x03\x04" + bytes(HEADER_SIZE), MalformedBundleError, "magic"),
    ],
)
def test_not_a_bundle(raw: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        StreamOpener(io.BytesIO(raw), KEY)


def test_implied_plaintext_size_rejects_impossible_lengths() -> None:
    sealed = seal(os.urandom(CHUNK + 5))
    header = parse_header(sealed)
    with pytest.raises(MalformedBundleError, match="inside a chunk tag"):
        header.plaintext_size(HEADER_SIZE + STRIDE + 3)


def test_sealer_without_close_leaves_an_unopenable_stream() -> None:
    out = io.BytesIO()
    sealer = StreamSealer(out, KEY, chunk_size=CHUNK)
    sealer.write(os.urandom(3 * CHUNK))
    # no close(): two chunks sealed as "not last", one held back
    with pytest.raises(TruncatedBundleError):
        open_all(out.getvalue())


# The opener reads ``read_chunks`` sealed chunks at a time; the last-chunk
# decision must not depend on where those reads split the file.
BLOCK_SIZES = [0, CHUNK, 2 * CHUNK, 3 * CHUNK, 4 * CHUNK, 4 * CHUNK + 1, 6 * CHUNK - 1]


@pytest.mark.parametrize("read_chunks", [1, 2, 3])
@pytest.mark.parametrize("size", BLOCK_SIZES)
def test_chunks_yield_the_plaintext_whatever_the_read_size(size: int, read_chunks: int) -> None:
    data = os.urandom(size)
    opener = StreamOpener(io.BytesIO(seal(data)), KEY, read_chunks=read_chunks)
    chunks = list(opener.chunks())
    assert b"".join(chunks) == data
    assert all(isinstance(c, memoryview) and c.readonly for c in chunks)
    assert [len(c) for c in chunks[:-1]] == [CHUNK] * (len(chunks) - 1)
    assert opener.finished
    assert opener.plaintext_size == size


@pytest.mark.parametrize("read_chunks", [1, 2, 4])
def test_truncation_at_a_read_block_boundary(read_chunks: int) -> None:
    sealed = seal(os.urandom(4 * CHUNK + 10))
    cut = sealed[: chunk_span(4).start]  # four full chunks left: whole read blocks
    with pytest.raises(TruncatedBundleError, match="not sealed as the last one"):
        b"".join(StreamOpener(io.BytesIO(cut), KEY, read_chunks=read_chunks).chunks())


@pytest.mark.parametrize("read_chunks", [1, 2])
def test_trailing_chunk_after_a_full_read_block(read_chunks: int) -> None:
    sealed = seal(os.urandom(2 * CHUNK))  # the last chunk ends the second block of two
    with pytest.raises(TrailingDataError):
        list(StreamOpener(io.BytesIO(sealed + sealed[chunk_span(0)]), KEY,
                          read_chunks=read_chunks).chunks())


def test_a_chunk_is_yielded_before_the_next_one_is_opened() -> None:
    data = os.urandom(3 * CHUNK)
    sealed = bytearray(seal(data))
    sealed[chunk_span(1).start] ^= 1
    chunks = StreamOpener(io.BytesIO(bytes(sealed)), KEY, read_chunks=4).chunks()
    assert next(chunks) == data[:CHUNK]  # read in the same block as the bad chunk 1
    with pytest.raises(ChunkAuthenticationError, match="chunk 1"):
        next(chunks)


def test_plaintext_is_read_one_way_only() -> None:
    opener = StreamOpener(io.BytesIO(seal(b"weights")), KEY)
    assert opener.read(3) == b"wei"
    with pytest.raises(RuntimeError, match="already being read"):
        opener.chunks()


def test_plaintext_digest_is_complete_once_the_last_byte_is_read() -> None:
    import hashlib

    data = os.urandom(3 * CHUNK + 7)
    opener = StreamOpener(io.BytesIO(seal(data)), KEY, read_chunks=2)
    read = b""
    while len(read) < len(data):  # all bytes, without reading on to EOF
        read += opener.read(len(data) - len(read))
    assert read == data
    assert opener.finished
    assert opener.plaintext_sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("size", BLOCK_SIZES)
def test_blocks_yield_the_plaintext_a_read_block_at_a_time(size: int) -> None:
    data = os.urandom(size)
    opener = StreamOpener(io.BytesIO(seal(data)), KEY, read_chunks=2)
    blocks = list(opener.blocks())
    assert b"".join(blocks) == data
    assert all(b.readonly for b in blocks)
    assert [len(b) for b in blocks[:-1]] == [2 * CHUNK] * (len(blocks) - 1)
    assert opener.finished


def test_a_bad_chunk_withholds_its_whole_block() -> None:
    data = os.urandom(5 * CHUNK)
    sealed = bytearray(seal(data))
    sealed[chunk_span(3).start] ^= 1  # second chunk of the second block of two
    blocks = StreamOpener(io.BytesIO(bytes(sealed)), KEY, read_chunks=2).blocks()
    assert next(blocks) == data[: 2 * CHUNK]
    with pytest.raises(ChunkAuthenticationError, match="chunk 3"):
        next(blocks)  # chunk 2 authenticated, but is not handed out without chunk 3


def test_a_kept_chunk_stays_unchanged_while_later_buffers_are_recycled() -> None:
    data = os.urandom(40 * CHUNK + 3)
    opener = StreamOpener(io.BytesIO(seal(data)), KEY, read_chunks=2)
    chunks = opener.chunks()
    kept = next(chunks)  # its buffer must not be reused while this view lives
    copied = [bytes(kept)] + [bytes(c) for c in chunks]  # the other views die at once
    assert b"".join(copied) == data
    assert kept == data[:CHUNK]
