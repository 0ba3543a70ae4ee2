"""Throughput of opening a sealed bundle against the crypto limit of this machine.

For each AEAD suite this script builds a large dummy model (random bytes named
``model.onnx``), seals it with ``seal_bundle`` and then measures, best of N:

* **open**: what a device does with a downloaded target, end to end:
  ``open_bundle`` with the TUF target hash, which in one pass over the file
  verifies its sha256, decrypts and authenticates each chunk, hashes the
  plaintext, untars with per-file digests, fsyncs and renames into place.
* **limit**: the same work without any of the plumbing: sha256 over the same
  number of sealed bytes plus ``cryptography``'s AEAD ``decrypt`` of the same
  64 KiB chunks, all ciphertexts prepared in memory beforehand (no I/O).

Rates are payload megabytes (10**6 bytes of model) per second, so the ratio
open/limit is the share of the machine's crypto speed the bundle path keeps.
The target is a ratio of at least 0.6. The sealed file is in the page cache
when it is opened (it was just written), which matches the limit (no I/O),
but ``open_bundle`` still writes and fsyncs the unpacked model.

Usage::

    python bench/bundle_throughput.py [--size-mib 128] [--repeat 3] [--json]

Exits 0 whatever the result: it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from edgeota.protocol.bundle import describe_payload, generate_content_key, open_bundle, seal_bundle
from edgeota.protocol.manifest import Manifest, TensorSpec
from edgeota.protocol.stream import DEFAULT_CHUNK_SIZE, HEADER_SIZE, AeadSuite

TARGET_RATIO = 0.6
_MIB = 1024 * 1024
_HASH_BLOCK = 1024 * 1024


def _write_payload(path: Path, size_mib: int) -> None:
    """Random bytes, written 1 MiB at a time (never the whole file in memory)."""
    with path.open("wb") as out:
        for _ in range(size_mib):
            out.write(os.urandom(_MIB))


def _manifest(payload: Path) -> Manifest:
    return Manifest(
        name="bench-model",
        version="1.0.0",
        model=describe_payload(payload, "model.onnx"),
        opset=17,
        inputs=(TensorSpec("input", "FP32", (None, 64)),),
        outputs=(TensorSpec("output", "FP32", (None, 10)),),
        hardware=("bench",),
    )


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _time_open(
    sealed: Path, key: bytes, out: Path, expected_sha256: str, expected_plaintext: str
) -> float:
    start = time.perf_counter()
    # The TUF target hash is verified inside open_bundle, in the same pass as decryption.
    open_bundle(
        sealed,
        key,
        out,
        expected_sealed_sha256=expected_sha256,
        expected_plaintext_sha256=expected_plaintext,
    )
    return time.perf_counter() - start


def _limit_inputs(
    suite: AeadSuite, plaintext_size: int
) -> tuple[ChaCha20Poly1305 | AESGCM, list[tuple[bytes, bytes]], bytes, int]:
    """Ciphertext chunks of a bundle of ``plaintext_size`` bytes, sealed in memory."""
    key = os.urandom(32)
    cipher = ChaCha20Poly1305(key) if suite is AeadSuite.CHACHA20_POLY1305 else AESGCM(key)
    aad = os.urandom(HEADER_SIZE)
    prefix = os.urandom(7)
    # Plaintext content does not change AEAD cost; one random chunk is reused.
    block = os.urandom(DEFAULT_CHUNK_SIZE)
    count = max(1, -(-plaintext_size // DEFAULT_CHUNK_SIZE))
    chunks: list[tuple[bytes, bytes]] = []
    for index in range(count):
        last = index == count - 1
        size = plaintext_size - index * DEFAULT_CHUNK_SIZE if last else DEFAULT_CHUNK_SIZE
        nonce = prefix + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")
        chunks.append((nonce, cipher.encrypt(nonce, block[:size], aad)))
    sealed_bytes = HEADER_SIZE + sum(len(ct) for _, ct in chunks)
    return cipher, chunks, aad, sealed_bytes


def _time_limit(
    cipher: ChaCha20Poly1305 | AESGCM, chunks: list[tuple[bytes, bytes]], aad: bytes
) -> float:
    start = time.perf_counter()
    digest = hashlib.sha256(aad)  # the header bytes of the sealed file
    for nonce, sealed in chunks:
        digest.update(sealed)
        cipher.decrypt(nonce, sealed, aad)
    digest.hexdigest()
    return time.perf_counter() - start


def _page_cache_share(path: Path) -> float | None:
    """Share of ``path`` resident in the page cache, via util-linux ``fincore`` (if present)."""
    fincore = shutil.which("fincore")
    if fincore is None:
        return None
    try:
        done = subprocess.run(
            [fincore, "--bytes", "--noheadings", "--output", "RES", str(path)],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
        return int(done.stdout.split()[0]) / path.stat().st_size
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def bench_suite(suite: AeadSuite, size_mib: int, repeat: int, workdir: Path) -> dict[str, object]:
    folder = workdir / suite.value
    folder.mkdir()
    payload = folder / "model.onnx"
    _write_payload(payload, size_mib)
    manifest = _manifest(payload)
    key = generate_content_key()
    sealed = folder / "bundle.sealed"

    seal_times = []
    for _ in range(repeat):
        sealed.unlink(missing_ok=True)
        start = time.perf_counter()
        info = seal_bundle(manifest, {"model.onnx": payload}, sealed, key, suite=suite)
        seal_times.append(time.perf_counter() - start)
    payload.unlink()  # the open only needs the sealed file; keep the disk footprint small

    cached = _page_cache_share(sealed)
    out = folder / "opened"
    open_times = []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        open_times.append(_time_open(sealed, key, out, info.sealed_sha256, info.plaintext_sha256))
    if _sha256_file(out / "model.onnx") != manifest.model.sha256:
        raise SystemExit("opened model does not match the original")
    shutil.rmtree(out)

    cipher, chunks, aad, limit_sealed = _limit_inputs(suite, info.plaintext_size)
    limit_times = [_time_limit(cipher, chunks, aad) for _ in range(repeat)]
    del chunks

    model_mb = manifest.model.size / 1e6
    open_rate = model_mb / min(open_times)
    limit_rate = model_mb / min(limit_times)
    ratio = open_rate / limit_rate
    result: dict[str, object] = {
        "suite": suite.value,
        "size_mib": size_mib,
        "sealed_bytes": info.sealed_size,
        "limit_sealed_bytes": limit_sealed,
        "seal_mb_s": round(model_mb / min(seal_times), 1),
        "open_mb_s": round(open_rate, 1),
        "limit_mb_s": round(limit_rate, 1),
        "ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "verdict": "PASS" if ratio >= TARGET_RATIO else "BELOW",
        "open_s": [round(t, 3) for t in open_times],
        "limit_s": [round(t, 3) for t in limit_times],
        "seal_s": [round(t, 3) for t in seal_times],
        "sealed_page_cache_share": None if cached is None else round(cached, 3),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=128, help="model size (default 128)")
    parser.add_argument("--repeat", type=int, default=3, help="best of N (default 3)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead")
    parser.add_argument(
        "--suite",
        choices=[s.value for s in AeadSuite],
        action="append",
        help="only this suite (repeatable; default: all)",
    )
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: /tmp)")
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.repeat < 1:
        parser.error("--size-mib and --repeat must be at least 1")
    suites = [AeadSuite(s) for s in args.suite] if args.suite else list(AeadSuite)

    results = []
    with tempfile.TemporaryDirectory(prefix="edgeota-bench-", dir=args.dir) as tmp:
        for suite in suites:
            if not args.json:
                print(f"... {suite.value}: {args.size_mib} MiB, best of {args.repeat}", flush=True)
            results.append(bench_suite(suite, args.size_mib, args.repeat, Path(tmp)))

    if args.json:
        print(json.dumps({"target_ratio": TARGET_RATIO, "results": results}, indent=2))
        return 0
    header = (
        f"{'suite':<18} {'MiB':>5} {'open MB/s':>10} {'limit MB/s':>11} "
        f"{'ratio':>6} {'target':>7} {'verdict':>7} {'seal MB/s':>10}"
    )
    print()
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['suite']:<18} {r['size_mib']:>5} {r['open_mb_s']:>10} {r['limit_mb_s']:>11} "
            f"{r['ratio']:>6.2f} {'>=' + str(TARGET_RATIO):>7} {r['verdict']:>7} "
            f"{r['seal_mb_s']:>10}"
        )
    print()
    for r in results:
        share = r["sealed_page_cache_share"]
        state = "unknown" if share is None else f"{100 * share:.0f}% resident"
        print(f"sealed file of {r['suite']} in page cache before open: {state}")
    print(
        "open = open_bundle verifying the sealed sha256 and plaintext sha256 in one pass "
        "(decrypt, untar, fsync) from the page cache; "
        "limit = sha256 + AEAD decrypt of the same chunks in memory. MB = 10**6 model bytes."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
