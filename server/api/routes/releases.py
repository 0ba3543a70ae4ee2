"""``/api/v1/releases`` and ``/api/v1/blobs``: uploading and publishing releases."""

from __future__ import annotations

import hashlib
import os
import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Request
from starlette.concurrency import run_in_threadpool

from edgeota.server import audit
from edgeota.server.api.deps import ContextDep, RowId, SessionDep, require
from edgeota.server.api.schemas import ReleaseOut, ReleaseSignature, ReleaseSubmit
from edgeota.server.repo.storage import UploadQuotaError
from edgeota.server.services import releases as service
from edgeota.server.services.errors import QuotaExceededError, ReleaseRefusedError
from edgeota.server.tokens import Principal, Role

router = APIRouter(prefix="/api/v1", tags=["releases"])

ReleaseManager = Annotated[Principal, Depends(require(Role.RELEASE_MANAGER))]
Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]
_QUOTA_CHECK_EVERY = 1024 * 1024  # bytes: how often a streaming upload re-reads usage


@router.put("/blobs/{sha256}")
async def upload_blob(
    sha256: Annotated[str, Path(pattern=r"^[0-9a-f]{64}$")], request: Request,
    ctx: ContextDep, _: ReleaseManager,
) -> dict[str, object]:
    """Stream a sealed bundle to the server; it is kept only if it hashes to ``sha256``.

    The token was checked, and a declared length above ``[uploads]
    max_bundle_bytes`` refused, before any byte was read (``RequestGuard``,
    which also stops a chunked body at that cap). The bundle must fit the
    uploads' quota, checked before and every few MiB while it streams (other
    uploads run at the same time). A bundle no release takes is removed: when
    its release is refused, or after ``[uploads] stale_hours``.
    """
    declared = int(request.headers.get("content-length") or 0)
    area = await run_in_threadpool(service.make_room_for_upload, ctx, declared)
    partial = ctx.uploads_dir / f".{sha256}.{secrets.token_hex(4)}.partial"
    digest = hashlib.sha256()
    size = next_check = 0
    try:
        with partial.open("xb") as out:
            async for block in request.stream():
                size += len(block)
                if size >= next_check:
                    next_check = size + _QUOTA_CHECK_EVERY
                    try:
                        await run_in_threadpool(area.check_room, len(block))
                    except UploadQuotaError as e:
                        raise QuotaExceededError(str(e)) from e
                digest.update(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != sha256:
            raise HTTPException(400, f"uploaded bytes hash to {digest.hexdigest()}, not {sha256}")
        partial.replace(area.path(sha256))
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
    release_id: RowId,
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
def get_release(release_id: RowId, session: SessionDep, _: Viewer) -> ReleaseOut:
    return ReleaseOut.model_validate(service.get_release(session, release_id))
