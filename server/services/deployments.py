"""Deployments: which devices should run which release, written into the director.

``deploy`` picks the devices (by id or tag), orders them by a stable hash of
deployment and device id, splits them into the requested phases and assigns
the first phase at once. Later phases, soak times, gates and rollback are
the rollout engine's (:mod:`edgeota.server.services.rollouts`); both go
through :func:`assign_release` (one device) or :func:`start_assignments` (a
phase: many devices on a bounded thread pool), the only places a release
reaches a device's director metadata.

Order of the writes, and what a crash leaves
--------------------------------------------
Everything happens in the caller's transaction, under the ``director`` lock
(:func:`edgeota.server.db.session.lock`), which other replicas take before
they touch any device's director metadata; the lock is held until that
transaction ends, and every file write of a phase has finished before the
functions here return, so the lock still covers all of them. The database
rows (new assignments, superseded ones) are staged first on the request
thread; then each device's director files are written (targets, snapshot,
timestamp: the timestamp pointer moves last, so a device reads either its old
or its new metadata, never a mix); the transaction commits last. The
director files are the record of what a device is assigned now (see
:func:`current_release`); the database is the rollout's bookkeeping. A crash
before the commit therefore leaves some devices with the new release in
their director metadata and no deployment row: the operator's request failed
and is repeated, and the repeated deploy takes those devices as they are
(their "previous" release is then the new one, which is what they run).

A device is told (``ctx.notify``) as soon as its own files are written, not
after the commit, so the first devices of a large phase start while the
others are still being signed. A device that reports before the commit is
not lost on SQLite (the report's transaction waits for the write lock, then
sees the assignment); on PostgreSQL its report does not find the uncommitted
assignment, which then stays ``pending`` until a later report: the window is
the length of the phase's director work (seconds), not of its download.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload
from tuf.api.metadata import Metadata, TargetFile, Targets

from edgeota.protocol.errors import ProtocolError
from edgeota.protocol.identity import SERVER_IDENTITY
from edgeota.protocol.keywrap import KemPublicKey, unwrap_content_key, wrap_content_key
from edgeota.protocol.targets_custom import DirectorTargetCustom
from edgeota.server import audit
from edgeota.server.context import ServerContext
from edgeota.server.db.models import (
    Assignment,
    AssignmentState,
    Deployment,
    DeploymentEvent,
    DeploymentStatus,
    Device,
    Release,
    ReleaseStatus,
)
from edgeota.server.db.session import lock
from edgeota.server.repo.director import AssignmentError, UnknownDeviceError
from edgeota.server.repo.image import SigningError, UntrustedSignerError
from edgeota.server.repo.storage import RepoError
from edgeota.server.services.errors import ConflictError, InvalidRequestError, NotFoundError
from edgeota.server.services.types import DeploymentRequest, DeployResult

__all__ = [
    "MAX_DIRECTOR_WORKERS",
    "DirectorFailure",
    "PhaseStart",
    "add_assignment",
    "already_running",
    "assign_release",
    "check_phases",
    "current_release",
    "deploy",
    "director_failure",
    "eligibility_problem",
    "model_name_of",
    "phase_of_ranks",
    "rank_devices",
    "record_event",
    "release_content_key",
    "restart_stalled",
    "selector_matches",
    "start_assignment",
    "start_assignments",
    "start_phase",
]

logger = logging.getLogger(__name__)

# Threads that write one phase's director metadata. Each device's files are its
# own (own folder, own lock), so devices are independent; the work is mostly
# waiting for fsync, and parallel fsyncs share ext4 journal commits. Bounded so
# a 10 000-device phase does not start 10 000 threads next to the request pool.
MAX_DIRECTOR_WORKERS = min(8, (os.cpu_count() or 1) * 4)
MAX_DIRECTOR_ATTEMPTS = 5  # a device's director work, before its assignment is marked failed
_IN_CHUNK = 500  # ids per SQL ``IN (...)``: below every database's parameter limit

# Assignment states in which the device is (or was) handed the deployment's release.
LIVE_STATES = (AssignmentState.PENDING, AssignmentState.DOWNLOADING, AssignmentState.INSTALLED,
               AssignmentState.FAILED)


class DirectorFailure(enum.StrEnum):
    """Why a device's director metadata could not be written (documented in architecture.md).

    Named in the assignment's ``detail`` (database, ``rollout status``, a deploy's
    ``failed``) as ``(<value>)``; explicit values, so renaming an exception class never
    changes what operators and scripts read.
    """

    SIGNING = "signing_failed"  # the online director key did not sign (KMS/HSM down)
    UNKNOWN_DEVICE = "unknown_device"  # no director repository for the device
    INVALID_ASSIGNMENT = "invalid_assignment"  # a target set the device cannot be given
    KEY_WRAP = "key_wrap_failed"  # the content key could not be wrapped to the device's key
    STORAGE = "storage_failed"  # the files could not be written (disk full, permissions)
    REPOSITORY = "repository_error"  # any other refusal of the director repository
    INTERNAL = "internal_error"  # a bug: the log has the traceback


def director_failure(error: BaseException) -> DirectorFailure:
    """The :class:`DirectorFailure` of an error raised by one device's director work."""
    if isinstance(error, (SigningError, UntrustedSignerError)):
        return DirectorFailure.SIGNING
    if isinstance(error, UnknownDeviceError):
        return DirectorFailure.UNKNOWN_DEVICE
    if isinstance(error, AssignmentError):
        return DirectorFailure.INVALID_ASSIGNMENT
    if isinstance(error, ProtocolError):
        return DirectorFailure.KEY_WRAP
    if isinstance(error, OSError):
        return DirectorFailure.STORAGE
    if isinstance(error, RepoError):
        return DirectorFailure.REPOSITORY
    return DirectorFailure.INTERNAL


