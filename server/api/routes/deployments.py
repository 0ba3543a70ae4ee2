"""``/api/v1/deployments``: phased rollouts of releases to devices, and their controls."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from edgeota.server.api.deps import ContextDep, RowId, SessionDep, require
from edgeota.server.api.schemas import (
    DeploymentOut,
    DeployRequest,
    DeployResponse,
    RolloutActionOut,
)
from edgeota.server.services import deployments as service
from edgeota.server.services import rollouts
from edgeota.server.tokens import Principal, Role

router = APIRouter(prefix="/api/v1/deployments", tags=["deployments"])

Operator = Annotated[Principal, Depends(require(Role.OPERATOR))]
Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]


@router.post("", status_code=201)
def deploy(body: DeployRequest, ctx: ContextDep, session: SessionDep,
           principal: Operator) -> DeployResponse:
    """Create a phased deployment by device id or tag; its first phase is assigned at once."""
    return DeployResponse.model_validate(
        service.deploy(ctx, session, principal.name, body.to_request()))


@router.get("")
def list_deployments(session: SessionDep, _: Viewer,
                     limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[DeploymentOut]:
    """Deployments, newest first, with device counts per state."""
    return [DeploymentOut.model_validate(d) for d in rollouts.list_deployments(session, limit)]


@router.get("/{deployment_id}")
def get_deployment(deployment_id: RowId, session: SessionDep, _: Viewer) -> DeploymentOut:
    """One deployment: each phase's devices and states with reasons, and its history."""
    return DeploymentOut.model_validate(rollouts.get_deployment(session, deployment_id))


@router.post("/{deployment_id}/pause")
def pause(deployment_id: RowId, ctx: ContextDep, session: SessionDep,
          principal: Operator) -> RolloutActionOut:
    """Stop starting new phases (devices already assigned carry on)."""
    return RolloutActionOut.model_validate(
        rollouts.pause(ctx, session, principal.name, deployment_id))


@router.post("/{deployment_id}/resume")
def resume(deployment_id: RowId, ctx: ContextDep, session: SessionDep,
           principal: Operator) -> RolloutActionOut:
    """Continue a paused deployment; the failures and gate findings so far are accepted."""
    return RolloutActionOut.model_validate(
        rollouts.resume(ctx, session, principal.name, deployment_id))


@router.post("/{deployment_id}/cancel")
def cancel(deployment_id: RowId, ctx: ContextDep, session: SessionDep,
           principal: Operator) -> RolloutActionOut:
    """End the deployment: waiting devices never get the release; others keep it."""
    return RolloutActionOut.model_validate(
        rollouts.cancel(ctx, session, principal.name, deployment_id))


@router.post("/{deployment_id}/rollback")
def rollback(deployment_id: RowId, ctx: ContextDep, session: SessionDep,
             principal: Operator) -> RolloutActionOut:
    """Assign every started device its previous release and end the deployment."""
    return RolloutActionOut.model_validate(
        rollouts.rollback(ctx, session, principal.name, deployment_id))
