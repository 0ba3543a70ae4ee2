"""Sealed bundles end to end: seal, wrap, unwrap, open; and every refusal leaves nothing behind."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import SealedFixture, make_manifest

from edgeota.protocol.bundle import OpenedBundle, inspect_bundle, open_bundle, seal_bundle
from edgeota.protocol.errors import (
    ChunkAuthenticationError,
    ChunkOrderError,
    HeaderAuthenticationError,
    KeyUnwrapError,
    MalformedBundleError,
    ManifestError,
    PlaintextDigestError,
    ProtocolError,
    TruncatedBundleError,
    UnsupportedSuiteError,
)
from edgeota.protocol.keywrap import KemPrivateKey, KemSuite, unwrap_content_key, wrap_content_key
from edgeota.protocol.stream import DEFAULT_CHUNK_SIZE, HEADER_SIZE, TAG_SIZE, AeadSuite

CHUNK = DEFAULT_CHUNK_SIZE
STRIDE = CHUNK + TAG_SIZE
SealRandom = Callable[..., SealedFixture]


def open_into(path: Path, key: bytes, dest: Path, **kwargs: object) -> OpenedBundle:
    return open_bundle(path, key, dest, **kwargs)  # type: ignore[arg-type]


def assert_nothing_unpacked(folder: Path, dest_name: str = "out") -> None:
    """No destination, no staging folder, no stray plaintext next to the bundle."""
    leftovers = sorted(p.name for p in folder.iterdir() if p.name not in {"bundle.eotb",
                                                                          "model.onnx",
                                                                          "tampered.eotb"})
    assert leftovers == [], f"left on disk after a refusal: {leftovers}"
    assert not (folder / dest_name).exists()


# Sizes of the tar *payload* (model file) around the chunk boundaries, plus a
# multi-chunk file; the tar framing shifts the sealed boundaries, so the stream
# tests cover exact plaintext boundaries and these cover the bundle path.
SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 4321]


@pytest.mark.parametrize("kem", list(KemSuite), ids=lambda s: s.value)
@pytest.mark.parametrize("suite", list(AeadSuite), ids=lambda s: s.value)
@pytest.mark.parametrize("size", SIZES)
def test_round_trip_through_key_wrap(
    seal_random: SealRandom, tmp_path: Path, size: int, suite: AeadSuite, kem: KemSuite
) -> None:
    sealed = seal_random(size, suite)
    device = KemPrivateKey.generate(kem)
    wrapped = wrap_content_key(sealed.content_key, device.public_key(), "pi-1")
    content_key = unwrap_content_key(wrapped, device, "pi-1")
    opened = open_into(
        sealed.info.path, content_key, tmp_path / "out",
        expected_plaintext_sha256=sealed.info.plaintext_sha256,
    )
    assert opened.model_path.read_bytes() == sealed.payload
    assert opened.manifest == sealed.manifest
    assert opened.header.suite is suite
    assert opened.plaintext_sha256 == sealed.info.plaintext_sha256
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "model.onnx"]
    assert sealed.info.sealed_sha256 == hashlib.sha256(sealed.info.path.read_bytes()).hexdigest()
    summary = inspect_bundle(sealed.info.path)
    assert summary.plaintext_size == sealed.info.plaintext_size


def test_external_data_files_travel_with_the_model(tmp_path: Path) -> None:
    from edgeota.protocol.bundle import describe_payload, generate_content_key

    model = tmp_path / "model.onnx"
    model.write_bytes(b"graph")
    weights = tmp_path / "weights.bin"
    weights.write_bytes(os.urandom(2 * CHUNK + 7))
    manifest = make_manifest(model, external_data=(describe_payload(weights, "data/w.bin"),))
    key = generate_content_key()
    info = seal_bundle(manifest, {"model.onnx": model, "data/w.bin": weights},
                       tmp_path / "b.eotb", key)
    opened = open_bundle(info.path, key, tmp_path / "out")
    assert (opened.folder / "data" / "w.bin").read_bytes() == weights.read_bytes()


def _flip_positions(size: int, rng: random.Random) -> list[tuple[str, int]]:
    chunks = -(-(size - HEADER_SIZE) // STRIDE)
    positions = [("header", i) for i in range(HEADER_SIZE)]
    for index in range(chunks):
        start = HEADER_SIZE + index * STRIDE
        end = min(start + STRIDE, size)
        positions += [("body", start), ("body", rng.randrange(start, end - TAG_SIZE))]
        positions += [("tag", end - TAG_SIZE), ("tag", end - 1)]
    positions += [("last", size - 1), ("last", size - TAG_SIZE - 1)]
    return positions


def test_every_sampled_single_byte_flip_is_refused(seal_random: SealRandom, tmp_path: Path) -> None:
    sealed = seal_random(3 * CHUNK + 999)
    original = sealed.info.path.read_bytes()
    tampered = sealed.info.path.with_name("tampered.eotb")
    rng = random.Random(7)
    positions = _flip_positions(len(original), rng)
    assert len(positions) > 60
    for region, position in positions:
        data = bytearray(original)
        data[position] ^= 1 << rng.randrange(8)
        tampered.write_bytes(bytes(data))
        with pytest.raises(ProtocolError) as caught:
            open_into(tampered, sealed.content_key, tmp_path / "out")
        if region != "header":
            assert isinstance(caught.value, ChunkAuthenticationError), (region, position)
        else:
            assert isinstance(caught.value, HeaderAuthenticationError | MalformedBundleError
                              | UnsupportedSuiteError), (position, caught.value)
        assert str(caught.value)
        assert not (tmp_path / "out").exists()
        assert_nothing_unpacked(sealed.info.path.parent)


def test_truncation_at_a_chunk_boundary_is_refused(seal_random: SealRandom, tmp_path: Path) -> None:
    sealed = seal_random(3 * CHUNK + 999)
    data = sealed.info.path.read_bytes()
    sealed.info.path.write_bytes(data[: HEADER_SIZE + 2 * STRIDE])
    with pytest.raises(TruncatedBundleError):
        open_into(sealed.info.path, sealed.content_key, tmp_path / "out")
    assert_nothing_unpacked(sealed.info.path.parent)


@pytest.mark.parametrize("how", ["reordered", "duplicated"])
def test_reordered_or_duplicated_chunks_are_refused(
    seal_random: SealRandom, tmp_path: Path, how: str
) -> None:
    sealed = seal_random(4 * CHUNK)
    data = sealed.info.path.read_bytes()
    chunk = [data[HEADER_SIZE + i * STRIDE : HEADER_SIZE + (i + 1) * STRIDE] for i in range(5)]
    order = [0, 2, 1, 3, 4] if how == "reordered" else [0, 1, 1, 3, 4]
    sealed.info.path.write_bytes(data[:HEADER_SIZE] + b"".join(chunk[i] for i in order))
    with pytest.raises(ChunkOrderError, match=how):
        open_into(sealed.info.path, sealed.content_key, tmp_path / "out")
    assert_nothing_unpacked(sealed.info.path.parent)


def test_key_wrapped_for_device_a_does_not_open_device_b_bundle(seal_random: SealRandom) -> None:
    sealed = seal_random(1000)
    device_a, device_b = KemPrivateKey.generate(), KemPrivateKey.generate()
    wrapped_for_a = wrap_content_key(sealed.content_key, device_a.public_key(), "dev-a")
    with pytest.raises(KeyUnwrapError):
        unwrap_content_key(wrapped_for_a, device_b, "dev-b")


def test_wrong_suite_id_in_header_is_refused(seal_random: SealRandom, tmp_path: Path) -> None:
    sealed = seal_random(1000)
    data = bytearray(sealed.info.path.read_bytes())
    data[5] = 0xEE
    sealed.info.path.write_bytes(bytes(data))
    with pytest.raises(UnsupportedSuiteError, match="suite id 238"):
        open_into(sealed.info.path, sealed.content_key, tmp_path / "out")
    with pytest.raises(UnsupportedSuiteError):
        inspect_bundle(sealed.info.path)
    assert_nothing_unpacked(sealed.info.path.parent)


def test_wrong_content_key_is_refused(seal_random: SealRandom, tmp_path: Path) -> None:
    sealed = seal_random(1000)
    with pytest.raises(HeaderAuthenticationError):
        open_into(sealed.info.path, os.urandom(32), tmp_path / "out")
    assert_nothing_unpacked(sealed.info.path.parent)


def test_plaintext_digest_from_signed_metadata_is_enforced(
    seal_random: SealRandom, tmp_path: Path
) -> None:
    sealed = seal_random(1000)
    with pytest.raises(PlaintextDigestError, match="signed metadata"):
        open_into(sealed.info.path, sealed.content_key, tmp_path / "out",
                  expected_plaintext_sha256="0" * 64)
    assert_nothing_unpacked(sealed.info.path.parent)


def test_existing_destination_is_never_overwritten(seal_random: SealRandom, tmp_path: Path) -> None:
    sealed = seal_random(10)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("last known good")
    with pytest.raises(FileExistsError):
        open_into(sealed.info.path, sealed.content_key, tmp_path / "out")
    assert (tmp_path / "out" / "keep").read_text() == "last known good"


def test_payload_that_changed_since_it_was_described_aborts_the_seal(tmp_path: Path) -> None:
    from edgeota.protocol.bundle import generate_content_key

    model = tmp_path / "model.onnx"
    model.write_bytes(b"a" * 100)
    manifest = make_manifest(model)
    model.write_bytes(b"b" * 100)  # same size, other bytes
    with pytest.raises(ManifestError, match="changed while sealing"):
        seal_bundle(manifest, {"model.onnx": model}, tmp_path / "b.eotb", generate_content_key())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_payload_map_must_match_the_manifest(tmp_path: Path) -> None:
    from edgeota.protocol.bundle import generate_content_key

    model = tmp_path / "model.onnx"
    model.write_bytes(b"m")
    with pytest.raises(ManifestError, match="do not match"):
        seal_bundle(make_manifest(model), {"other.onnx": model}, tmp_path / "b.eotb",
                    generate_content_key())


def test_without_a_sealed_digest_the_sealed_bytes_are_not_hashed_but_still_authenticate(
        seal_random: SealRandom, tmp_path: Path) -> None:
    from edgeota.protocol.stream import StreamOpener

    sealed = seal_random(3 * CHUNK)
    opened = open_into(sealed.info.path, sealed.content_key, tmp_path / "ok",
                       expected_plaintext_sha256=sealed.info.plaintext_sha256)
    assert opened.model_path.read_bytes() == sealed.payload
    with sealed.info.path.open("rb") as src:
        opener = StreamOpener(src, sealed.content_key, hash_sealed=False)
        opener.read_all_remaining()
        assert opener.finished
        with pytest.raises(RuntimeError, match="hash_sealed=False"):
            _ = opener.sealed_sha256
    data = bytearray(sealed.info.path.read_bytes())
    data[HEADER_SIZE + CHUNK // 2] ^= 0x01
    sealed.info.path.write_bytes(bytes(data))
    with pytest.raises(ChunkAuthenticationError):
        open_into(sealed.info.path, sealed.content_key, tmp_path / "tampered",
                  expected_plaintext_sha256=sealed.info.plaintext_sha256)
    assert not (tmp_path / "tampered").exists()


def test_sealed_digest_is_checked_in_the_same_pass(seal_random: SealRandom, tmp_path: Path) -> None:
    from edgeota.protocol.errors import SealedDigestError

    sealed = seal_random(3 * CHUNK)
    opened = open_into(sealed.info.path, sealed.content_key, tmp_path / "ok",
                       expected_sealed_sha256=sealed.info.sealed_sha256,
                       expected_plaintext_sha256=sealed.info.plaintext_sha256)
    assert opened.model_path.read_bytes() == sealed.payload
    with pytest.raises(SealedDigestError, match="signed target hash"):
        open_into(sealed.info.path, sealed.content_key, tmp_path / "out",
                  expected_sealed_sha256="f" * 64)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("suite", list(AeadSuite), ids=lambda s: s.value)
def test_a_large_bundle_opens_with_threads_and_background_writeback(
        seal_random: SealRandom, tmp_path: Path, suite: AeadSuite) -> None:
    # Large enough for the digest threads and for flushing the model as it is written.
    sealed = seal_random(20 * 1024 * 1024 + 3, suite)
    seen: list[int] = []
    opened = open_into(sealed.info.path, sealed.content_key, tmp_path / "out",
                       expected_sealed_sha256=sealed.info.sealed_sha256,
                       expected_plaintext_sha256=sealed.info.plaintext_sha256,
                       progress=seen.append)
    assert opened.model_path.read_bytes() == sealed.payload
    assert sum(seen) == len(sealed.payload) + len(sealed.manifest.to_json())
    assert opened.plaintext_sha256 == sealed.info.plaintext_sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sealed-0"]  # no staging left


def test_a_large_member_that_is_not_the_pinned_one_is_refused(tmp_path: Path) -> None:
    import io
    import tarfile

    from edgeota.protocol.archive import write_member
    from edgeota.protocol.bundle import generate_content_key
    from edgeota.protocol.manifest import MANIFEST_PATH
    from edgeota.protocol.stream import StreamSealer

    pinned = tmp_path / "model.onnx"
    pinned.write_bytes(os.urandom(6 * 1024 * 1024))
    manifest = make_manifest(pinned).to_json()
    other = os.urandom(pinned.stat().st_size)  # same size, other bytes: only sha256 tells
    key = generate_content_key()
    path = tmp_path / "bundle.eotb"
    with path.open("wb") as raw, StreamSealer(raw, key) as sealer, \
            tarfile.open(fileobj=sealer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        write_member(tar, MANIFEST_PATH, io.BytesIO(manifest), len(manifest))
        write_member(tar, "model.onnx", io.BytesIO(other), len(other))
    with pytest.raises(PlaintextDigestError, match="manifest pins"):
        open_into(path, key, tmp_path / "out")  # no signed plaintext digest: per-file ones
    assert_nothing_unpacked(tmp_path)