def model_name_of(target_path: str) -> str:
    """``models/{name}/{version}.eotb`` -> ``name``: one director target per model name."""
    parts = target_path.split("/")
    return parts[1] if len(parts) == 3 and parts[0] == "models" else target_path


def check_phases(phases: Sequence[int]) -> list[int]:
    """Cumulative percentages: strictly increasing, within 1..100, the last one 100."""
    values = list(phases)
    if not values or values[-1] != 100:
        raise InvalidRequestError(f"phases {values} must end at 100 (every selected device)")
    if any(p < 1 or p > 100 for p in values):
        raise InvalidRequestError(f"phases {values} must be percentages between 1 and 100")
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise InvalidRequestError(f"phases {values} must strictly increase (cumulative %)")
    return values


def rank_devices(deployment_id: int, device_ids: Sequence[str]) -> list[str]:
    """Device ids in rollout order: a stable hash of (deployment, device).

    Stable across restarts and replicas (no process-dependent hashing), and
    different per deployment, so the same device is not always the canary.
    """
    def key(device_id: str) -> tuple[bytes, str]:
        digest = hashlib.sha256(f"{deployment_id}\0{device_id}".encode()).digest()
        return digest, device_id

    return sorted(device_ids, key=key)


def phase_of_ranks(count: int, phases: Sequence[int]) -> list[int]:
    """Phase index of each rank ``0..count-1``: the first ceil(p% x count) are in phase 0...

    Every phase that gets a share rounds up, so a 1 % canary of 20 devices is
    one device, never none.
    """
    bounds = [math.ceil(count * p / 100) for p in phases]
    result = []
    phase = 0
    for rank in range(count):
        while rank >= bounds[phase]:
            phase += 1
        result.append(phase)
    return result


def selector_matches(selector: Mapping[str, Any], device: Device) -> bool:
    if "devices" in selector:
        return device.id in selector["devices"]
    tags = selector.get("tags", {})
    return all(device.tags.get(k) == v for k, v in tags.items())


def eligibility_problem(release: Release, device: Device) -> str | None:
    """Why ``device`` cannot take ``release`` (None: it can)."""
    hardware = release.manifest.get("hardware", [])
    if device.hardware not in hardware:
        return f"hardware {device.hardware} is not in the release's {sorted(hardware)}"
    if device.disabled:
        return "device is disabled"
    return None


