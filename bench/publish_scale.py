"""Publishing and director re-signing cost, and per-device download, as the fleet grows.

For each combination of D enrolled devices (10, 1 000, 10 000) and M model
targets (10, 1 000) -- ``--quick``: D in (10, 100), M in (10, 100) -- this
script builds both TUF repositories in a temp folder exactly as ``edgeota
init`` does (``ImageRepository.initialise`` and ``DirectorRepository.initialise``
with Ed25519 file keys, ``--bin-bits`` hash bins, 8 by default), publishes M
small random target files (``put_target``, then ``add_target_to_bin`` +
``sign`` with the release key + ``publish_bin``; by default all the targets of
one bin go into one bin version, ``--unbatched`` publishes them one by one,
which leaves the metadata history of one-by-one releases: publish time grows
with the number of metadata files in ``image/metadata``, see below),
enrols D devices (``ensure_device``) and assigns each one of those targets with
a ``DirectorTargetCustom`` carrying a 100-byte wrapped key. One device then
runs a complete update cycle with two unmodified ``tuf.ngclient.Updater``
(image and its director repository, served from the store through
``RepoStore.file_for_request`` by a counting fetcher): that is its warm cache.
Then it measures:

* **publish**: one more release, as the operator's machine and the server do
  it: read the current bin, ``add_target_to_bin``, ``sign`` (release key),
  ``check_bin_update`` and ``publish_bin`` (new bin, snapshot and timestamp
  versions, written with fsync). Median of ``--repeat`` releases, each a new
  bin version. Reference: signing the same new bin, snapshot and timestamp
  ``Metadata`` objects with the same signers in memory (canonical JSON +
  Ed25519, no I/O).
* **director re-sign**: ``DirectorRepository.assign`` of the last new release
  to all D devices, one after the other as a deployment does (the per-device
  ``TargetFile`` with its wrapped key is built beforehand). Reference: signing
  the three new metadata objects (targets, snapshot, timestamp) of each device
  in memory with the director key, no I/O.
* **bytes per update cycle**: after the release is published and assigned,
  the warm device refreshes both repositories and looks up the new target in
  both (a complete cycle; the bundle itself is not downloaded). Every byte the
  fetchers hand to ngclient is counted, split into image and director. For
  information also the bytes of an idle cycle (nothing new) and of a cold
  start (empty cache, bootstrap roots only).

Verdicts, computed from the figures: the bytes of a cycle at the largest D
over those at the smallest D (same M) should be about 1.0 (at most
``DEVICE_TOLERANCE``); at the largest M over the smallest M (same D) at most
log(M_max)/log(M_min) (3.0 for 1 000 vs 10): logarithmic growth or better.

The director repository does not depend on M (it names the same target paths,
whose files are generated deterministically), so for each D it is built once
and serves every M: for each M the image repository is removed and initialised
again in the same store and the device starts from an empty cache. Setup runs
on ``--setup-workers`` threads and ends with ``os.sync()`` (so that writeback of
the setup's files stays out of the timings); everything measured runs on one
thread. All writes go through the store as in production, with fsync, so the
timings depend on the disk under ``--dir``.

Publish time does not depend on D, but on how many metadata versions the
image folder holds: ``RepoStore.latest_version`` lists the whole folder on
each call. The batched setup writes about 2**bin_bits + 3 * (bins touched)
files; a repository with thousands of one-by-one releases is slower.

Usage::

    python bench/publish_scale.py [--quick] [--bin-bits 8] [--repeat 7] [--json]

Exits 0 whatever the result: it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from securesystemslib.signer import Signer
from tuf.api.exceptions import DownloadHTTPError
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.ngclient import FetcherInterface, Updater

from edgeota.protocol.manifest import TensorSpec
from edgeota.protocol.targets_custom import (
    DirectorTargetCustom,
    ImageTargetCustom,
    target_path_for,
)
from edgeota.server.keystore import KeyAlgorithm, generate_file_key, load_signer
from edgeota.server.repo.director import DirectorRepository
from edgeota.server.repo.image import (
    ImageRepository,
    add_target_to_bin,
    bin_for,
    sign,
    utc_now,
)
from edgeota.server.repo.storage import IMAGE, RepoFileNotFoundError, RepoStore

FULL_DEVICES = (10, 1000, 10000)
FULL_MODELS = (10, 1000)
QUICK_DEVICES = (10, 100)
QUICK_MODELS = (10, 100)
DEVICE_TOLERANCE = 1.05  # "does not grow": version numbers may gain a digit
BIN_VALIDITY = timedelta(days=365)  # what the publisher signs bins for
TARGET_SIZE = 2048  # bytes of each (random) target file
WRAPPED_KEY_SIZE = 100  # bytes, about an HPKE-wrapped 32-byte content key
HARDWARE = "rpi4"
BASE = "http://repo.bench/"
WARM_DEVICE_INDEX = 0
REFERENCE_SAMPLE = 64  # devices whose metadata the director signing reference re-signs


def device_id(index: int) -> str:
    return f"dev-{index:05d}"


def model_name(index: int) -> str:
    return f"model-{index:05d}"


# -- the device side -------------------------------------------------------------


class CountingFetcher(FetcherInterface):
    """Serves ``BASE/{repository path}`` from the store and counts what it hands out."""

    def __init__(self, store: RepoStore) -> None:
        self.store = store
        self.files: list[tuple[str, int]] = []
        self.misses = 0

    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith(BASE):
            raise DownloadHTTPError(f"unknown host in {url}", 404)
        request = unquote(url[len(BASE):])
        try:
            path = self.store.file_for_request(request)
        except RepoFileNotFoundError as e:
            self.misses += 1  # e.g. the probe for the next root version
            raise DownloadHTTPError(str(e), 404) from e
        data = path.read_bytes()
        self.files.append((request.rsplit("/", 1)[-1], len(data)))
        return iter([data])

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.files)


@dataclass
class Cycle:
    """What one update cycle of one device downloaded."""

    image_bytes: int
    director_bytes: int
    image_files: list[tuple[str, int]]
    director_files: list[tuple[str, int]]
    requests_404: int

    @property
    def total(self) -> int:
        return self.image_bytes + self.director_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_bytes": self.image_bytes,
            "director_bytes": self.director_bytes,
            "total_bytes": self.total,
            "image_files": [f"{name}:{size}" for name, size in self.image_files],
            "director_files": [f"{name}:{size}" for name, size in self.director_files],
            "requests_404": self.requests_404,
        }


def update_cycle(
    store: RepoStore, cache: Path, device: str, image_root: bytes, director_root: bytes,
    target: TargetFile,
) -> Cycle:
    """One agent cycle: new Updaters on the device's cache, refresh both, look up ``target``."""
    image_dir = cache / "image"
    director_dir = cache / "director"
    image_dir.mkdir(parents=True, exist_ok=True)
    director_dir.mkdir(parents=True, exist_ok=True)
    image_fetcher = CountingFetcher(store)
    director_fetcher = CountingFetcher(store)
    director = Updater(
        metadata_dir=str(director_dir),
        metadata_base_url=f"{BASE}director/{device}/metadata/",
        fetcher=director_fetcher,
        bootstrap=director_root,
    )
    image = Updater(
        metadata_dir=str(image_dir),
        metadata_base_url=f"{BASE}{IMAGE}/metadata/",
        target_dir=str(cache / "targets"),
        target_base_url=f"{BASE}{IMAGE}/targets/",
        fetcher=image_fetcher,
        bootstrap=image_root,
    )
    director.refresh()
    image.refresh()
    from_director = director.get_targetinfo(target.path)
    from_image = image.get_targetinfo(target.path)
    for repo, info in (("director", from_director), ("image", from_image)):
        if info is None or (info.length, info.hashes) != (target.length, target.hashes):
            raise SystemExit(f"{device}: the {repo} repository does not name {target.path}")
    return Cycle(
        image_bytes=image_fetcher.bytes,
        director_bytes=director_fetcher.bytes,
        image_files=image_fetcher.files,
        director_files=director_fetcher.files,
        requests_404=image_fetcher.misses + director_fetcher.misses,
    )


