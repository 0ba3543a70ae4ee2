"""Malicious tar members never reach the disk, directly or inside a sealed bundle."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from edgeota.protocol.archive import ExtractLimits, iter_members
from edgeota.protocol.bundle import generate_content_key, open_bundle
from edgeota.protocol.errors import ManifestError, PlaintextDigestError, UnsafeArchiveError
from edgeota.protocol.manifest import MANIFEST_PATH
from edgeota.protocol.stream import StreamSealer


def tar_bytes(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def regular(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, b""


MALICIOUS = {
    "absolute path": [regular("/etc/cron.d/evil")],
    "dot-dot": [regular("../escape")],
    "nested dot-dot": [regular("models/../../escape")],
    "backslash": [regular("..\\escape")],
    "symlink": [special("model.onnx", tarfile.SYMTYPE, "/etc/shadow")],
    "hard link": [special("model.onnx", tarfile.LNKTYPE, "/etc/shadow")],
    "character device": [special("tty", tarfile.CHRTYPE)],
    "fifo": [special("pipe", tarfile.FIFOTYPE)],
    "directory": [special("dir", tarfile.DIRTYPE)],
    "hidden name": [regular(".bashrc")],
    "duplicate member": [regular("a"), regular("a")],
    "too deep": [regular("a/b/c/d/e")],
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_member_is_refused(tmp_path: Path, case: str) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    stream = io.BytesIO(tar_bytes(*MALICIOUS[case]))
    with pytest.raises(UnsafeArchiveError):
        list(iter_members(stream, dest, ExtractLimits()))
    # nothing outside dest, and no file that is not a plain regular one inside it
    assert not (tmp_path / "escape").exists()
    assert all(p.is_file() and not p.is_symlink() for p in dest.rglob("*"))


def test_oversize_member_is_refused_before_any_byte_is_written(tmp_path: Path) -> None:
    stream = io.BytesIO(tar_bytes(regular("model.onnx", b"x" * 2000)))
    with pytest.raises(UnsafeArchiveError, match="2000 bytes"):
        list(iter_members(stream, tmp_path, ExtractLimits(max_member_size=1000)))
    assert list(tmp_path.iterdir()) == []


def test_total_size_cap(tmp_path: Path) -> None:
    stream = io.BytesIO(tar_bytes(regular("a", b"1" * 600), regular("b", b"2" * 600)))
    with pytest.raises(UnsafeArchiveError, match="more than 1000 bytes"):
        list(iter_members(stream, tmp_path, ExtractLimits(max_total_size=1000)))


def test_member_count_cap(tmp_path: Path) -> None:
    stream = io.BytesIO(tar_bytes(*(regular(f"f{i}") for i in range(5))))
    with pytest.raises(UnsafeArchiveError, match="more than 3 members"):
        list(iter_members(stream, tmp_path, ExtractLimits(max_members=3)))


def test_not_a_tar(tmp_path: Path) -> None:
    with pytest.raises(UnsafeArchiveError):
        list(iter_members(io.BytesIO(b"\x01" * 2048), tmp_path, ExtractLimits()))


def seal_raw(tmp_path: Path, plaintext: bytes) -> tuple[Path, bytes]:
    """Seal arbitrary plaintext: what a compromised release key could produce."""
    key = generate_content_key()
    path = tmp_path / "evil.eotb"
    with path.open("wb") as out, StreamSealer(out, key) as sealer:
        sealer.write(plaintext)
    return path, key


def assert_clean(tmp_path: Path) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.eotb"]


@pytest.mark.parametrize("case", ["absolute path", "dot-dot", "symlink", "hard link"])
def test_malicious_member_inside_a_sealed_bundle(tmp_path: Path, case: str) -> None:
    path, key = seal_raw(tmp_path, tar_bytes(*MALICIOUS[case]))
    with pytest.raises(UnsafeArchiveError):
        open_bundle(path, key, tmp_path / "out")
    assert_clean(tmp_path)


def _manifest_json(model: bytes) -> bytes:
    import hashlib
    import json

    return json.dumps({
        "format": "edgeota.manifest/1", "name": "m", "version": "1.0.0",
        "model": {"path": "model.onnx", "sha256": hashlib.sha256(model).hexdigest(),
                  "size": len(model)},
        "opset": 17, "inputs": [{"name": "x", "datatype": "FP32", "shape": [None, 2]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [None]}], "hardware": ["hw"],
    }).encode()


def test_manifest_must_come_first(tmp_path: Path) -> None:
    path, key = seal_raw(tmp_path, tar_bytes(regular("model.onnx"),
                                             regular(MANIFEST_PATH, _manifest_json(b"x"))))
    with pytest.raises(ManifestError, match="first bundle member"):
        open_bundle(path, key, tmp_path / "out")
    assert_clean(tmp_path)


def test_member_not_named_by_the_manifest(tmp_path: Path) -> None:
    path, key = seal_raw(tmp_path, tar_bytes(regular(MANIFEST_PATH, _manifest_json(b"x")),
                                             regular("model.onnx", b"x"),
                                             regular("extra.sh", b"#!/bin/sh")))
    with pytest.raises(UnsafeArchiveError, match="not named by the manifest"):
        open_bundle(path, key, tmp_path / "out")
    assert_clean(tmp_path)


def test_member_with_other_bytes_than_the_manifest_pins(tmp_path: Path) -> None:
    path, key = seal_raw(tmp_path, tar_bytes(regular(MANIFEST_PATH, _manifest_json(b"x")),
                                             regular("model.onnx", b"y")))
    with pytest.raises(PlaintextDigestError, match="manifest pins"):
        open_bundle(path, key, tmp_path / "out")
    assert_clean(tmp_path)


def test_missing_payload_file(tmp_path: Path) -> None:
    path, key = seal_raw(tmp_path, tar_bytes(regular(MANIFEST_PATH, _manifest_json(b"x"))))
    with pytest.raises(UnsafeArchiveError, match="lacks 1 file"):
        open_bundle(path, key, tmp_path / "out")
    assert_clean(tmp_path)


def test_invalid_manifest(tmp_path: Path) -> None:
    path, key = seal_raw(tmp_path, tar_bytes(regular(MANIFEST_PATH, b'{"format": "nope"}')))
    with pytest.raises(ManifestError):
        open_bundle(path, key, tmp_path / "out")
    assert_clean(tmp_path)


def test_data_after_the_tar_end_is_refused(tmp_path: Path) -> None:
    body = tar_bytes(regular(MANIFEST_PATH, _manifest_json(b"x")), regular("model.onnx", b"x"))
    path, key = seal_raw(tmp_path, body + b"smuggled")
    with pytest.raises(UnsafeArchiveError, match="after the end"):
        open_bundle(path, key, tmp_path / "out")
    assert_clean(tmp_path)


def test_long_names_in_pax_and_gnu_headers_unpack(tmp_path: Path) -> None:
    name = "a" * 60 + "/" + "b" * 60  # 121 characters: no room in a ustar header
    for fmt, folder in ((tarfile.PAX_FORMAT, "pax"), (tarfile.GNU_FORMAT, "gnu")):
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
            info, data = regular(name, b"weights")
            tar.addfile(info, io.BytesIO(data))
        dest = tmp_path / folder
        dest.mkdir()
        members = list(iter_members(io.BytesIO(out.getvalue()), dest, ExtractLimits()))
        assert [(m.path, m.size) for m in members] == [(name, 7)]
        assert (dest / name).read_bytes() == b"weights"


def test_member_bytes_and_digests_span_many_blocks(tmp_path: Path) -> None:
    import hashlib

    data = os.urandom(3 * 1024 * 1024 + 5)  # several write batches, an unaligned end
    seen: list[int] = []
    stream = io.BytesIO(tar_bytes(regular("a", b"first"), regular("model.onnx", data)))
    members = list(iter_members(stream, tmp_path, ExtractLimits(), on_bytes=seen.append))
    assert [m.sha256 for m in members] == [hashlib.sha256(b"first").hexdigest(),
                                           hashlib.sha256(data).hexdigest()]
    assert (tmp_path / "model.onnx").read_bytes() == data
    assert sum(seen) == len(data) + 5


def test_global_pax_header_is_refused(tmp_path: Path) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": "applies to every later member"}) as tar:
        info, data = regular("model.onnx")
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(UnsafeArchiveError, match="global pax header"):
        list(iter_members(io.BytesIO(out.getvalue()), tmp_path, ExtractLimits()))
    assert list(tmp_path.iterdir()) == []


def test_sparse_member_is_refused(tmp_path: Path) -> None:
    # tarfile calls a GNU sparse file "regular", but its archived bytes are not the file.
    info, _ = special("model.onnx", tarfile.GNUTYPE_SPARSE)
    with pytest.raises(UnsafeArchiveError, match="not a regular file"):
        list(iter_members(io.BytesIO(tar_bytes((info, b""))), tmp_path, ExtractLimits()))
    assert list(tmp_path.iterdir()) == []


def test_huge_extended_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    info, data = regular("model.onnx")
    info.pax_headers = {"comment": "x" * 100_000}
    with pytest.raises(UnsafeArchiveError, match="headers exceed"):
        list(iter_members(io.BytesIO(tar_bytes((info, data))), tmp_path, ExtractLimits()))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("cut", "message"),
    [
        (512 + 100, "holds 100 bytes"),  # inside the member's bytes
        (512 + 2000, "unexpected end"),  # inside its padding to 512 bytes
        (512 + 2048 + 300, "ends inside a header"),  # inside the next header
    ],
)
def test_truncated_archive_is_refused(tmp_path: Path, cut: int, message: str) -> None:
    body = tar_bytes(regular("a", b"1" * 2000), regular("b", b"2"))
    with pytest.raises(UnsafeArchiveError, match=message):
        list(iter_members(io.BytesIO(body[:cut]), tmp_path, ExtractLimits()))


def test_empty_stream_is_not_a_tar(tmp_path: Path) -> None:
    with pytest.raises(UnsafeArchiveError, match="not a tar stream"):
        list(iter_members(io.BytesIO(b""), tmp_path, ExtractLimits()))