def _select_devices(session: Session, request: DeploymentRequest) -> list[Device]:
    if bool(request.devices) == bool(request.tags):
        raise InvalidRequestError("name the devices either by id (--devices) or by tag (--tag)")
    if request.devices:
        found = {d.id: d for d in session.scalars(
            select(Device).where(Device.id.in_(request.devices)))}
        missing = sorted(set(request.devices) - set(found))
        if missing:
            raise NotFoundError(f"unknown device(s): {', '.join(missing)}")
        return [found[i] for i in sorted(found)]
    devices = session.scalars(select(Device).order_by(Device.id))
    return [d for d in devices
            if all(d.tags.get(key) == value for key, value in request.tags.items())]


@dataclass(frozen=True)
class _DirectorJob:
    """One device's director work, built on the request thread from database rows.

    Plain values only: the worker threads never touch the ORM session.
    """

    device_id: str
    hardware: str
    kem: dict[str, Any]
    target_path: str
    length: int
    sha256: str
    release_counter: int
    content_key: bytes = field(repr=False)  # a secret: never in a repr or a log
    # The device's director targets as read on the request thread (None: read them).
    current: Metadata[Targets] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, device: Device, release: Release, content_key: bytes,
           current: Metadata[Targets] | None = None) -> _DirectorJob:
        return cls(device_id=device.id, hardware=device.hardware,
                   kem=dict(device.identity["kem"]), target_path=release.target_path,
                   length=release.length, sha256=release.sha256,
                   release_counter=release.release_counter, content_key=content_key,
                   current=current)

    def target(self) -> TargetFile:
        """The device's director target: the bundle, with its content key wrapped to the device."""
        wrapped = wrap_content_key(self.content_key, KemPublicKey.from_dict(self.kem),
                                   self.device_id)
        custom = DirectorTargetCustom(
            device_id=self.device_id,
            hardware_id=self.hardware,
            release_counter=self.release_counter,
            wrapped_key=wrapped,
        )
        return TargetFile(
            length=self.length,
            hashes={"sha256": self.sha256},
            path=self.target_path,
            unrecognized_fields={"custom": custom.to_custom()},
        )


@dataclass
class PhaseStart:
    """What starting a set of assignments did: who has the release now, who failed and why.

    A failed device's files are unchanged (or, if it failed between writes,
    not yet referenced by its timestamp): its assignment stays ``waiting``
    with the reason in ``detail``, and :func:`restart_stalled` tries again.
    """

    started: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def release_content_key(ctx: ServerContext, release: Release) -> bytes:
    """The release's content key, unwrapped with the server's key-wrap key."""
    return unwrap_content_key(release.wrapped_content_key, ctx.keywrap_key, SERVER_IDENTITY)


def _notify(ctx: ServerContext, device_id: str) -> None:
    """Tell the device; a transport failure costs only the push (it still polls)."""
    try:
        ctx.notify(device_id)
    except Exception:  # the transport's errors are its own; the assignment stands
        logger.warning("could not notify %s", device_id, exc_info=True,
                       extra={"device_id": device_id})


def _write_director(ctx: ServerContext, job: _DirectorJob) -> None:
    """Make ``job``'s release the device's target for its model, then notify the device.

    File work only (safe on any thread): the device's other models' targets
    are kept, read under the device's lock with the change.
    """
    model_name = model_name_of(job.target_path)
    target = job.target()

    def change(current: Mapping[str, TargetFile]) -> dict[str, TargetFile]:
        targets = {path: t for path, t in current.items() if model_name_of(path) != model_name}
        targets[job.target_path] = target
        return targets

    signing = time.perf_counter()
    ctx.director.assign_with(job.device_id, change, job.current)
    ctx.metrics.director_sign_seconds.observe(time.perf_counter() - signing)
    _notify(ctx, job.device_id)


def assign_release(ctx: ServerContext, device: Device, release: Release,
                   content_key: bytes | None = None) -> None:
    """Make ``release`` the device's target for its model: wrap the key, sign, notify.

    The caller holds the ``director`` lock. Other models' targets stay as
    they are; the device hears of it over MQTT at once, or on its next poll.
    ``content_key`` saves unwrapping it again per device when a phase assigns many.
    """
    if content_key is None:
        content_key = release_content_key(ctx, release)
    _write_director(ctx, _DirectorJob.of(device, release, content_key))