# -- keys and repositories -----------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    image_root: Signer
    director_root: Signer
    release: Signer
    snapshot: Signer
    timestamp: Signer
    director: Signer


def make_keys(folder: Path) -> Keys:
    """Ed25519 file keys, generated and loaded the way ``edgeota init`` does."""

    def make(name: str) -> Signer:
        key = generate_file_key(folder, name, KeyAlgorithm.ED25519)
        return load_signer(key.uri, key.public_key)

    return Keys(
        image_root=make("image-root-1"),
        director_root=make("director-root-1"),
        release=make("release-1"),
        snapshot=make("image-snapshot"),
        timestamp=make("image-timestamp"),
        director=make("director"),
    )


def new_image(store: RepoStore, keys: Keys, bin_bits: int) -> ImageRepository:
    return ImageRepository.initialise(
        store,
        root_signers=[keys.image_root],
        root_threshold=1,
        release_signers=[keys.release],
        release_threshold=1,
        snapshot_signer=keys.snapshot,
        timestamp_signer=keys.timestamp,
        bin_bits=bin_bits,
    )


def new_director(store: RepoStore, keys: Keys) -> DirectorRepository:
    return DirectorRepository.initialise(
        store,
        root_signers=[keys.director_root],
        root_threshold=1,
        online_public_key=keys.director.public_key,
        online_signer=keys.director,
    )


