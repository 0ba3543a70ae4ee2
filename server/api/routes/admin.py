"""Tokens, the caller's identity, the audit log and the server's key-wrap key."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException

from edgeota.server import audit
from edgeota.server.api.deps import ContextDep, CurrentPrincipal, SessionDep, require
from edgeota.server.api.schemas import AuditOut, TokenCreate, TokenOut
from edgeota.server.tokens import Principal, Role, issue_token

router = APIRouter(prefix="/api/v1", tags=["admin"])


@router.get("/whoami")
def whoami(principal: CurrentPrincipal) -> dict[str, Any]:
    return {"name": principal.name, "role": str(principal.role),
            "device_id": principal.device_id}


@router.post("/tokens", status_code=201)
def create_token(
    body: TokenCreate,
    session: SessionDep,
    principal: Annotated[Principal, Depends(require(Role.ADMIN))],
) -> TokenOut:
    """Issue an operator token; the plaintext is in this response only."""
    if body.role == Role.DEVICE:
        raise HTTPException(400, "device tokens are issued by enrolment only")
    try:
        row, token = issue_token(session, name=body.name, role=body.role)
    except ValueError as e:
        raise HTTPException(400, str(e)) from e
    session.flush()
    audit.append(session, actor=principal.name, action="token.issue", subject=body.name,
                 detail={"token_id": row.id, "role": body.role})
    return TokenOut(id=row.id, name=row.name, role=str(row.role), token=token)


@router.get("/audit/verify")
def verify_audit(
    session: SessionDep, _: Annotated[Principal, Depends(require(Role.VIEWER))]
) -> AuditOut:
    result = audit.verify(session)
    return AuditOut(ok=result.ok, entries=result.entries, first_bad_id=result.first_bad_id,
                    reason=result.reason, head_hash=result.last_hash)


@router.get("/keywrap-key")
def keywrap_key(ctx: ContextDep, _: CurrentPrincipal) -> dict[str, str]:
    """The public key release managers wrap content keys to (pin it: see operator.toml)."""
    return ctx.keywrap_key.public_key().to_dict()
