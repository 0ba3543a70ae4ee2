"""The FastAPI application: repository files, the operator API and health.

``create_app`` takes a ready ``ServerContext`` (no globals), so tests and
replicas build as many independent apps as they need. Background tasks
re-sign timestamp and snapshot metadata before it expires and advance phased
rollouts (every ``[rollouts] interval_seconds``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text
from starlette.exceptions import HTTPException

from edgeota.protocol.errors import EdgeotaError, ProtocolError
from edgeota.server.api.routes import admin, dashboard, deployments, devices, releases, repo
from edgeota.server.context import ServerContext
from edgeota.server.db.session import lock
from edgeota.server.metrics import CONTENT_TYPE
from edgeota.server.services import rollouts
from edgeota.server.services.errors import ErrorCode, ServiceError
from edgeota.server.tokens import AuthenticationError

__all__ = ["create_app", "refresh_expiring_metadata"]

logger = logging.getLogger(__name__)

# The code of an error the HTTP layer raises itself (missing token, role, size limits,
# unknown paths): by status, as those errors carry no more than their status.
_HTTP_CODES = {
    400: ErrorCode.INVALID_REQUEST,
    401: ErrorCode.UNAUTHENTICATED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    409: ErrorCode.CONFLICT,
    413: ErrorCode.TOO_LARGE,
}


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
    )
    app.state.ctx = ctx
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
    @app.exception_handler(ServiceError)
    async def service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        return _error(exc.status, exc.code, exc)

    @app.exception_handler(AuthenticationError)
    async def auth_error(_request: Request, exc: AuthenticationError) -> JSONResponse:
        return _error(401, ErrorCode.UNAUTHENTICATED, exc)

    @app.exception_handler(ProtocolError)
    async def protocol_error(_request: Request, exc: ProtocolError) -> JSONResponse:
        return _error(400, ErrorCode.BAD_DATA, exc)

    @app.exception_handler(EdgeotaError)
    async def edgeota_error(_request: Request, exc: EdgeotaError) -> JSONResponse:
        return _error(400, ErrorCode.REFUSED, exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code < 400:  # not an error: FastAPI's own answer
            return await http_exception_handler(request, exc)
        code = _HTTP_CODES.get(exc.status_code, ErrorCode.REFUSED)
        return JSONResponse({"detail": exc.detail, "code": str(code)},
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": jsonable_encoder(exc.errors()),
                             "code": str(ErrorCode.INVALID_BODY)}, status_code=422)

    return app


def _error(status: int, code: ErrorCode, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc), "code": str(code)}, status_code=status)


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
        await asyncio.sleep(interval)