def upload(store: RepoStore, scratch: Path, name: str, version: str, counter: int) -> TargetFile:
    """Store a small random target (the same bytes for the same release) with its image custom."""
    data = random.Random(f"{name}@{version}").randbytes(TARGET_SIZE)
    source = scratch / f"{name}-{version}.eotb"
    source.write_bytes(data)
    path = target_path_for(name, version)
    stored = store.put_target(path, source)
    source.unlink()
    custom = ImageTargetCustom(
        name=name,
        version=version,
        hardware=(HARDWARE,),
        release_counter=counter,
        plaintext_sha256=hashlib.sha256(b"plaintext of " + data).hexdigest(),
        plaintext_size=4 * TARGET_SIZE,
        inputs=(TensorSpec("input", "FP32", (None, 64)),),
        outputs=(TensorSpec("label", "INT64", (None,)),),
    ).to_custom()
    return TargetFile(stored.length, stored.hashes, path, {"custom": custom})


def populate_image(
    image: ImageRepository, store: RepoStore, release: Signer, scratch: Path, models: int,
    *, batched: bool, workers: int,
) -> list[TargetFile]:
    """Publish ``models`` targets (version 1.0.0 of model-00000...); return them in order."""
    with ThreadPoolExecutor(workers) as pool:
        targets = list(pool.map(
            lambda i: upload(store, scratch, model_name(i), "1.0.0", 1), range(models)))
    expires = utc_now() + BIN_VALIDITY
    top = image.current("targets")
    if not batched:
        for target in targets:
            role = bin_for(top, target.path)
            new = add_target_to_bin(image.current(role), target.path, target, expires=expires)
            sign(new, release)
            image.publish_bin(new.to_bytes(), role=role)
        return targets
    by_bin: dict[str, list[TargetFile]] = {}
    for target in targets:
        by_bin.setdefault(bin_for(top, target.path), []).append(target)
    for role, group in sorted(by_bin.items()):
        current = image.current(role)
        new = current
        for target in group:  # each call is one version further: put it back to current + 1
            new = add_target_to_bin(new, target.path, target, expires=expires)
        new.signed.version = current.signed.version + 1
        sign(new, release)
        image.publish_bin(new.to_bytes(), role=role)
    return targets


def director_target(device: str, target: TargetFile, counter: int) -> TargetFile:
    custom = DirectorTargetCustom(
        device_id=device,
        hardware_id=HARDWARE,
        release_counter=counter,
        wrapped_key=os.urandom(WRAPPED_KEY_SIZE),
    ).to_custom()
    return TargetFile(target.length, dict(target.hashes), target.path, {"custom": custom})


