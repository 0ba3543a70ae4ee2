"""``/api/v1/devices``: enrolment and fleet views."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from edgeota.server.api.deps import ContextDep, SessionDep, require
from edgeota.server.api.schemas import DeviceOut, EnrollRequest, EnrollResponse
from edgeota.server.services import devices as service
from edgeota.server.tokens import Principal, Role

router = APIRouter(prefix="/api/v1/devices", tags=["devices"])


@router.post("", status_code=201)
def enroll(
    body: EnrollRequest,
    ctx: ContextDep,
    session: SessionDep,
    principal: Annotated[Principal, Depends(require(Role.OPERATOR))],
) -> EnrollResponse:
    """Register a device; answers its certificate, API token and bootstrap roots once."""
    return service.enroll_device(ctx, session, principal.name, body)


@router.get("")
def list_devices(
    session: SessionDep, _: Annotated[Principal, Depends(require(Role.VIEWER))]
) -> list[DeviceOut]:
    return service.list_devices(session)


@router.get("/{device_id}")
def get_device(
    device_id: str, session: SessionDep, _: Annotated[Principal, Depends(require(Role.VIEWER))]
) -> DeviceOut:
    return service.get_device(session, device_id)
