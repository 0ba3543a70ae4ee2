"""``/api/v1/devices``: enrolment and fleet views."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request

from edgeota.protocol.reports import MAX_REPORT_SIZE, MalformedReportError
from edgeota.server.api.deps import ContextDep, CurrentPrincipal, SessionDep, require
from edgeota.server.api.schemas import DeviceOut, EnrollRequest, EnrollResponse
from edgeota.server.services import devices as service
from edgeota.server.services.reports import ingest_report
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
    return EnrollResponse.model_validate(
        service.enroll_device(ctx, session, principal.name, body.to_request()))


@router.get("")
def list_devices(
    session: SessionDep, _: Annotated[Principal, Depends(require(Role.VIEWER))]
) -> list[DeviceOut]:
    return [DeviceOut.model_validate(d) for d in service.list_devices(session)]


@router.get("/{device_id}")
def get_device(
    device_id: str, session: SessionDep, _: Annotated[Principal, Depends(require(Role.VIEWER))]
) -> DeviceOut:
    return DeviceOut.model_validate(service.get_device(session, device_id))


@router.post("/{device_id}/reports", status_code=202)
async def report(
    device_id: str, request: Request, ctx: ContextDep, principal: CurrentPrincipal
) -> dict[str, object]:
    """A device's signed status report (the HTTP twin of the MQTT ``status`` topic).

    Only the device's own token may post for it; the report's signature and
    sequence number are checked like on MQTT, and a rejection is audited.
    The token was checked before any byte of the body was read, and the body
    stops at :data:`MAX_REPORT_SIZE` while it streams (``RequestGuard``).
    """
    if principal.role is not Role.DEVICE or principal.device_id != device_id:
        raise HTTPException(403, f"only device {device_id!r} reports for itself")
    body = await request.body()
    if len(body) > MAX_REPORT_SIZE:
        raise HTTPException(413, f"report exceeds {MAX_REPORT_SIZE} bytes")
    try:
        with ctx.sessions() as session, session.begin():
            outcome = ingest_report(session, device_id, body, clock=ctx.clock)
    except (RecursionError, ValueError) as e:
        # json.loads beyond its limits: nesting past the interpreter's stack, or an
        # integer past sys.get_int_max_str_digits() (a ValueError, not a JSONDecodeError).
        # Bad input, never a server fault; the transaction rolled back, nothing changed.
        raise MalformedReportError(f"report does not parse: {type(e).__name__}") from e
    if not outcome.accepted:
        raise HTTPException(422, f"report rejected: {outcome.reason}")
    return {"accepted": True}