def enrol(director: DirectorRepository, devices: int, initial: Sequence[TargetFile],
          workers: int) -> None:
    """``ensure_device`` each device and assign it one existing target (device i: i mod len)."""

    def one(index: int) -> None:
        device = device_id(index)
        director.ensure_device(device)
        target = initial[index % len(initial)]
        director.assign(device, {target.path: director_target(device, target, 1)})

    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(one, range(devices)):
            pass


# -- measurements ------------------------------------------------------------------------


def _timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


@dataclass
class PublishTimes:
    publish_s: list[float] = field(default_factory=list)
    signing_s: list[float] = field(default_factory=list)
    released: list[TargetFile] = field(default_factory=list)


def measure_publish(
    image: ImageRepository, store: RepoStore, keys: Keys, scratch: Path, name: str, repeat: int,
) -> PublishTimes:
    """Publish ``repeat`` new versions of ``name``; time each against signing-only."""
    result = PublishTimes()
    for r in range(repeat):
        target = upload(store, scratch, name, f"2.0.{r}", 2 + r)  # the upload is not timed
        holder: dict[str, bytes] = {}

        def publish(target: TargetFile = target, holder: dict[str, bytes] = holder) -> None:
            role = bin_for(image.current("targets"), target.path)
            new = add_target_to_bin(image.current(role), target.path, target,
                                    expires=utc_now() + BIN_VALIDITY)
            sign(new, keys.release)
            data = new.to_bytes()
            if not image.check_bin_update(data).complete:
                raise SystemExit("the new bin is not fully signed")
            image.publish_bin(data)
            holder["bin"] = data

        result.publish_s.append(_timed(publish))
        result.released.append(target)
        signing_jobs = [
            (Metadata[Targets].from_bytes(holder["bin"]), keys.release),
            (image.current("snapshot"), keys.snapshot),
            (image.current("timestamp"), keys.timestamp),
        ]

        def sign_only(jobs: list[tuple[Metadata[Any], Signer]] = signing_jobs) -> None:
            for md, signer in jobs:
                md.signatures.clear()
                sign(md, signer)

        result.signing_s.append(_timed(sign_only))
    return result