def assign_releases(ctx: ServerContext, pairs: Sequence[tuple[Device, Release]],
                    workers: int | None = None) -> dict[str, Exception]:
    """:func:`assign_release` for many devices at once, each to its own release, on the pool.

    For what is not a phase start (a rollback returns each device to the
    release it had before, which may differ per device). Content keys are
    unwrapped once per release. Returns the failures by device id; every other
    device has its new director metadata and was notified. The caller holds
    the ``director`` lock.
    """
    keys: dict[int, bytes] = {}
    jobs = []
    for device, release in pairs:
        if release.id not in keys:
            keys[release.id] = release_content_key(ctx, release)
        jobs.append(_DirectorJob.of(device, release, keys[release.id]))
    return _run_director_jobs(ctx, jobs, workers)


def _run_director_jobs(ctx: ServerContext, jobs: Sequence[_DirectorJob],
                       workers: int | None = None) -> dict[str, Exception]:
    """Run ``jobs`` on at most ``workers`` threads; return the failures by device id.

    Every job runs to its end before this returns, failed or not: the
    caller's ``director`` lock must cover every write, so there is no timeout
    that would leave writes running behind it (each job's own I/O is what
    bounds it). An error of one device is logged and returned, the others go
    on. On an interrupt (KeyboardInterrupt, SystemExit) the jobs not started yet
    are cancelled and the running ones awaited.
    """
    workers = min(workers or MAX_DIRECTOR_WORKERS, len(jobs))
    failures: dict[str, Exception] = {}

    def failed(job: _DirectorJob, error: Exception) -> None:
        failures[job.device_id] = error
        logger.warning("director assignment of %s failed: %s", job.device_id, error,
                       exc_info=error, extra={"device_id": job.device_id,
                                              "target_path": job.target_path})

    if not jobs:
        return failures
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="director")
    try:
        futures: dict[Future[None], _DirectorJob] = {
            pool.submit(_write_director, ctx, job): job for job in jobs}
        wait(futures)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    for future, job in futures.items():
        error = future.exception()
        if error is not None:
            if not isinstance(error, Exception):
                raise error
            failed(job, error)
    return failures


def current_release(ctx: ServerContext, session: Session, device_id: str,
                    model_name: str) -> Release | None:
    """The release of ``model_name`` the director assigns ``device_id`` now (None: none)."""
    path = _model_target(ctx.director.current_targets(device_id), model_name)
    if path is None:
        return None
    return session.scalars(select(Release).where(Release.target_path == path)).first()


def _model_target(targets: Metadata[Targets] | None, model_name: str) -> str | None:
    if targets is not None:
        for path in targets.signed.targets:
            if model_name_of(path) == model_name:
                return path
    return None


def _read_targets(ctx: ServerContext, device_ids: Sequence[str]) -> dict[str, Metadata[Targets]]:
    """Each device's current director targets (devices without any are left out).

    Read on the director pool (file reads and JSON parsing, no database).
    """
    def read(device_id: str) -> Metadata[Targets] | None:
        try:
            return ctx.director.current_targets(device_id)
        except UnknownDeviceError:
            return None  # never completed enrolment: the assignment creates its metadata

    if not device_ids:
        return {}
    with ThreadPoolExecutor(max_workers=min(MAX_DIRECTOR_WORKERS, len(device_ids)),
                            thread_name_prefix="director-read") as pool:
        found = dict(zip(device_ids, pool.map(read, device_ids), strict=True))
    return {k: v for k, v in found.items() if v is not None}


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), _IN_CHUNK):
        yield items[start:start + _IN_CHUNK]


def already_running(device: Device, release: Release) -> bool:
    """Whether the device's last report says it committed exactly this release."""
    state = device.reported_state or {}
    return (state.get("state") == "committed"
            and state.get("release") == f"{release.name}@{release.version}")


def record_event(session: Session, deployment: Deployment, kind: str, actor: str,
                 now: datetime, **detail: object) -> None:
    session.add(DeploymentEvent(deployment_id=deployment.id, at=now, kind=kind, actor=actor,
                                detail=dict(detail)))


