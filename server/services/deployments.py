"""Deployments: which devices should run which release, written into the director.

``deploy`` picks the devices (by id or tag), orders them by a stable hash of
deployment and device id, splits them into the requested phases and assigns
the first phase at once. Later phases, soak times, gates and rollback are
the rollout engine's (:mod:`edgeota.server.services.rollouts`); both use
:func:`assign_release`, the one place a release reaches a device's director
metadata.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session
from tuf.api.metadata import TargetFile

from edgeota.protocol.identity import SERVER_IDENTITY
from edgeota.protocol.keywrap import KemPublicKey, unwrap_content_key, wrap_content_key
from edgeota.protocol.targets_custom import DirectorTargetCustom
from edgeota.server import audit
from edgeota.server.api.schemas import DeployRequest, DeployResponse
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
from edgeota.server.services.errors import ConflictError, InvalidRequestError, NotFoundError

__all__ = [
    "add_assignment",
    "already_running",
    "assign_release",
    "check_phases",
    "current_release",
    "deploy",
    "eligibility_problem",
    "model_name_of",
    "phase_of_ranks",
    "rank_devices",
    "record_event",
    "release_content_key",
    "selector_matches",
    "start_assignment",
    "start_phase",
]

# Assignment states in which the device is (or was) handed the deployment's release.
LIVE_STATES = (AssignmentState.PENDING, AssignmentState.DOWNLOADING, AssignmentState.INSTALLED,
               AssignmentState.FAILED)


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


def selector_matches(selector: dict, device: Device) -> bool:
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


def _select_devices(session: Session, request: DeployRequest) -> list[Device]:
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


def _director_target(release: Release, device: Device, wrapped: bytes) -> TargetFile:
    custom = DirectorTargetCustom(
        device_id=device.id,
        hardware_id=device.hardware,
        release_counter=release.release_counter,
        wrapped_key=wrapped,
    )
    return TargetFile(
        length=release.length,
        hashes={"sha256": release.sha256},
        path=release.target_path,
        unrecognized_fields={"custom": custom.to_custom()},
    )


def release_content_key(ctx: ServerContext, release: Release) -> bytes:
    """The release's content key, unwrapped with the server's key-wrap key."""
    return unwrap_content_key(release.wrapped_content_key, ctx.keywrap_key, SERVER_IDENTITY)


def assign_release(ctx: ServerContext, device: Device, release: Release,
                   content_key: bytes | None = None) -> None:
    """Make ``release`` the device's target for its model: wrap the key, sign, notify.

    The caller holds the ``director`` lock. Other models' targets stay as
    they are; the device hears of it over MQTT at once, or on its next poll.
    ``content_key`` saves unwrapping it again per device when a phase assigns many.
    """
    model_name = model_name_of(release.target_path)
    if content_key is None:
        content_key = release_content_key(ctx, release)
    kem = KemPublicKey.from_dict(device.identity["kem"])
    wrapped = wrap_content_key(content_key, kem, device.id)
    current = ctx.director.current_targets(device.id).signed.targets
    targets = {path: target for path, target in current.items()
               if model_name_of(path) != model_name}
    targets[release.target_path] = _director_target(release, device, wrapped)
    signing = time.perf_counter()
    ctx.director.assign(device.id, targets)
    ctx.metrics.director_sign_seconds.observe(time.perf_counter() - signing)
    ctx.notify(device.id)


def current_release(ctx: ServerContext, session: Session, device_id: str,
                    model_name: str) -> Release | None:
    """The release of ``model_name`` the director assigns ``device_id`` now (None: none)."""
    for path in ctx.director.current_targets(device_id).signed.targets:
        if model_name_of(path) == model_name:
            return session.scalars(select(Release).where(Release.target_path == path)).first()
    return None


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
    """Hand one waiting device its release (its phase started, or it joined a live one)."""
    device = assignment.device
    if already_running(device, assignment.release):
        assignment.state = AssignmentState.INSTALLED
        assignment.detail = "already running this release"
        assignment.finished_at = now
    else:
        assign_release(ctx, device, assignment.release, content_key)
        assignment.state = AssignmentState.PENDING
    assignment.assigned_at = now


def start_phase(ctx: ServerContext, session: Session, deployment: Deployment, phase: int,
                now: datetime, actor: str) -> list[str]:
    """Begin ``phase``: assign its waiting devices; returns their ids."""
    deployment.current_phase = phase
    deployment.phase_started_at = now
    started = []
    content_key = release_content_key(ctx, deployment.release)  # once, not per device
    for assignment in session.scalars(
        select(Assignment).where(Assignment.deployment_id == deployment.id,
                                 Assignment.phase == phase,
                                 Assignment.state == AssignmentState.WAITING)
        .order_by(Assignment.device_id)
    ):
        start_assignment(ctx, session, assignment, now, content_key)
        started.append(assignment.device_id)
    record_event(session, deployment, "phase_started", actor, now, phase=phase,
                 percent=deployment.phases[phase], devices=started)
    return started


def deploy(
    ctx: ServerContext, session: Session, actor: str, request: DeployRequest
) -> DeployResponse:
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
        selector={"devices": request.devices} if request.devices else {"tags": request.tags},
        phases=phases,
        options=options.model_dump(),
        created_by=actor,
        created_at=now,
        current_phase=0,
    )
    session.add(deployment)
    session.flush()
    superseded: set[int] = set()
    by_id = {d.id: d for d in eligible}
    ranked = rank_devices(deployment.id, list(by_id))
    scheduled: dict[str, int] = {}
    for device_id, phase in zip(ranked, phase_of_ranks(len(ranked), phases), strict=True):
        superseded |= add_assignment(ctx, session, deployment, device_id, phase, now)[1]
        scheduled[device_id] = phase
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
    first = start_phase(ctx, session, deployment, 0, now, actor)
    audit.append(
        session,
        actor=actor,
        action="deploy",
        subject=f"{release.name}@{release.version}",
        detail={"deployment_id": deployment.id, "devices": ranked, "phases": phases,
                "first_phase": first, "skipped": skipped, "superseded": sorted(superseded),
                "options": options.model_dump()},
    )
    return DeployResponse(
        deployment_id=deployment.id,
        release=f"{release.name}@{release.version}",
        target_path=release.target_path,
        assigned=first,
        scheduled=scheduled,
        skipped=skipped,
        superseded=sorted(superseded),
        phases=phases,
    )
