"""How long ``deploy`` takes to hand one release to N devices, and when each one hears of it.

Issue 7's fleet bench spends a third of a 1 000-device rollout inside the
deploy call: every device's director metadata (targets, snapshot, timestamp)
is signed and written before the request returns. This script measures that
call alone, without a broker, agents or HTTP, so it can run on a shared
machine in seconds:

* an initialised home (``init_home``: real keys, SQLite, both repositories);
* N enrolled devices (``Device`` rows with real public identities, director
  metadata created by ``DirectorRepository.ensure_device``) -- set up on a few
  threads, then ``os.sync()`` so the setup's writeback stays out of the timing;
* one published release (a ``Release`` row whose content key is wrapped to the
  server's key-wrap key, as ``release publish`` leaves it; the bundle itself is
  never read by ``deploy``);
* ``deploy`` through :func:`edgeota.server.services.deployments.deploy` in one
  transaction, as the HTTP route calls it, with ``ctx.notify`` recording when
  each device is told. ``--deploys 2`` (the default) deploys a second release
  to the same devices: the path of every later rollout (supersede, replace the
  model's target).

Printed per deploy: seconds for the call (including the commit), per device,
first and last notification; and, as the same-run reference, the pure signing
cost of N director metadata sets (targets with the device's target, snapshot,
timestamp: canonical JSON + the director key, no file I/O), and the ratio.

Usage::

    python bench/deploy_scale.py [--devices 1000] [--deploys 2] [--profile] [--json]

Exits 0 whatever the result: it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import os
import pstats
import secrets
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tuf.api.metadata import Metadata, MetaFile, Snapshot, TargetFile, Targets, Timestamp

from edgeota.protocol.identity import SERVER_IDENTITY, DevicePublicIdentity
from edgeota.protocol.keywrap import KemPrivateKey, wrap_content_key
from edgeota.protocol.targets_custom import DirectorTargetCustom
from edgeota.server.config import load_server_config
from edgeota.server.context import ServerContext, load_key_signer
from edgeota.server.db.models import Device, Release, ReleaseStatus
from edgeota.server.home import HomeOptions, init_home
from edgeota.server.repo.image import sign
from edgeota.server.services import deployments
from edgeota.server.services.deployments import deploy
from edgeota.server.services.types import DeploymentRequest

HARDWARE = "rpi4"
MODEL = "bench"
BUNDLE_SIZE = 5 * 1024 * 1024  # bytes the director target names (never read)
SETUP_WORKERS = 4
REFERENCE_SAMPLE = 200  # devices whose reference signing is timed (scaled to N)


def device_id(index: int) -> str:
    return f"dev-{index:05d}"


@dataclass
class Notifications:
    """``ctx.notify`` for the bench: when each device was told, relative to ``start``."""

    start: float = 0.0
    at: dict[str, list[float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, device: str) -> None:
        elapsed = time.perf_counter() - self.start
        with self._lock:
            self.at.setdefault(device, []).append(elapsed)

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.at.clear()


def add_release(ctx: ServerContext, version: str, counter: int) -> None:
    content_key = secrets.token_bytes(32)
    wrapped = wrap_content_key(content_key, ctx.keywrap_key.public_key(), SERVER_IDENTITY)
    with ctx.sessions() as session, session.begin():
        session.add(Release(
            name=MODEL, version=version, release_counter=counter,
            target_path=f"models/{MODEL}/{version}.eotb", length=BUNDLE_SIZE,
            sha256=hashlib.sha256(version.encode()).hexdigest(),
            plaintext_sha256=hashlib.sha256(b"plain" + version.encode()).hexdigest(),
            plaintext_size=BUNDLE_SIZE, manifest={"hardware": [HARDWARE]},
            wrapped_content_key=wrapped, bin_role="bins-0", bin_version=counter,
            status=ReleaseStatus.PUBLISHED, created_by="bench",
            published_at=datetime.now(UTC)))


def enrol(ctx: ServerContext, count: int) -> list[str]:
    ids = [device_id(i) for i in range(count)]
    report_key = secrets.token_bytes(32)
    with ctx.sessions() as session, session.begin():
        for device in ids:
            identity = DevicePublicIdentity(device, KemPrivateKey.generate().public_key(),
                                            report_key)
            session.add(Device(id=device, hardware=HARDWARE, tags={"fleet": "bench"},
                               identity=identity.to_dict()))
    with ThreadPoolExecutor(SETUP_WORKERS) as pool:
        list(pool.map(ctx.director.ensure_device, ids))
    os.sync()
    return ids


def reference_signing(ctx: ServerContext, count: int) -> float:
    """Seconds to sign ``count`` director metadata sets in memory (sampled, scaled)."""
    signer = load_key_signer(ctx.config.director_key)
    kem = KemPrivateKey.generate().public_key()
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
    sample = min(count, REFERENCE_SAMPLE)
    started = time.perf_counter()
    for i in range(sample):
        device = device_id(i)
        custom = DirectorTargetCustom(device_id=device, hardware_id=HARDWARE, release_counter=1,
                                      wrapped_key=wrap_content_key(b"k" * 32, kem, device))
        target = TargetFile(BUNDLE_SIZE, {"sha256": "0" * 64}, f"models/{MODEL}/1.0.0.eotb",
                            unrecognized_fields={"custom": custom.to_custom()})
        targets = Metadata(Targets(version=2, expires=expires,
                                   targets={target.path: target}))
        sign(targets, signer)
        targets.to_bytes()
        snapshot = Metadata(Snapshot(version=2, expires=expires,
                                     meta={"targets.json": MetaFile(2)}))
        sign(snapshot, signer)
        snapshot_bytes = snapshot.to_bytes()
        timestamp = Metadata(Timestamp(version=2, expires=expires,
                                       snapshot_meta=MetaFile.from_data(2, snapshot_bytes,
                                                                        ["sha256"])))
        sign(timestamp, signer)
        timestamp.to_bytes()
    return (time.perf_counter() - started) * count / sample


def one_deploy(ctx: ServerContext, devices: list[str], version: str, told: Notifications,
               profile: bool) -> dict[str, Any]:
    request = DeploymentRequest(name=MODEL, version=version, tags={"fleet": "bench"})
    profiler = cProfile.Profile() if profile else None
    told.reset()
    if profiler is not None:
        profiler.enable()
    with ctx.sessions() as session, session.begin():
        response = deploy(ctx, session, "bench", request)
    seconds = time.perf_counter() - told.start
    if profiler is not None:
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(30)
        print(out.getvalue(), file=sys.stderr)
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(20)
        print(out.getvalue(), file=sys.stderr)
    times = sorted(t for ts in told.at.values() for t in ts)
    return {
        "release": f"{MODEL}@{version}",
        "devices": len(devices),
        "assigned": len(response.assigned),
        "seconds": seconds,
        "per_device_ms": 1000 * seconds / len(devices),
        "first_notify_s": times[0] if times else None,
        "last_notify_s": times[-1] if times else None,
        "notified": len(told.at),
        "notified_twice": sum(1 for ts in told.at.values() if len(ts) > 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000, help="enrolled devices (1000)")
    parser.add_argument("--deploys", type=int, default=2, choices=(1, 2, 3),
                        help="releases deployed one after the other to all devices (2)")
    parser.add_argument("--workers", type=int, default=None,
                        help="director threads (default: deployments.MAX_DIRECTOR_WORKERS; "
                             "1 = one device after the other)")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the last deploy (printed to stderr; the calling thread "
                             "only: use with --workers 1 to see the director work)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: /tmp)")
    args = parser.parse_args(argv)
    if args.workers is not None:
        deployments.MAX_DIRECTOR_WORKERS = args.workers

    scratch = Path(tempfile.mkdtemp(prefix="edgeota-deploy-", dir=args.dir))
    try:
        init_home(scratch / "home", HomeOptions(bin_bits=4))
        ctx = ServerContext.open(load_server_config(scratch / "home"))
        told = Notifications()
        ctx.notify = told
        try:
            setup = time.perf_counter()
            devices = enrol(ctx, args.devices)
            for n in range(args.deploys):
                add_release(ctx, f"{n + 1}.0.0", n + 1)
            os.sync()
            setup = time.perf_counter() - setup
            reference = reference_signing(ctx, args.devices)
            runs = [one_deploy(ctx, devices, f"{n + 1}.0.0", told,
                               args.profile and n == args.deploys - 1)
                    for n in range(args.deploys)]
        finally:
            ctx.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for run in runs:
        run["reference_s"] = reference
        run["ratio"] = run["seconds"] / reference
    workers = deployments.MAX_DIRECTOR_WORKERS
    summary = {"devices": args.devices, "setup_s": setup, "reference_s": reference,
               "cpus": os.cpu_count(), "workers": workers, "runs": runs}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{args.devices} devices, setup {setup:.1f} s, {os.cpu_count()} cpus, "
          f"{workers} director threads")
    print(f"reference: signing {args.devices} director metadata sets in memory: "
          f"{reference:.2f} s ({1000 * reference / args.devices:.2f} ms/device)")
    for run in runs:
        print(f"deploy {run['release']}: {run['seconds']:.2f} s "
              f"({run['per_device_ms']:.2f} ms/device, x{run['ratio']:.1f} the reference); "
              f"notified {run['notified']} (twice: {run['notified_twice']}), first at "
              f"{run['first_notify_s']:.2f} s, last at {run['last_notify_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