def add_assignment(ctx: ServerContext, session: Session, deployment: Deployment,
                   device_id: str, phase: int, now: datetime) -> tuple[Assignment, set[int]]:
    """Put a device in ``deployment`` (waiting in ``phase``), taking it out of older ones.

    Remembers the release of the model the director assigns it now, which is
    what a rollback gives back. Returns it and the ids of the deployments it left.
    """
    release = deployment.release
    left: set[int] = set()
    for older in session.scalars(select(Assignment).where(
            Assignment.device_id == device_id,
            Assignment.model_name == deployment.model_name,
            Assignment.state != AssignmentState.SUPERSEDED)):
        older.state = AssignmentState.SUPERSEDED
        left.add(older.deployment_id)
    previous = current_release(ctx, session, device_id, deployment.model_name)
    assignment = Assignment(
        deployment_id=deployment.id, device_id=device_id, release_id=release.id,
        model_name=deployment.model_name, phase=phase, state=AssignmentState.WAITING,
        previous_release_id=previous.id if previous is not None
        and previous.id != release.id else None,
        updated_at=now)
    session.add(assignment)
    return assignment, left


def start_assignment(ctx: ServerContext, session: Session, assignment: Assignment,
                     now: datetime, content_key: bytes | None = None) -> None:
    """Hand one waiting device its release (its phase started, or it joined a live one).

    Raises what the director raises: one device, so the caller decides.
    """
    device = assignment.device
    if already_running(device, assignment.release):
        assignment.state = AssignmentState.INSTALLED
        assignment.detail = "already running this release"
        assignment.finished_at = now
    else:
        assign_release(ctx, device, assignment.release, content_key)
        assignment.state = AssignmentState.PENDING
    assignment.assigned_at = now


def start_assignments(ctx: ServerContext, session: Session, assignments: Sequence[Assignment],
                      now: datetime,
                      current_targets: Mapping[str, Metadata[Targets]] | None = None,
                      workers: int | None = None) -> PhaseStart:
    """Hand many waiting devices their release: database on this thread, files on a pool.

    The assignments' rows are read here (devices, releases, content keys
    unwrapped once per release); each device's director work -- wrap its key,
    sign and write its targets, snapshot and timestamp, notify it -- runs on at
    most ``workers`` threads (:data:`MAX_DIRECTOR_WORKERS`), each device
    notified as soon as its own metadata is written, so the first devices
    start while the others are signed. ``current_targets`` are director
    targets the caller has just read (used if still current, not read again).

    When every file is written the rows are updated here: ``pending`` for the
    devices that have the release; a device whose director work failed stays
    ``waiting`` with the error in ``detail`` (its files are unchanged as far as
    it can see), is reported in the result and retried by :func:`restart_stalled`.
    Devices whose last report says they run the release already are marked
    ``installed`` and get no new metadata.
    """
    result = PhaseStart()
    keys: dict[int, bytes] = {}
    jobs: list[_DirectorJob] = []
    waiting: dict[str, Assignment] = {}
    for assignment in assignments:
        device, release = assignment.device, assignment.release
        if already_running(device, release):
            assignment.state = AssignmentState.INSTALLED
            assignment.detail = "already running this release"
            assignment.finished_at = now
            assignment.assigned_at = now
            continue
        if release.id not in keys:
            keys[release.id] = release_content_key(ctx, release)  # once, not per device
        jobs.append(_DirectorJob.of(device, release, keys[release.id],
                                    (current_targets or {}).get(device.id)))
        waiting[device.id] = assignment
    failures = _run_director_jobs(ctx, jobs, workers)
    for assignment in assignments:
        if assignment.device_id in failures:
            error = failures[assignment.device_id]
            assignment.detail = (f"director assignment failed ({director_failure(error)}): "
                                 f"{error}")
            assignment.updated_at = now
            result.failed[assignment.device_id] = assignment.detail
            continue
        if assignment.device_id in waiting:
            assignment.state = AssignmentState.PENDING
            assignment.detail = None
            assignment.assigned_at = now
            assignment.updated_at = now
        result.started.append(assignment.device_id)
    if result.failed:
        logger.error("director assignment failed for %d of %d devices", len(result.failed),
                     len(assignments), extra={"failed": sorted(result.failed)})
    return result


def _waiting(session: Session, deployment: Deployment, *, phase: int | None = None,
             up_to: int | None = None) -> list[Assignment]:
    query = select(Assignment).where(Assignment.deployment_id == deployment.id,
                                     Assignment.state == AssignmentState.WAITING)
    if phase is not None:
        query = query.where(Assignment.phase == phase)
    if up_to is not None:
        query = query.where(Assignment.phase <= up_to)
    return list(session.scalars(query.options(selectinload(Assignment.device))
                                .order_by(Assignment.device_id)))


