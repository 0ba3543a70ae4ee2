"""Fuzz safe tar extraction: ``protocol.archive.iter_members`` (what ``open_bundle`` unpacks with).

Invariant: any tar stream either unpacks, member by member, into the fresh
folder it was given, or raises ``UnsafeArchiveError`` -- never another
exception (``tarfile`` itself only decodes each member's headers) -- and
whatever happens, nothing is written outside that folder, nothing but
regular files and folders appear in it (no links, devices or FIFOs), no
path is deeper than the limits allow, and a member that was yielded has
exactly the bytes and size it claimed.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import sys
from collections.abc import Mapping
from pathlib import Path

import fuzz_support

with fuzz_support.instrumented(__name__, "tarfile"):
    import tarfile  # here, to be instrumented: it decodes each member's headers

    from edgeota.protocol.archive import ExtractLimits, iter_members, write_member
    from edgeota.protocol.errors import UnsafeArchiveError

LIMITS = ExtractLimits()


def _check_tree(scratch: Path, dest: Path) -> None:
    for root, dirs, files in os.walk(scratch):
        for name in dirs + files:
            path = Path(root) / name
            mode = path.lstat().st_mode
            assert stat.S_ISREG(mode) or stat.S_ISDIR(mode), f"{path} is not a file or folder"
            if path != dest:
                rel = path.relative_to(dest)  # raises if anything appeared beside dest
                assert len(rel.parts) <= LIMITS.max_path_depth, f"{rel} is too deep"


def one_input(data: bytes) -> None:
    scratch = fuzz_support.scratch_dir()
    dest = scratch / "unpacked"
    dest.mkdir()
    try:
        try:
            for member in iter_members(io.BytesIO(data), dest, LIMITS):
                written = (dest / member.path).read_bytes()
                assert len(written) == member.size
                assert member.sha256 == hashlib.sha256(written).hexdigest()
        except UnsafeArchiveError:
            pass
        _check_tree(scratch, dest)
    finally:
        shutil.rmtree(scratch)


def _tar(members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w|", format=fmt) as tar:
        for name, payload in members:
            write_member(tar, name, io.BytesIO(payload), len(payload))
    return out.getvalue()


def seeds() -> Mapping[str, bytes]:
    """Tars as ``seal_bundle`` writes them: the manifest first, then the model and its data."""
    manifest = fuzz_support.sample_manifest("digits_v1", vectors=False)
    model = fuzz_support.sample_model_path("digits_v1").read_bytes()
    long_name = "weights/" + "w" * 120 + ".data"  # past ustar's 100 bytes: a pax header
    return {
        "bundle-digits_v1": _tar([("manifest.json", manifest.to_json()), ("model.onnx", model)]),
        "external-data": _tar([("manifest.json", b"{}"), ("model.onnx", model[:512]),
                               (long_name, bytes(range(256)) * 2)]),
        "gnu-empty-member": _tar([("manifest.json", b""), ("a/b/c.bin", b"x")],
                                 tarfile.GNU_FORMAT),
    }


HARNESS = fuzz_support.Harness(
    name="archive",
    one_input=one_input,
    seeds=seeds,
    max_len=32 * 1024,
)

if __name__ == "__main__":
    sys.exit(fuzz_support.main(HARNESS))
