"""Deployments: which devices should run which release, written into the director.

This is the immediate-assignment form (every selected device at once); staged
phases, soak times and gates build on the same assignment step.
"""

from __future__ import annotations

import time

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
    DeploymentStatus,
    Device,
    Release,
    ReleaseStatus,
)
from edgeota.server.db.session import lock
from edgeota.server.services.errors import ConflictError, InvalidRequestError, NotFoundError

__all__ = ["deploy", "model_name_of"]


def model_name_of(target_path: str) -> str:
    """``models/{name}/{version}.eotb`` -> ``name``: one director target per model name."""
    parts = target_path.split("/")
    return parts[1] if len(parts) == 3 and parts[0] == "models" else target_path


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


def deploy(
    ctx: ServerContext, session: Session, actor: str, request: DeployRequest
) -> DeployResponse:
    """Assign a published release to the selected devices and sign their director metadata."""
    lock(session, "director")
    release = session.scalars(
        select(Release).where(Release.name == request.name, Release.version == request.version)
    ).first()
    if release is None:
        raise NotFoundError(f"no release {request.name} {request.version}")
    if release.status != ReleaseStatus.PUBLISHED:
        raise ConflictError(f"release {request.name} {request.version} is {release.status}")
    hardware = set(release.manifest.get("hardware", []))
    selected = _select_devices(session, request)
    skipped = {d.id: f"hardware {d.hardware} is not in the release's {sorted(hardware)}"
               for d in selected if d.hardware not in hardware}
    skipped.update({d.id: "device is disabled" for d in selected if d.disabled})
    eligible = [d for d in selected if d.id not in skipped]
    if not eligible:
        raise InvalidRequestError(
            "no eligible device: " + ("; ".join(f"{k}: {v}" for k, v in skipped.items())
                                      or "the selector matches no enrolled device")
        )
    model_name = model_name_of(release.target_path)
    deployment = Deployment(
        release_id=release.id,
        model_name=model_name,
        selector={"devices": request.devices} if request.devices else {"tags": request.tags},
        phases=[100],
        options={},
        created_by=actor,
        created_at=ctx.clock(),
    )
    session.add(deployment)
    session.flush()
    content_key = unwrap_content_key(release.wrapped_content_key, ctx.keywrap_key,
                                     SERVER_IDENTITY)
    superseded: set[int] = set()
    for device in eligible:
        for older in session.scalars(
            select(Assignment).where(
                Assignment.device_id == device.id,
                Assignment.model_name == model_name,
                Assignment.state != AssignmentState.SUPERSEDED,
            )
        ):
            older.state = AssignmentState.SUPERSEDED
            superseded.add(older.deployment_id)
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
        session.add(Assignment(
            deployment_id=deployment.id,
            device_id=device.id,
            release_id=release.id,
            model_name=model_name,
            phase=0,
            state=AssignmentState.PENDING,
        ))
    session.flush()
    for deployment_id in sorted(superseded):
        live = session.scalars(select(Assignment.id).where(
            Assignment.deployment_id == deployment_id,
            Assignment.state != AssignmentState.SUPERSEDED)).first()
        older_deployment = session.get(Deployment, deployment_id)
        if live is None and older_deployment is not None:
            older_deployment.status = DeploymentStatus.SUPERSEDED
            older_deployment.superseded_by = deployment.id
    audit.append(
        session,
        actor=actor,
        action="deploy",
        subject=f"{release.name}@{release.version}",
        detail={"deployment_id": deployment.id, "devices": [d.id for d in eligible],
                "skipped": skipped, "superseded": sorted(superseded)},
    )
    return DeployResponse(
        deployment_id=deployment.id,
        release=f"{release.name}@{release.version}",
        target_path=release.target_path,
        assigned=[d.id for d in eligible],
        skipped=skipped,
        superseded=sorted(superseded),
    )