def _start_phase(ctx: ServerContext, session: Session, deployment: Deployment, phase: int,
                 now: datetime, actor: str,
                 current_targets: Mapping[str, Metadata[Targets]] | None = None) -> PhaseStart:
    deployment.current_phase = phase
    deployment.phase_started_at = now
    result = start_assignments(ctx, session, _waiting(session, deployment, phase=phase), now,
                               current_targets)
    detail: dict[str, object] = {"phase": phase, "percent": deployment.phases[phase],
                                 "devices": result.started}
    if result.failed:
        detail["failed"] = result.failed
    record_event(session, deployment, "phase_started", actor, now, **detail)
    return result


def start_phase(ctx: ServerContext, session: Session, deployment: Deployment, phase: int,
                now: datetime, actor: str,
                current_targets: Mapping[str, Metadata[Targets]] | None = None) -> list[str]:
    """Begin ``phase``: assign its waiting devices (in parallel); returns the ids that have it.

    Devices whose director work failed are named in the ``phase_started``
    event and stay waiting (see :func:`start_assignments`).
    """
    return _start_phase(ctx, session, deployment, phase, now, actor, current_targets).started


def restart_stalled(ctx: ServerContext, session: Session, deployment: Deployment,
                    now: datetime, actor: str) -> PhaseStart:
    """Retry the devices of started phases still waiting (their director work failed).

    The rollout engine calls this on each pass of an active deployment, so a
    transient failure (a full disk, an unreachable KMS) heals by itself. A
    device whose director work failed :data:`MAX_DIRECTOR_ATTEMPTS` times is
    marked failed with the last reason instead (the failure ratio then
    decides whether the rollout pauses): retrying forever would hide it and
    grow the deployment's history on every pass.
    """
    if deployment.phase_started_at is None:
        return PhaseStart()
    stalled = _waiting(session, deployment, up_to=deployment.current_phase)
    if not stalled:
        return PhaseStart()
    failures: dict[str, int] = {}
    for detail in session.scalars(select(DeploymentEvent.detail).where(
            DeploymentEvent.deployment_id == deployment.id,
            DeploymentEvent.kind.in_(("phase_started", "retried")))):
        for device_id in (detail or {}).get("failed") or {}:
            failures[device_id] = failures.get(device_id, 0) + 1
    for assignment in [a for a in stalled
                       if failures.get(a.device_id, 0) >= MAX_DIRECTOR_ATTEMPTS]:
        stalled.remove(assignment)
        assignment.state = AssignmentState.FAILED
        assignment.detail = (f"gave up after {MAX_DIRECTOR_ATTEMPTS} attempts: "
                             f"{assignment.detail or 'director assignment failed'}")[:500]
        assignment.finished_at = now
        logger.warning("director assignment given up", extra={
            "deployment_id": deployment.id, "device_id": assignment.device_id})
    if not stalled:
        return PhaseStart()
    result = start_assignments(ctx, session, stalled, now)
    record_event(session, deployment, "retried", actor, now, devices=result.started,
                 failed=result.failed)
    return result


def _add_assignments(
    ctx: ServerContext, session: Session, deployment: Deployment, scheduled: Mapping[str, int],
    now: datetime,
) -> tuple[set[int], dict[str, Metadata[Targets]]]:
    """:func:`add_assignment` for many devices, with a few queries instead of a few per device.

    Returns the ids of the deployments the devices left, and the devices'
    current director targets (read once, on the director pool; handed on to
    the first phase's assignment so they are not read again).
    """
    release = deployment.release
    ids = list(scheduled)
    left: set[int] = set()
    for chunk in _chunks(ids):
        for older in session.scalars(select(Assignment).where(
                Assignment.device_id.in_(chunk),
                Assignment.model_name == deployment.model_name,
                Assignment.state != AssignmentState.SUPERSEDED)):
            older.state = AssignmentState.SUPERSEDED
            left.add(older.deployment_id)
    current = _read_targets(ctx, ids)
    paths = {device_id: path for device_id, targets in current.items()
             if (path := _model_target(targets, deployment.model_name)) is not None}
    releases: dict[str, int] = {}
    for chunk in _chunks(sorted(set(paths.values()))):
        for path, release_id in session.execute(select(Release.target_path, Release.id).where(
                Release.target_path.in_(chunk))):
            releases[path] = release_id
    for device_id, phase in scheduled.items():
        previous = releases.get(paths.get(device_id, ""))
        session.add(Assignment(
            deployment_id=deployment.id, device_id=device_id, release_id=release.id,
            model_name=deployment.model_name, phase=phase, state=AssignmentState.WAITING,
            previous_release_id=previous if previous != release.id else None,
            updated_at=now))
    return left, current


