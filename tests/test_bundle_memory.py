"""A 256 MiB model seals and opens with peak RSS growth under 64 MiB.

Sealing and opening stream chunk by chunk, so memory must not grow with the
model. Each side runs in its own child process: ``ru_maxrss`` is a high-water
mark, and a fresh process keeps the test runner's (and the other side's)
allocations out of the figure. The child takes its baseline after imports,
after writing the payload (block by block, never held in memory) and after a
small warm-up seal and open, so the growth it reports is the big run's own.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MODEL_MIB = 256
LIMIT_MIB = 64

# Runs as ``python -c _CHILD <mode> <folder>``; prints one JSON line.
_CHILD = r"""
import hashlib, json, os, resource, sys
from pathlib import Path

from edgeota.protocol.bundle import describe_payload, generate_content_key, open_bundle, seal_bundle
from edgeota.protocol.manifest import Manifest, TensorSpec

MIB = 1024 * 1024
mode, folder, model_mib = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])


def peak_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def write_payload(path, mib):
    with path.open("wb") as out:
        for _ in range(mib):
            out.write(os.urandom(MIB))


def manifest_for(path):
    return Manifest(
        name="memory-test", version="1.0.0", model=describe_payload(path, "model.onnx"),
        opset=17, inputs=(TensorSpec("input", "FP32", (None, 64)),),
        outputs=(TensorSpec("output", "FP32", (None, 10)),), hardware=("bench",),
    )


def sha256_file(path):
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(MIB):
            digest.update(block)
    return digest.hexdigest()


after_imports = peak_kib()

# Warm-up: a small round trip touches every code path and buffer size once.
warm = folder / "warm"
warm.mkdir()
write_payload(warm / "model.onnx", 2)
warm_key = generate_content_key()
seal_bundle(manifest_for(warm / "model.onnx"), {"model.onnx": warm / "model.onnx"},
            warm / "bundle.eotb", warm_key)
open_bundle(warm / "bundle.eotb", warm_key, warm / "out")

if mode == "seal":
    model = folder / "model.onnx"
    write_payload(model, model_mib)
    manifest = manifest_for(model)
    key = generate_content_key()
    before = peak_kib()
    info = seal_bundle(manifest, {"model.onnx": model}, folder / "bundle.eotb", key)
    after = peak_kib()
    (folder / "key.hex").write_text(key.hex())
    result = {"model_sha256": manifest.model.sha256, "sealed_size": info.sealed_size}
else:
    key = bytes.fromhex((folder / "key.hex").read_text())
    before = peak_kib()
    opened = open_bundle(folder / "bundle.eotb", key, folder / "opened")
    after = peak_kib()
    result = {
        "model_sha256": sha256_file(opened.model_path),
        "manifest_sha256": opened.manifest.model.sha256,
        "model_size": opened.model_path.stat().st_size,
    }
result.update(imports_kib=after_imports, before_kib=before, after_kib=after)
result["growth_kib"] = after - before
print(json.dumps(result))
"""


def _run_child(mode: str, folder: Path) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(folder), str(MODEL_MIB)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, f"{mode} child failed:\n{done.stdout}\n{done.stderr}"
    figures: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


@pytest.mark.slow
def test_256_mib_model_seals_and_opens_in_bounded_memory(tmp_path: Path) -> None:
    folder = tmp_path / "big"
    folder.mkdir()
    try:
        sealed = _run_child("seal", folder)
        shutil.rmtree(folder / "warm")
        (folder / "model.onnx").unlink()  # the open side needs only the sealed file
        opened = _run_child("open", folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # ~768 MiB; don't leave it to tmp_path

    limit_kib = LIMIT_MIB * 1024
    for side, figures in (("seal", sealed), ("open", opened)):
        growth = figures["growth_kib"]
        assert isinstance(growth, int)
        assert growth < limit_kib, (
            f"{side} of a {MODEL_MIB} MiB model grew peak RSS by {growth / 1024:.1f} MiB "
            f"(from {figures['before_kib']} to {figures['after_kib']} KiB; "
            f"{figures['imports_kib']} KiB after imports), "
            f"limit {LIMIT_MIB} MiB"
        )
    assert opened["model_size"] == MODEL_MIB * 1024 * 1024
    assert opened["manifest_sha256"] == sealed["model_sha256"]
    assert opened["model_sha256"] == sealed["model_sha256"], "opened model differs from original"
    print(
        f"peak RSS growth for {MODEL_MIB} MiB: seal {sealed['growth_kib']} KiB, "
        f"open {opened['growth_kib']} KiB"
    )