def measure_director(
    director: DirectorRepository, store: RepoStore, keys: Keys, devices: int, new: TargetFile,
    counter: int, initial: Sequence[TargetFile],
) -> tuple[float, float]:
    """Assign ``new`` to every device (as a deployment of it would); return (assign, sign-only) s.

    Like ``deploy``, each device keeps its targets of other models and gets ``new``
    in place of any other version of the same model.
    """
    new_model = new.path.split("/")[1]
    wanted: list[tuple[str, dict[str, TargetFile]]] = []
    for index in range(devices):
        device = device_id(index)
        targets = {new.path: director_target(device, new, counter)}
        old = initial[index % len(initial)]
        if old.path.split("/")[1] != new_model:
            targets[old.path] = director_target(device, old, 1)
        wanted.append((device, targets))

    def assign_all() -> None:
        for device, targets in wanted:
            director.assign(device, targets)

    assign_s = _timed(assign_all)

    step = max(1, devices // REFERENCE_SAMPLE)
    sample = [
        [Metadata.from_bytes(store.read_metadata(f"director/{device}", role))
         for role in ("targets", "snapshot", "timestamp")]
        for device, _ in wanted[::step]
    ]

    def sign_only() -> None:
        for index in range(devices):
            for md in sample[index % len(sample)]:
                md.signatures.clear()
                sign(md, keys.director)

    return assign_s, _timed(sign_only)


# -- one combination ---------------------------------------------------------------------


def run_models_pass(
    store: RepoStore, director: DirectorRepository, keys: Keys, work: Path, devices: int,
    models: int, initial: Sequence[TargetFile], args: argparse.Namespace,
) -> dict[str, Any]:
    """Fresh image repository with ``models`` targets against the director of ``devices``."""
    image_dir = store.root / IMAGE
    if image_dir.exists():
        shutil.rmtree(image_dir)
    scratch = work / "scratch"
    scratch.mkdir(exist_ok=True)
    clients = work / f"clients-m{models}"

    start = time.perf_counter()
    image = new_image(store, keys, args.bin_bits)
    populated = populate_image(image, store, keys.release, scratch, models,
                               batched=not args.unbatched, workers=args.setup_workers)
    if populated[: len(initial)] != list(initial):
        raise SystemExit("the initial targets differ between image repositories")
    setup_image_s = time.perf_counter() - start

    # Setup left thousands of freshly written files for the kernel to flush; flush them now
    # so that background writeback does not land in the timings below.
    os.sync()
    warm = device_id(WARM_DEVICE_INDEX)
    image_root, director_root = image.root_bytes(1), director.root_bytes(1)
    # An earlier pass assigned this device a release the new image repository does not
    # hold yet: give it back its initial target before its first cycle (not measured).
    first = initial[WARM_DEVICE_INDEX % len(initial)]
    director.assign(warm, {first.path: director_target(warm, first, 1)})
    update_cycle(store, clients / "warm", warm, image_root, director_root, first)
    idle = update_cycle(store, clients / "warm", warm, image_root, director_root, first)

    publish = measure_publish(image, store, keys, scratch, model_name(WARM_DEVICE_INDEX),
                              args.repeat)
    new = publish.released[-1]
    counter = 1 + len(publish.released)
    assign_s, director_sign_s = measure_director(director, store, keys, devices, new, counter,
                                                 initial)

    cycle = update_cycle(store, clients / "warm", warm, image_root, director_root, new)
    cold = update_cycle(store, clients / "cold", warm, image_root, director_root, new)
    snapshot_bytes = len(store.read_metadata(IMAGE, "snapshot"))
    top = image.current("targets")
    new_bin = bin_for(top, new.path)
    assert top.signed.delegations is not None and top.signed.delegations.succinct_roles
    bin_sizes = [len(store.read_metadata(IMAGE, role))
                 for role in top.signed.delegations.succinct_roles.get_roles()]

    publish_ms = statistics.median(publish.publish_s) * 1e3
    publish_sign_ms = statistics.median(publish.signing_s) * 1e3
    return {
        "devices": devices,
        "models": models,
        "bin_bits": args.bin_bits,
        "publish_ms": round(publish_ms, 2),
        "publish_min_ms": round(min(publish.publish_s) * 1e3, 2),
        "publish_signing_ms": round(publish_sign_ms, 3),
        "publish_ratio": round(publish_ms / publish_sign_ms, 1),
        "publish_all_ms": [round(t * 1e3, 2) for t in publish.publish_s],
        "director_assign_s": round(assign_s, 3),
        "director_per_device_ms": round(assign_s / devices * 1e3, 3),
        "director_signing_s": round(director_sign_s, 3),
        "director_signing_per_device_ms": round(director_sign_s / devices * 1e3, 3),
        "director_ratio": round(assign_s / director_sign_s, 1),
        "cycle": cycle.to_dict(),
        "idle_cycle": idle.to_dict(),
        "cold_start": cold.to_dict(),
        "snapshot_bytes": snapshot_bytes,
        "new_bin": new_bin,
        "new_bin_bytes": len(store.read_metadata(IMAGE, new_bin)),
        "bin_bytes_mean": round(statistics.mean(bin_sizes)),
        "bin_bytes_max": max(bin_sizes),
        "image_metadata_files": len(list((store.root / IMAGE / "metadata").iterdir())),
        "setup_image_s": round(setup_image_s, 2),
    }


def run_devices(
    keys: Keys, work: Path, devices: int, model_counts: Sequence[int],
    args: argparse.Namespace, say: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Build the director for ``devices`` once and measure it against each image size."""
    folder = work / f"d{devices}"
    folder.mkdir()
    store = RepoStore(folder / "blobs")
    director = new_director(store, keys)
    # The initial assignments name targets every image repository holds (model-0..).
    scratch = folder / "scratch"
    scratch.mkdir()
    image = new_image(store, keys, args.bin_bits)
    initial = populate_image(image, store, keys.release, scratch, min(model_counts),
                             batched=not args.unbatched, workers=args.setup_workers)
    start = time.perf_counter()
    enrol(director, devices, initial, args.setup_workers)
    enrol_s = time.perf_counter() - start
    say(f"    enrolled {devices} devices in {enrol_s:.1f} s (setup, "
        f"{args.setup_workers} threads)")
    results = []
    for models in model_counts:
        say(f"... D={devices} M={models}")
        start = time.perf_counter()
        result = run_models_pass(store, director, keys, folder, devices, models, initial, args)
        result["setup_enrol_s"] = round(enrol_s, 2)
        result["pass_s"] = round(time.perf_counter() - start, 2)
        say(f"    publish {result['publish_ms']:.1f} ms, assign {result['director_assign_s']:.2f}"
            f" s, cycle {result['cycle']['total_bytes']} B ({result['pass_s']:.1f} s)")
        results.append(result)
    shutil.rmtree(folder)
    return results


# -- verdicts and output ---------------------------------------------------------------


def verdicts(results: list[dict[str, Any]]) -> dict[str, Any]:
    by = {(r["devices"], r["models"]): r for r in results}
    ds = sorted({r["devices"] for r in results})
    ms = sorted({r["models"] for r in results})
    d_lo, d_hi, m_lo, m_hi = ds[0], ds[-1], ms[0], ms[-1]

    def total(d: int, m: int) -> int:
        return by[d, m]["cycle"]["total_bytes"]

    per_devices = []
    for m in ms:
        ratio = total(d_hi, m) / total(d_lo, m)
        per_devices.append({
            "models": m, "devices": [d_lo, d_hi], "bytes": [total(d_lo, m), total(d_hi, m)],
            "ratio": round(ratio, 3), "limit": DEVICE_TOLERANCE,
            "verdict": "PASS" if ratio <= DEVICE_TOLERANCE else "GROWS",
            "publish_ms": [by[d_lo, m]["publish_ms"], by[d_hi, m]["publish_ms"]],
            "director_per_device_ms": [by[d_lo, m]["director_per_device_ms"],
                                       by[d_hi, m]["director_per_device_ms"]],
        })
    bound = math.log(m_hi) / math.log(m_lo)
    per_models = []
    for d in ds:
        ratio = total(d, m_hi) / total(d, m_lo)
        image_ratio = by[d, m_hi]["cycle"]["image_bytes"] / by[d, m_lo]["cycle"]["image_bytes"]
        per_models.append({
            "devices": d, "models": [m_lo, m_hi], "bytes": [total(d, m_lo), total(d, m_hi)],
            "ratio": round(ratio, 3), "image_ratio": round(image_ratio, 3),
            "limit": round(bound, 3), "verdict": "PASS" if ratio <= bound else "FASTER THAN LOG",
            "publish_ms": [by[d, m_lo]["publish_ms"], by[d, m_hi]["publish_ms"]],
        })
    return {"devices": per_devices, "models": per_models}


def print_table(results: list[dict[str, Any]], verdict: dict[str, Any]) -> None:
    header = (
        f"{'D':>6} {'M':>5} | {'publish ms':>10} {'(min)':>6} {'x sign':>7} | {'re-sign s':>9} "
        f"{'ms/dev':>7} {'x sign':>7} | {'image B':>8} {'dir. B':>7} {'total B':>8} | "
        f"{'idle B':>6} {'cold B':>7}"
    )
    print()
    print(header)
    print("-" * len(header))
    for r in results:
        c = r["cycle"]
        print(
            f"{r['devices']:>6} {r['models']:>5} | {r['publish_ms']:>10.1f} "
            f"{r['publish_min_ms']:>6.1f} {r['publish_ratio']:>7.1f} | "
            f"{r['director_assign_s']:>9.2f} "
            f"{r['director_per_device_ms']:>7.2f} {r['director_ratio']:>7.1f} | "
            f"{c['image_bytes']:>8} {c['director_bytes']:>7} {c['total_bytes']:>8} | "
            f"{r['idle_cycle']['total_bytes']:>6} {r['cold_start']['total_bytes']:>7}"
        )
    print()
    print("bytes per update cycle vs devices (same M), target ratio about 1.0 "
          f"(<= {DEVICE_TOLERANCE}):")
    for v in verdict["devices"]:
        print(f"  M={v['models']:>5}: D={v['devices'][1]} / D={v['devices'][0]}: "
              f"{v['bytes'][1]} / {v['bytes'][0]} B = {v['ratio']:.3f}  {v['verdict']}   "
              f"(publish {v['publish_ms'][0]:.1f} -> {v['publish_ms'][1]:.1f} ms, re-sign "
              f"{v['director_per_device_ms'][0]:.2f} -> {v['director_per_device_ms'][1]:.2f} "
              "ms/device)")
    print("bytes per update cycle vs models (same D), limit log(M_max)/log(M_min):")
    for v in verdict["models"]:
        print(f"  D={v['devices']:>5}: M={v['models'][1]} / M={v['models'][0]}: "
              f"{v['bytes'][1]} / {v['bytes'][0]} B = {v['ratio']:.3f} <= {v['limit']:.2f}  "
              f"{v['verdict']}   (image part x{v['image_ratio']:.2f}; publish "
              f"{v['publish_ms'][0]:.1f} -> {v['publish_ms'][1]:.1f} ms)")
    seen: set[int] = set()
    for r in results:
        if r["models"] in seen:
            continue
        seen.add(r["models"])
        print(f"  M={r['models']:>5}: snapshot {r['snapshot_bytes']} B (one entry per bin, "
              f"2**{r['bin_bits']} bins), bins mean {r['bin_bytes_mean']} B / max "
              f"{r['bin_bytes_max']} B, the new release's bin {r['new_bin_bytes']} B")
    print()
    print(
        "publish = current bin + add_target_to_bin + sign + check_bin_update + publish_bin "
        "(median and min); re-sign = assign of the new release to all D devices, one by one; "
        "x sign = time over signing the same metadata in memory (bin+snapshot+timestamp, "
        "or 3 per device). Bytes: metadata a warm device fetches from both repositories "
        "for one new release (idle: nothing new; cold: empty cache)."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"D in {QUICK_DEVICES}, M in {QUICK_MODELS} instead of "
                             f"{FULL_DEVICES}, {FULL_MODELS}")
    parser.add_argument("--bin-bits", type=int, default=8, help="hash bins = 2**N (default 8)")
    parser.add_argument("--repeat", type=int, default=7,
                        help="releases published per combination, median taken (default 7)")
    parser.add_argument("--unbatched", action="store_true",
                        help="publish the M setup targets one bin version each (slower setup)")
    parser.add_argument("--setup-workers", type=int, default=4,
                        help="threads for setup only (default 4)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: /tmp)")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.setup_workers < 1:
        parser.error("--repeat and --setup-workers must be at least 1")
    if not 1 <= args.bin_bits <= 14:
        parser.error("--bin-bits must be between 1 and 14")
    device_counts = QUICK_DEVICES if args.quick else FULL_DEVICES
    model_counts = QUICK_MODELS if args.quick else FULL_MODELS

    def say(message: str) -> None:
        if not args.json:
            print(message, flush=True)

    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgeota-bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        keys = make_keys(work / "keys")
        for devices in device_counts:
            results.extend(run_devices(keys, work, devices, model_counts, args, say))
    results.sort(key=lambda r: (r["devices"], r["models"]))
    verdict = verdicts(results)
    elapsed = time.perf_counter() - started

    if args.json:
        print(json.dumps({
            "devices": list(device_counts), "models": list(model_counts),
            "bin_bits": args.bin_bits, "repeat": args.repeat, "batched": not args.unbatched,
            "device_tolerance": DEVICE_TOLERANCE, "results": results, "verdicts": verdict,
            "elapsed_s": round(elapsed, 1),
        }, indent=2))
        return 0
    print_table(results, verdict)
    print(f"total run time {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
