"""``/api/v1/releases`` and ``/api/v1/blobs``: uploading and publishing releases."""

from __future__ import annotations

import hashlib
import os
import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request

from edgeota.server import audit
from edgeota.server.api.deps import ContextDep, SessionDep, require
from edgeota.server.api.schemas import ReleaseOut, ReleaseSignature, ReleaseSubmit
from edgeota.server.services import releases as service
from edgeota.server.services.errors import ReleaseRefusedError
from edgeota.server.tokens import Principal, Role

router = APIRouter(prefix="/api/v1", tags=["releases"])

ReleaseManager = Annotated[Principal, Depends(require(Role.RELEASE_MANAGER))]
Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]
MAX_BUNDLE_SIZE = 16 * 1024**3  # bytes


@router.put("/blobs/{sha256}")
async def upload_blob(
    sha256: str, request: Request, ctx: ContextDep, _: ReleaseManager
) -> dict[str, object]:
    """Stream a sealed bundle to the server; it is kept only if it hashes to ``sha256``."""
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise HTTPException(400, "blob name must be a lowercase sha256 hex digest")
    declared = int(request.headers.get("content-length") or 0)
    if declared > MAX_BUNDLE_SIZE:
        raise HTTPException(413, f"bundle of {declared} bytes exceeds {MAX_BUNDLE_SIZE}")
    partial = ctx.uploads_dir / f".{sha256}.{secrets.token_hex(4)}.partial"
    digest = hashlib.sha256()
    size = 0
    try:
        with partial.open("xb") as out:
            async for block in request.stream():
                size += len(block)
                if size > MAX_BUNDLE_SIZE:
                    raise HTTPException(413, f"bundle exceeds {MAX_BUNDLE_SIZE} bytes")
                digest.update(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != sha256:
            raise HTTPException(400, f"uploaded bytes hash to {digest.hexdigest()}, not {sha256}")
        partial.replace(ctx.uploads_dir / sha256)
    finally:
        partial.unlink(missing_ok=True)
    return {"sha256": sha256, "size": size}


@router.post("/releases", status_code=201)
def submit(body: ReleaseSubmit, ctx: ContextDep, principal: ReleaseManager) -> ReleaseOut:
    """Verify, re-validate and publish a signed release (or hold it for more signatures)."""
    try:
        with ctx.sessions() as session, session.begin():
            return ReleaseOut.model_validate(
                service.submit_release(ctx, session, principal.name, body.to_request()))
    except ReleaseRefusedError as e:
        # The release's transaction has rolled back; the refusal is recorded on its own.
        with ctx.sessions() as audit_session, audit_session.begin():
            audit.append(audit_session, actor=principal.name, action="release.refused",
                         subject=f"{body.name}@{body.version}", detail={"reason": str(e)})
        raise


@router.post("/releases/{release_id}/signatures")
def sign(
    release_id: int,
    body: ReleaseSignature,
    ctx: ContextDep,
    session: SessionDep,
    principal: ReleaseManager,
) -> ReleaseOut:
    """Add another release manager's signature to a pending release (k-of-n)."""
    return ReleaseOut.model_validate(
        service.add_signature(ctx, session, principal.name, release_id, body.bin_metadata))


@router.get("/releases")
def list_releases(session: SessionDep, _: Viewer, name: str | None = None) -> list[ReleaseOut]:
    return [ReleaseOut.model_validate(r) for r in service.list_releases(session, name)]


@router.get("/releases/{release_id}")
def get_release(release_id: int, session: SessionDep, _: Viewer) -> ReleaseOut:
    return ReleaseOut.model_validate(service.get_release(session, release_id))
