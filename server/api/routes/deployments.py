"""``/api/v1/deployments``: assigning releases to devices."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from edgeota.server.api.deps import ContextDep, SessionDep, require
from edgeota.server.api.schemas import DeployRequest, DeployResponse
from edgeota.server.services import deployments as service
from edgeota.server.tokens import Principal, Role

router = APIRouter(prefix="/api/v1/deployments", tags=["deployments"])


@router.post("", status_code=201)
def deploy(
    body: DeployRequest,
    ctx: ContextDep,
    session: SessionDep,
    principal: Annotated[Principal, Depends(require(Role.OPERATOR))],
) -> DeployResponse:
    """Assign a published release to devices by id or tag and sign their director metadata."""
    return service.deploy(ctx, session, principal.name, body)
