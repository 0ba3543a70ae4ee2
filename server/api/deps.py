"""FastAPI dependencies: the server context, one DB transaction per request, the caller.

A request's database work is one transaction: committed when the endpoint
returns, rolled back when it raises, so a refused request changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request
from sqlalchemy.orm import Session

from edgeota.server.api.limits import PRINCIPAL_STATE
from edgeota.server.context import ServerContext
from edgeota.server.tokens import AuthenticationError, Principal, Role, authenticate

__all__ = ["MAX_ROW_ID", "ContextDep", "CurrentPrincipal", "RowId", "SessionDep", "require"]

_BEARER = "bearer "
MAX_ROW_ID = 2**63 - 1  # a signed BIGINT: a larger id names no row, and SQLite cannot bind it

# A database id in a path (a release, a deployment): past 64 bits it is a 422, not an
# OverflowError from the driver.
RowId = Annotated[int, Path(ge=1, le=MAX_ROW_ID)]


def get_context(request: Request) -> ServerContext:
    """The context ``create_app`` put on the app (Starlette types ``app.state`` as Any)."""
    ctx: ServerContext = request.app.state.ctx
    return ctx


ContextDep = Annotated[ServerContext, Depends(get_context)]


def get_session(ctx: ContextDep) -> Iterator[Session]:
    with ctx.sessions() as session, session.begin():
        yield session


# scope="function": the transaction commits before the response is sent, so a
# client that got its 2xx (an operator script, a device's report) and asks
# again at once sees what it did.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_principal(request: Request, ctx: ContextDep) -> Principal:
    """The caller: as :class:`~edgeota.server.api.limits.RequestGuard` authenticated it
    (every ``/api/v1`` request, before its body is read), else from the bearer header."""
    known = getattr(request.state, PRINCIPAL_STATE, None)
    if isinstance(known, Principal):
        return known
    header = request.headers.get("authorization", "")
    if not header.lower().startswith(_BEARER):
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    # Its own short transaction: authentication may record last use, and that
    # write must not hold SQLite's lock for the whole request.
    try:
        with ctx.sessions() as session, session.begin():
            return authenticate(session, header[len(_BEARER):].strip())
    except AuthenticationError as e:
        raise HTTPException(401, str(e), headers={"WWW-Authenticate": "Bearer"}) from e


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


def require(role: Role) -> Callable[[Principal], Principal]:
    """A dependency that admits callers whose role allows ``role``."""

    def check(principal: CurrentPrincipal) -> Principal:
        if not principal.allows(role):
            raise HTTPException(
                403, f"token {principal.name!r} has role {principal.role}; this needs {role}"
            )
        return principal

    return check
