"""The FastAPI application: repository files, the operator API and health.

``create_app`` takes a ready ``ServerContext`` (no globals), so tests and
replicas build as many independent apps as they need. Background tasks
re-sign timestamp and snapshot metadata before it expires and advance phased
rollouts (every ``[rollouts] interval_seconds``).

Every request passes :class:`~edgeota.server.api.limits.RequestGuard` first
(authentication before any body byte, per-route body caps while it streams).
Every refusal is a 4xx ``{"detail", "code"}``; a fault of the server's own is
a 500 ``internal_error`` that says nothing more, and no detail names a path of
the server's disk (:func:`redact_paths`). The OpenAPI document is served at
``/openapi.json``; no Swagger UI is served (FastAPI's loads its scripts from a
CDN, into the dashboard's origin).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
import tempfile
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text
from starlette.exceptions import HTTPException

from edgeota.protocol.errors import EdgeotaError, ProtocolError
from edgeota.server.api.limits import RequestGuard
from edgeota.server.api.routes import admin, dashboard, deployments, devices, releases, repo
from edgeota.server.api.schemas import ErrorOut
from edgeota.server.context import ServerContext
from edgeota.server.db.session import lock
from edgeota.server.metrics import CONTENT_TYPE
from edgeota.server.services import releases as releases_service
from edgeota.server.services import rollouts
from edgeota.server.services.errors import ErrorCode, ServiceError
from edgeota.server.tokens import AuthenticationError

__all__ = ["create_app", "redact_paths", "refresh_expiring_metadata"]

logger = logging.getLogger(__name__)

# The code of an error the HTTP layer raises itself (missing token, role, size limits,
# unknown paths): by status, as those errors carry no more than their status.
_HTTP_CODES = {
    400: ErrorCode.INVALID_REQUEST,
    401: ErrorCode.UNAUTHENTICATED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    408: ErrorCode.REQUEST_TIMEOUT,
    409: ErrorCode.CONFLICT,
    413: ErrorCode.TOO_LARGE,
}
_ERROR_RESPONSES = {
    400: "refused: bad data or an impossible request",
    401: "no valid bearer token",
    403: "the token's role may not do this",
    404: "no such object",
    408: "the body stalled or came too slowly",
    409: "clashes with the current state",
    413: "a body above its limit, or past the uploads' quota",
    422: "fields that do not match the schema (invalid_body), or a refused release",
}
_MAX_VALIDATION_ERRORS = 32  # listed in a 422; the rest are counted
_MAX_DETAIL = 1000  # characters of one error sentence
# An absolute POSIX path of two or more parts that is not part of a URL.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/-])/(?:[\w.+@-]+/)+[\w.+@-]*")


def refresh_expiring_metadata(ctx: ServerContext) -> list[str]:
    """Re-sign online metadata close to expiry; serialised with publishing across replicas."""
    refreshed: list[str] = []
    with ctx.sessions() as session, session.begin():
        lock(session, "image")
        refreshed += [f"image/{role}" for role in ctx.image.refresh()]
    with ctx.sessions() as session, session.begin():
        lock(session, "director")
        count = ctx.director.refresh_all()
        if count:
            refreshed.append(f"director/{count} devices")
    if refreshed:
        logger.info("re-signed expiring metadata", extra={"refreshed": refreshed})
    return refreshed


def create_app(ctx: ServerContext, *, background_refresh: bool = True,
               rollout_engine: bool = True) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        tasks = []
        if background_refresh:
            tasks.append(asyncio.create_task(_refresh_loop(ctx)))
        if rollout_engine:
            tasks.append(asyncio.create_task(_rollout_loop(ctx)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app = FastAPI(
        title="edgeota update server",
        description="TUF image and director repositories and the operator API.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        # Documented on every route, so a client (and schemathesis) knows each refusal.
        responses={status: {"model": ErrorOut, "description": description}
                   for status, description in _ERROR_RESPONSES.items()},
    )
    app.state.ctx = ctx
    app.add_middleware(RequestGuard, ctx=ctx)
    roots = _server_roots(ctx)
    for module in (repo, devices, releases, deployments, admin, dashboard):
        app.include_router(module.router)

    @app.get("/metrics", tags=["health"])
    def metrics() -> Response:
        """Prometheus metrics (fetches, publish and signing durations, fleet gauges)."""
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        with ctx.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return {"status": "ok"}

    # Error bodies: {"detail": a sentence, "code": an ErrorCode}; clients act on the code.
    def error(status: int, code: ErrorCode, detail: object,
              headers: Mapping[str, str] | None = None) -> JSONResponse:
        text = redact_paths(str(detail), roots)[:_MAX_DETAIL]
        return JSONResponse({"detail": text, "code": str(code)}, status_code=status,
                            headers=headers)

    @app.exception_handler(ServiceError)
    async def service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        return error(exc.status, exc.code, exc)

    @app.exception_handler(AuthenticationError)
    async def auth_error(_request: Request, exc: AuthenticationError) -> JSONResponse:
        return error(401, ErrorCode.UNAUTHENTICATED, exc)

    @app.exception_handler(ProtocolError)
    async def protocol_error(_request: Request, exc: ProtocolError) -> JSONResponse:
        return error(400, ErrorCode.BAD_DATA, exc)

    @app.exception_handler(EdgeotaError)
    async def edgeota_error(_request: Request, exc: EdgeotaError) -> JSONResponse:
        return error(400, ErrorCode.REFUSED, exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code < 400:  # not an error: FastAPI's own answer
            return await http_exception_handler(request, exc)
        code = _HTTP_CODES.get(exc.status_code, ErrorCode.REFUSED)
        return error(exc.status_code, code, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # Each error's type, location and sentence, never the input: the input may be
        # NaN (which JSON cannot carry), a megabyte, or a secret sent in the wrong field.
        errors = list(exc.errors())
        detail: list[dict[str, object]] = [
            {"type": str(e.get("type", "")), "loc": _location(e.get("loc", ())),
             "msg": redact_paths(str(e.get("msg", "")), roots)[:_MAX_DETAIL]}
            for e in errors[:_MAX_VALIDATION_ERRORS]]
        if len(errors) > _MAX_VALIDATION_ERRORS:
            detail.append({"type": "too_many_errors", "loc": [],
                           "msg": f"and {len(errors) - _MAX_VALIDATION_ERRORS} more"})
        return JSONResponse({"detail": detail, "code": str(ErrorCode.INVALID_BODY)},
                            status_code=422)

    @app.exception_handler(RecursionError)
    async def too_deep(_request: Request, _exc: RecursionError) -> JSONResponse:
        # Only input nests this deep (JSON in a body or a report): the caller's fault.
        return error(400, ErrorCode.BAD_DATA, "input is nested too deeply")

    @app.exception_handler(Exception)
    async def internal(_request: Request, _exc: Exception) -> JSONResponse:
        # Starlette logs the traceback; the client learns nothing of the server's insides.
        return error(500, ErrorCode.INTERNAL_ERROR, "internal server error")

    return app


def _location(loc: Iterable[object]) -> list[str | int]:
    return [part if isinstance(part, int) else str(part)[:100] for part in loc][:16]


def _server_roots(ctx: ServerContext) -> tuple[str, ...]:
    """Folders of this server whose names an error message must not carry, longest first."""
    roots = {ctx.config.home, ctx.config.blob_dir, ctx.config.ca_dir,
             Path(tempfile.gettempdir()), Path(sys.prefix), Path(__file__).parents[1]}
    names = {str(p) for root in roots for p in (root, root.resolve())}
    return tuple(sorted((n for n in names if n not in ("/", "")), key=len, reverse=True))


def redact_paths(text: str, roots: Iterable[str] = ()) -> str:
    """``text`` with the server's folders and any other absolute path replaced by ``<path>``.

    Error details come from exceptions raised deep down (onnxruntime names the
    model file it failed to load, the OS names the file it could not open):
    the client needs the reason, not where the server keeps its files.
    """
    for root in roots:  # the server's own folders first: their names may hold spaces
        text = re.sub(re.escape(root) + r"(?:/[^\s'\",;)]*)?(?![\w.+@-])", "<path>", text)
    return _ABSOLUTE_PATH.sub("<path>", text)


async def _rollout_loop(ctx: ServerContext) -> None:
    """Advance phased deployments: every replica runs it, the director lock serialises them."""
    while True:
        try:
            changes = await asyncio.to_thread(rollouts.advance, ctx)
            for change in changes:
                logger.info("rollout: %s", change)
        except Exception:
            logger.exception("rollout engine pass failed")
        await asyncio.sleep(ctx.config.rollout_interval_seconds)


async def _refresh_loop(ctx: ServerContext) -> None:
    interval = ctx.config.expiry.refresh_interval_seconds
    while True:
        try:
            await asyncio.to_thread(refresh_expiring_metadata, ctx)
        except Exception:
            logger.exception("re-signing expiring metadata failed")
        try:  # uploads no release took: also swept before every upload
            await asyncio.to_thread(releases_service.sweep_uploads, ctx)
        except Exception:
            logger.exception("sweeping stale uploads failed")
        await asyncio.sleep(interval)