def deploy(
    ctx: ServerContext, session: Session, actor: str, request: DeploymentRequest
) -> DeployResult:
    """Create a phased deployment, supersede older ones for its devices, start phase 0."""
    phases = check_phases(request.phases)
    options = request.options
    lock(session, "director")
    release = session.scalars(
        select(Release).where(Release.name == request.name, Release.version == request.version)
    ).first()
    if release is None:
        raise NotFoundError(f"no release {request.name} {request.version}")
    if release.status != ReleaseStatus.PUBLISHED:
        raise ConflictError(f"release {request.name} {request.version} is {release.status}")
    selected = _select_devices(session, request)
    skipped = {d.id: problem for d in selected
               if (problem := eligibility_problem(release, d)) is not None}
    eligible = [d for d in selected if d.id not in skipped]
    if not eligible:
        reasons = [f"{k}: {v}" for k, v in skipped.items()]
        shown = "; ".join(reasons[:5]) + (f"; and {len(reasons) - 5} more"
                                          if len(reasons) > 5 else "")
        raise InvalidRequestError(
            "no eligible device: " + (shown or "the selector matches no enrolled device"))
    model_name = model_name_of(release.target_path)
    now = ctx.clock()
    deployment = Deployment(
        release_id=release.id,
        model_name=model_name,
        selector=({"devices": list(request.devices)} if request.devices
                  else {"tags": dict(request.tags)}),
        phases=phases,
        options=options.to_stored(),
        created_by=actor,
        created_at=now,
        current_phase=0,
    )
    session.add(deployment)
    session.flush()
    superseded: set[int] = set()
    by_id = {d.id: d for d in eligible}
    ranked = rank_devices(deployment.id, list(by_id))
    scheduled = dict(zip(ranked, phase_of_ranks(len(ranked), phases), strict=True))
    left, current = _add_assignments(ctx, session, deployment, scheduled, now)
    superseded |= left
    session.flush()
    for deployment_id in sorted(superseded):
        older_deployment = session.get(Deployment, deployment_id)
        if older_deployment is None or older_deployment.status in (
                DeploymentStatus.COMPLETED, DeploymentStatus.CANCELLED):
            continue
        live = session.scalars(select(Assignment.id).where(
            Assignment.deployment_id == deployment_id,
            Assignment.state != AssignmentState.SUPERSEDED)).first()
        if live is None:
            older_deployment.status = DeploymentStatus.SUPERSEDED
            older_deployment.superseded_by = deployment.id
            older_deployment.finished_at = now
        record_event(session, older_deployment, "superseded", actor, now,
                     by=deployment.id, complete=live is None)
    record_event(session, deployment, "created", actor, now, phases=phases,
                 devices=len(ranked), skipped=skipped, superseded=sorted(superseded))
    started = _start_phase(ctx, session, deployment, 0, now, actor, current)
    first = started.started
    audit.append(
        session,
        actor=actor,
        action="deploy",
        subject=f"{release.name}@{release.version}",
        detail={"deployment_id": deployment.id, "devices": ranked, "phases": phases,
                "first_phase": first, "failed": started.failed, "skipped": skipped,
                "superseded": sorted(superseded),
                "options": options.to_stored()},
    )
    return DeployResult(
        deployment_id=deployment.id,
        release=f"{release.name}@{release.version}",
        target_path=release.target_path,
        assigned=first,
        scheduled=scheduled,
        skipped=skipped,
        superseded=sorted(superseded),
        phases=phases,
        failed=dict(started.failed),
    )
