"""Repository files for TUF clients: the same paths the MQTT fetch protocol serves.

Image metadata and targets are public (they are signed, and the bundles are
encrypted). A device's director metadata carries its wrapped content keys and
is served only to that device's token.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

from edgeota.server.api.deps import ContextDep, CurrentPrincipal
from edgeota.server.context import ServerContext
from edgeota.server.repo.storage import RepoFileNotFoundError
from edgeota.server.tokens import Role

router = APIRouter(prefix="/repo", tags=["repository"])


def _serve(ctx: ServerContext, kind: str, lookup: Callable[[], Path]) -> FileResponse:
    try:
        path = lookup()
    except RepoFileNotFoundError as e:
        raise HTTPException(404, str(e)) from e
    ctx.metrics.fetch_requests.labels("http", kind).inc()
    ctx.metrics.fetch_bytes.labels("http", kind).inc(path.stat().st_size)
    media = "application/json" if path.suffix == ".json" else "application/octet-stream"
    return FileResponse(path, media_type=media)


@router.get("/image/metadata/{filename}")
def image_metadata(filename: str, ctx: ContextDep) -> FileResponse:
    return _serve(ctx, "image_metadata",
                  lambda: ctx.store.metadata_file_for_request("image", filename))


@router.get("/image/targets/{path:path}")
def image_target(path: str, ctx: ContextDep) -> FileResponse:
    """A sealed bundle; supports HTTP Range so interrupted downloads resume."""
    return _serve(ctx, "target", lambda: ctx.store.target_file_for_request(path))


@router.get("/director/{device_id}/metadata/{filename}")
def director_metadata(
    device_id: str, filename: str, ctx: ContextDep, principal: CurrentPrincipal
) -> FileResponse:
    if principal.role is not Role.DEVICE or principal.device_id != device_id:
        raise HTTPException(403, f"director metadata of {device_id!r} is served only to that "
                                 "device")
    return _serve(ctx, "director_metadata",
                  lambda: ctx.store.metadata_file_for_request(f"director/{device_id}", filename))
