"""Throughput of opening a sealed bundle against the crypto limit of this machine.

For each AEAD suite this script builds a large dummy model (random bytes named
``model.onnx``), seals it with ``seal_bundle`` and then measures, best of N
(the three measurements take turns in every round, so a burst of load on a
shared machine hits all of them alike):

* **open**: what a device does with a downloaded target, end to end:
  ``open_bundle`` called the way ``agent/update_cycle.py`` calls it, with the
  plaintext digest from the target's signed ``custom``: decrypt and
  authenticate each chunk, hash the plaintext, untar with the member checks,
  write, fsync and rename into place. The sealed sha256 (the TUF target hash)
  is not part of it: the device checks it while downloading, and the
  download's cost is not measured here.
* **limit**: the same crypto without any of the plumbing, on one thread: one
  sha256 over the same number of sealed bytes plus ``cryptography``'s AEAD
  ``decrypt`` of the same 64 KiB chunks, all ciphertexts prepared in memory
  beforehand (no I/O).
* **open, two digests**: ``open_bundle`` also hashing the sealed bytes
  against the TUF target hash in the same pass, as the server's release
  ingest (``server/services/releases.py``) calls it. Reported against the
  same limit, which makes it the figure this bench printed as "open" until
  2026-12 (the history below).

Rates are payload megabytes (10**6 bytes of model) per second, so the ratio
open/limit is the share of the machine's crypto speed the bundle path keeps.
The target is a ratio of at least 0.6. The sealed file is in the page cache
when it is opened (it was just written), which matches the limit (no I/O),
but ``open_bundle`` still writes and fsyncs the unpacked model. ``open_bundle``
hashes on threads of its own beside the decryption, so on several cores open
may pass the single-threaded limit.

Why open no longer hashes the sealed bytes (2026-12): the agent stopped
passing ``expected_sealed_sha256`` (commit d421976: its download has just
checked the target hash, and the AEAD tags and the signed plaintext digest
catch any change since), so "open with the TUF target hash" measured a second
sha256 pass no device makes at install time, against a limit that holds one.
Open and limit now do the same crypto (one sha256, one decrypt), so the
ratio is what the plumbing costs; the two-digest figure is still printed.

History. 2 vCPU Xeon VM (SHA-NI, AES-NI/VAES) shared with other people's test
runs; each figure is the best of 5 (x10: of 10) of one run, started when the
machine was >= 90 % idle (>= 97 % for 7a2b7e5); a range spans separate runs.
"open" as defined above (the agent's call), "2-dig" the two-digest open,
both against the same limit. The 0e772f8 rows ran that commit's protocol
code under this script; "old script" is the script before this change.

==============================  ===  ========  =========  =========  =========
run                             MiB  suite     open MB/s  ratio      2-dig
==============================  ===  ========  =========  =========  =========
0e772f8, as the brief saw it    128  chacha20                        0.51
0e772f8, as the brief saw it    128  aes-gcm                         0.39
0e772f8, old script, 2 runs     128  chacha20                        0.46-0.48
0e772f8, old script, 2 runs     128  aes-gcm                         0.36-0.37
0e772f8, 3 runs                 128  chacha20  429-436    0.46-0.48  0.42-0.47
0e772f8, 3 runs                 128  aes-gcm   452-488    0.40       0.27-0.37
0e772f8, 3 runs                 32   chacha20  406-420    0.43-0.45  0.44-0.46
0e772f8, 3 runs                 32   aes-gcm   459-482    0.38-0.39  0.34-0.35
9af39ab, 4 runs                 128  chacha20  986-1093   1.07-1.15  0.69-0.71
9af39ab, 4 runs                 128  aes-gcm   1102-1203  0.92-0.98  0.60-0.61
9af39ab, 2 runs                 32   chacha20  820-843    0.86-0.89  0.66-0.69
9af39ab, 2 runs                 32   aes-gcm   896-917    0.73-0.75  0.55-0.57
7a2b7e5, 2 runs, x10            128  chacha20  975-988    1.04-1.05  0.69
7a2b7e5, 2 runs, x10            128  aes-gcm   1095-1118  0.90-0.93  0.58
7a2b7e5, 2 runs, x10            32   chacha20  786-829    0.83-0.87  0.61-0.67
7a2b7e5, 2 runs, x10            32   aes-gcm   861-893    0.71-0.73  0.54-0.58
==============================  ===  ========  =========  =========  =========

The limit was 899-955 MB/s (ChaCha20) and 1123-1225 MB/s (AES-GCM) in those
runs. 9af39ab and 7a2b7e5 differ only in the order of the closing fsync and
the wait for the background flush: interleaved in one process they time the
same, so their rows differ by the machine's noise. The two-digest open has
two sha256s (~190 ms of CPU for 128 MiB) and a decrypt to spread over two
cores that other jobs also use, so it stays near 0.6 and drops first when
the machine is busy (runs taken under load ranged 0.39-1.03 for open and
0.22-0.74 for two digests). The 32 MiB ratios are lower because a fixed
~8-10 ms weighs more: the closing fsync of the model (~7 ms: the last
unflushed MiB and the flush in flight), threads, the manifest's and the
folders' fsyncs.

Where the time went, 128 MiB ChaCha20, the agent's call (direct timing with
``time.perf_counter`` around the pieces, best of 5; cProfile inflates the
pure-Python parts). Before: decrypt 55 ms and sha256 95 ms, both on the one
thread (the plaintext digest ran inline when it was the only stream to hash),
the read 18-28 ms, every byte copied two or three times more by
``io.BufferedReader`` and ``tarfile``'s stream buffer (~40 ms), the writes
30-45 ms, and the closing fsync 65 ms after the last chunk: ~300 ms in all.
After, ~135 ms: the decrypting thread reads (28 ms), decrypts (54 ms) into a
recycled 1 MiB buffer per 16 chunks, writes with ``os.writev`` straight from
those buffers (30 ms; ``archive`` frames the tar stream itself and leaves
only the headers to ``tarfile``) and spends ~15 ms in Python; the sha256
runs on a thread of its own fed 1 MiB at a time, and the model is flushed
every 8 MiB on another while it is written, so the closing fsync waits ~6 ms.
Both cores are then busy (~230 ms of CPU in ~135 ms), which is why writing
on one more thread gained nothing (tried: same best, worse medians). With
two digests the three CPU-bound streams (decrypt, two sha256s: ~340 ms of
CPU) share two cores, ~200 ms.

Usage::

    python bench/bundle_throughput.py [--size-mib 128] [--repeat 5] [--json]

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
    sealed: Path, key: bytes, out: Path, plaintext_sha256: str, sealed_sha256: str | None
) -> float:
    """Seconds for one ``open_bundle`` into the new folder ``out`` (removed afterwards)."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    open_bundle(
        sealed,
        key,
        out,
        expected_sealed_sha256=sealed_sha256,
        expected_plaintext_sha256=plaintext_sha256,
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
    cipher, chunks, aad, limit_sealed = _limit_inputs(suite, info.plaintext_size)
    out = folder / "opened"
    open_times: list[float] = []
    two_digest_times: list[float] = []
    limit_times: list[float] = []
    for _ in range(repeat):  # in turns, so that load on a shared machine hits all three
        open_times.append(_time_open(sealed, key, out, info.plaintext_sha256, None))
        if len(open_times) == 1 and _sha256_file(out / "model.onnx") != manifest.model.sha256:
            raise SystemExit("opened model does not match the original")
        two_digest_times.append(
            _time_open(sealed, key, out, info.plaintext_sha256, info.sealed_sha256)
        )
        limit_times.append(_time_limit(cipher, chunks, aad))
    shutil.rmtree(out)
    del chunks

    model_mb = manifest.model.size / 1e6
    open_rate = model_mb / min(open_times)
    two_digest_rate = model_mb / min(two_digest_times)
    limit_rate = model_mb / min(limit_times)
    ratio = open_rate / limit_rate
    result: dict[str, object] = {
        "suite": suite.value,
        "size_mib": size_mib,
        "cpus": len(os.sched_getaffinity(0)),
        "sealed_bytes": info.sealed_size,
        "limit_sealed_bytes": limit_sealed,
        "seal_mb_s": round(model_mb / min(seal_times), 1),
        "open_mb_s": round(open_rate, 1),
        "limit_mb_s": round(limit_rate, 1),
        "ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "verdict": "PASS" if ratio >= TARGET_RATIO else "BELOW",
        "two_digest_open_mb_s": round(two_digest_rate, 1),
        "two_digest_ratio": round(two_digest_rate / limit_rate, 3),
        "open_s": [round(t, 3) for t in open_times],
        "two_digest_open_s": [round(t, 3) for t in two_digest_times],
        "limit_s": [round(t, 3) for t in limit_times],
        "seal_s": [round(t, 3) for t in seal_times],
        "sealed_page_cache_share": None if cached is None else round(cached, 3),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=128, help="model size (default 128)")
    parser.add_argument("--repeat", type=int, default=5, help="best of N (default 5)")
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
        f"{'ratio':>6} {'target':>7} {'verdict':>7} {'2-dig MB/s':>11} {'2-dig':>6} "
        f"{'seal MB/s':>10}"
    )
    print()
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['suite']:<18} {r['size_mib']:>5} {r['open_mb_s']:>10} {r['limit_mb_s']:>11} "
            f"{r['ratio']:>6.2f} {'>=' + str(TARGET_RATIO):>7} {r['verdict']:>7} "
            f"{r['two_digest_open_mb_s']:>11} {r['two_digest_ratio']:>6.2f} "
            f"{r['seal_mb_s']:>10}"
        )
    print()
    for r in results:
        share = r["sealed_page_cache_share"]
        state = "unknown" if not isinstance(share, float) else f"{100 * share:.0f}% resident"
        print(f"sealed file of {r['suite']} in page cache before open: {state}")
    print(
        f"{results[0]['cpus'] if results else '?'} CPUs. open = open_bundle as the agent calls "
        "it (signed plaintext sha256; decrypt, untar, fsync) from the page cache; "
        "limit = one sha256 + AEAD decrypt of the same chunks in memory, one thread; "
        "2-dig = open_bundle also checking the sealed sha256 (TUF target hash), as the "
        "server's release ingest does, against the same limit. MB = 10**6 model bytes."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
