"""Fuzz the sealed-bundle reader: ``open_bundle`` (header, STREAM chunks, tar, manifest, pins).

Two kinds of input, told apart by the bundle magic:

* ``EOTB...``: the sealed file itself, as a device downloads it. Flipped,
  cut, reordered or appended bytes exercise the header checks and the
  chunk authentication.
* anything else: a plaintext tar stream, which the harness seals with its
  content key (small chunks, several per input) before opening it. This is
  what a holder of the content key could send; it reaches the tar reader,
  the manifest parser and the checks of each member against the manifest,
  which tampered ciphertext never gets past authentication to.

Invariant: ``open_bundle`` either opens the bundle -- the destination holds
exactly the manifest and the files it pins -- or raises an ``EdgeotaError``
subclass (never another exception), and on a refusal nothing is left on
disk: no destination, no staging folder, no partial file.

The content key is a throwaway made from a fixed string, so the sealed seeds
open on every run without a key file in the repository.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import sys
from collections.abc import Mapping

import fuzz_support

with fuzz_support.instrumented(__name__, "tarfile"):
    import tarfile  # here, to be instrumented with the reader (seeds use it too)

    from edgeota.protocol.bundle import open_bundle, seal_bundle
    from edgeota.protocol.errors import EdgeotaError
    from edgeota.protocol.manifest import MANIFEST_PATH
    from edgeota.protocol.stream import MIN_CHUNK_SIZE, StreamSealer

CONTENT_KEY = hashlib.sha256(b"edgeota fuzz: throwaway content key").digest()
MAGIC = b"EOTB"


def _files(folder: os.PathLike[str]) -> set[str]:
    return {os.path.relpath(os.path.join(root, name), folder)
            for root, dirs, files in os.walk(folder) for name in dirs + files}


def one_input(data: bytes) -> None:
    scratch = fuzz_support.scratch_dir()
    try:
        src = scratch / "bundle.sealed"
        if data.startswith(MAGIC):
            src.write_bytes(data)
        else:
            with src.open("wb") as raw, StreamSealer(raw, CONTENT_KEY,
                                                     chunk_size=MIN_CHUNK_SIZE) as sealer:
                sealer.write(data)
        dest = scratch / "opened"
        try:
            opened = open_bundle(src, CONTENT_KEY, dest)
        except EdgeotaError:
            assert _files(scratch) == {"bundle.sealed"}, f"left behind: {_files(scratch)}"
            return
        pinned = {MANIFEST_PATH, *(f.path for f in opened.manifest.files)}
        on_disk = {p for p in _files(dest) if not (dest / p).is_dir()}
        assert on_disk == pinned, f"opened bundle holds {on_disk}, the manifest pins {pinned}"
        for f in opened.manifest.files:
            assert (dest / f.path).stat().st_size == f.size
    finally:
        shutil.rmtree(scratch)


def seeds() -> Mapping[str, bytes]:
    """The digits sample sealed as ``release publish`` seals it, and the tar inside it."""
    from edgeota.protocol.bundle import describe_payload

    scratch = fuzz_support.scratch_dir()
    try:
        model = fuzz_support.sample_model_path("digits_v1")
        manifest = fuzz_support.sample_manifest("digits_v1", vectors=False)
        assert manifest.model == describe_payload(model, "model.onnx")
        sealed = scratch / "digits.bundle"
        seal_bundle(manifest, {"model.onnx": model}, sealed, CONTENT_KEY,
                    chunk_size=MIN_CHUNK_SIZE)
        plain = io.BytesIO()
        opened = open_bundle(sealed, CONTENT_KEY, scratch / "opened")
        with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for name in (MANIFEST_PATH, "model.onnx"):
                tar.add(opened.folder / name, arcname=name)
        return {"sealed-digits_v1": sealed.read_bytes(), "plaintext-digits_v1": plain.getvalue()}
    finally:
        shutil.rmtree(scratch)


HARNESS = fuzz_support.Harness(
    name="bundle",
    one_input=one_input,
    seeds=seeds,
    max_len=32 * 1024,
)

if __name__ == "__main__":
    sys.exit(fuzz_support.main(HARNESS))
