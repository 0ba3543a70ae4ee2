"""The operator dashboard: ``/``, ``/dashboard/data``, ``/login``, ``/logout``, ``/static/*``.

The page is rendered on the server (usable without JavaScript) from the same
snapshot :mod:`edgeota.server.services.dashboard` serves as JSON at
``/dashboard/data``; ``static/dashboard.js`` polls that every two seconds and
re-renders, drawing each rollout's progress with the vendored uPlot (no CDN:
operators and devices may have no internet).

Authentication. The API takes bearer tokens, which a browser cannot attach
to a page load, so ``POST /login`` checks an API token (viewer or higher)
and answers a *session* in an ``HttpOnly; SameSite=Strict`` cookie (``Secure``
when the request came over TLS or ``public_url`` is https): an HMAC-signed
``eos1.<token id>.<expiry>.<nonce>.<mac>`` (:func:`edgeota.server.tokens.issue_session`),
never the token, so a leaked cookie is no API credential. Its key is derived
from the server's key-wrap key, which every replica holds. Only these
read-only dashboard routes accept the cookie; every ``/api/v1`` route still
requires the bearer header, so the cookie cannot be used to change anything.
The session's token is re-checked on every request: revoking it ends the
session at the next poll; otherwise it ends after ``[http] session_hours``.
``/login`` and ``/logout`` refuse cross-site posts (:func:`same_origin`: a
browser's ``Sec-Fetch-Site`` or ``Origin`` must name this site), so another
site can neither sign a browser in with its own token nor out.

Everything that comes from the database is escaped (:func:`h` for HTML; the
embedded JSON has ``<``, ``>`` and ``&`` escaped so it cannot close its
``<script>`` element), and a strict Content-Security-Policy allows scripts and
styles from this origin only.
"""

from __future__ import annotations

import hashlib
import html
import json
import string
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from edgeota.server.api.deps import get_context
from edgeota.server.api.limits import MAX_FORM_BYTES
from edgeota.server.context import ServerContext
from edgeota.server.services.dashboard import (
    DashboardData,
    FailureGroup,
    FleetOverview,
    RolloutView,
    dashboard_data,
)
from edgeota.server.tokens import (
    AuthenticationError,
    Principal,
    Role,
    authenticate,
    authenticate_session,
    issue_session,
    session_key,
)

__all__ = ["COOKIE_NAME", "STATIC_FILES", "h", "router", "same_origin"]

router = APIRouter(tags=["dashboard"])

COOKIE_NAME = "edgeota_session"
MAX_LOGIN_BODY = MAX_FORM_BYTES  # bytes of the login form; a token is under 100
POLL_INTERVAL_MS = 2000
_API = Path(__file__).resolve().parent.parent
STATIC_DIR = _API / "static"
TEMPLATE_DIR = _API / "templates"

# The only files /static serves: name -> media type. No path ever comes from the request.
STATIC_FILES: Mapping[str, str] = {
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
}

_SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


# -- credentials -------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """Who is asking, or why nobody is (``principal`` None)."""

    principal: Principal | None
    reason: str
    from_cookie: bool = False


def _context(request: Request) -> ServerContext:
    return get_context(request)


def _viewer(principal: Principal) -> Principal:
    if not principal.allows(Role.VIEWER):
        raise PermissionError(
            f"token {principal.name!r} has role {principal.role}; the dashboard needs "
            f"{Role.VIEWER} or higher")
    return principal


def check_token(ctx: ServerContext, token: str) -> Principal:
    """Authenticate ``token`` and require a role that may read the fleet.

    Raises:
        AuthenticationError: unknown, malformed or revoked token.
        PermissionError: a valid token whose role is not viewer or higher.
    """
    # Its own short transaction: authentication may record last use.
    with ctx.sessions() as session, session.begin():
        return _viewer(authenticate(session, token))


def _session_key(ctx: ServerContext) -> bytes:
    key = ctx.keywrap_key
    return session_key(key.x25519 + key.mlkem768_seed)


def check_session(ctx: ServerContext, cookie: str) -> Principal:
    """The viewer (or higher) behind a dashboard session cookie.

    Raises:
        AuthenticationError: a forged, expired or malformed session, or its token revoked.
        PermissionError: the session's token is not viewer or higher.
    """
    with ctx.sessions() as session, session.begin():
        return _viewer(authenticate_session(session, cookie, _session_key(ctx),
                                            now=ctx.clock()))


def new_session(ctx: ServerContext, principal: Principal) -> str:
    """A session cookie value for ``principal``, valid for ``[http] session_hours``."""
    with ctx.sessions() as session, session.begin():
        return issue_session(session, principal, _session_key(ctx), now=ctx.clock(),
                             lifetime=_session_lifetime(ctx))


def _session_lifetime(ctx: ServerContext) -> timedelta:
    return timedelta(hours=ctx.config.http_limits.session_hours)


def credentials(request: Request) -> Credentials:
    """The bearer header if there is one, else the session cookie."""
    header = request.headers.get("authorization", "")
    check: Callable[[ServerContext, str], Principal]
    if header.lower().startswith("bearer "):
        check, value, from_cookie = check_token, header[len("bearer "):].strip(), False
    else:
        check, value, from_cookie = check_session, request.cookies.get(COOKIE_NAME, ""), True
    if not value:
        return Credentials(None, "sign in with an API token (viewer or higher)")
    try:
        return Credentials(check(_context(request), value), "", from_cookie)
    except (AuthenticationError, PermissionError) as e:
        return Credentials(None, str(e), from_cookie)


def _secure(request: Request) -> bool:
    """Whether the cookie must be ``Secure``: the request came over TLS, or should have."""
    return (request.url.scheme == "https"
            or _context(request).config.public_url.lower().startswith("https://"))


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def same_origin(request: Request) -> bool:
    """Whether a form post comes from this site's own pages (or from no browser at all).

    A browser says where a request comes from: ``Sec-Fetch-Site`` (every
    current browser) or else ``Origin`` (sent on every cross-origin POST), which
    must be this server as the request reached it or as ``public_url`` names
    it. A client that sends neither is no browser, and has no cookie of a
    victim to abuse.
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site.lower() in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    allowed = {_origin(_context(request).config.public_url),
               f"{request.url.scheme}://{host}".lower()}
    return origin.lower() in allowed


# -- HTML building -----------------------------------------------------------------------


class Markup(str):
    """Text that is already HTML (built by :func:`h`); everything else gets escaped."""

    __slots__ = ()


Child = str | int | float | Markup | None | Iterable["Child"]


def _flatten(children: Iterable[Child]) -> Iterable[str]:
    for child in children:
        if child is None:
            continue
        if isinstance(child, Markup):
            yield child
        elif isinstance(child, str | int | float):
            yield html.escape(str(child))
        else:
            yield from _flatten(child)


def h(tag: str, attrs: Mapping[str, object] | None = None, *children: Child) -> Markup:
    """``<tag attrs>children</tag>`` with every attribute value and text child escaped.

    An attribute whose value is None or False is left out; True writes it bare.
    """
    parts = [tag]
    for name, value in (attrs or {}).items():
        if value is None or value is False:
            continue
        parts.append(name if value is True else f'{name}="{html.escape(str(value))}"')
    opening = "<" + " ".join(parts) + ">"
    if tag in ("input", "meta", "link", "br"):
        return Markup(opening)
    return Markup(opening + "".join(_flatten(children)) + f"</{tag}>")


def _join(*parts: Child) -> Markup:
    return Markup("".join(_flatten(parts)))


@lru_cache(maxsize=4)
def _template(name: str) -> string.Template:
    return string.Template((TEMPLATE_DIR / name).read_text(encoding="utf-8"))


def page(title: str, head: Markup, body: Markup, body_class: str = "") -> str:
    return _template("page.html").substitute(
        title=html.escape(title), head=head, body=body, body_class=html.escape(body_class))


def _html(content: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(content, status_code=status, headers=dict(_SECURITY_HEADERS))


def script_json(value: Any) -> Markup:
    """JSON safe inside ``<script type="application/json">``: no ``</script>``, no ``<!--``."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return Markup(text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
                  .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def _table(headers: Iterable[str], rows: Iterable[Iterable[Child]], cls: str = "") -> Markup:
    return h("table", {"class": cls or None},
             h("thead", None, h("tr", None, [h("th", None, c) for c in headers])),
             h("tbody", None, [h("tr", None, [h("td", None, cell) for cell in row])
                               for row in rows]))


def _badge(text: str, kind: str) -> Markup:
    return h("span", {"class": f"badge badge-{kind}"}, text)


def _stat(label: str, value: int, cls: str) -> Markup:
    return h("div", {"class": f"stat {cls}"}, h("span", {"class": "stat-value"}, value),
             h("span", {"class": "stat-label"}, label))


def render_fleet(fleet: FleetOverview) -> Markup:
    devices = _table(
        ["device", "hardware", "tags", "serving", "state", "online", "last seen"],
        [[d.id, d.hardware,
          [h("span", {"class": "tag"}, f"{k}={v}") for k, v in sorted(d.tags.items())],
          ", ".join(d.serving) or "-",
          [_badge(d.state, "state"),
           h("span", {"class": "muted"}, f" {d.release}") if d.release else None,
           h("div", {"class": "error-text"}, d.error) if d.error else None],
          _badge("disabled", "off") if d.disabled
          else _badge("online" if d.online else "offline", "on" if d.online else "off"),
          d.last_seen or "never"]
         for d in fleet.devices], "devices")
    shown = len(fleet.devices)
    return _join(
        h("div", {"class": "stats"},
          _stat("devices", fleet.total, "stat-total"), _stat("online", fleet.online, "stat-on"),
          _stat("offline", fleet.offline, "stat-off"),
          _stat("disabled", fleet.disabled, "stat-disabled")),
        h("div", {"class": "counts"},
          h("div", None, h("h3", None, "By serving version"),
            _table(["model@version", "devices"],
                   [[c.label, c.count] for c in fleet.by_version], "compact")),
          h("div", None, h("h3", None, "By reported state"),
            _table(["state", "devices"], [[c.label, c.count] for c in fleet.by_state],
                   "compact"))),
        devices if shown else h("p", {"class": "empty"}, "No devices enrolled."),
        h("p", {"class": "muted"}, f"Showing {shown} of {fleet.total} devices.")
        if shown < fleet.total else None,
    )


def progress_text(rollout: RolloutView) -> str:
    c = rollout.counts
    active = rollout.total - c["superseded"]
    in_flight = c["pending"] + c["downloading"]
    return (f"installed {c['installed']} of {active} ({_percent(c['installed'], active)}) · "
            f"failed {c['failed']} · rolled back {c['rolled_back']} · in progress {in_flight} · "
            f"waiting {c['waiting']}")


def render_rollout(rollout: RolloutView, states: list[str]) -> Markup:
    phase_strip = h("ol", {"class": "phases"}, [
        h("li", {"class": "current" if p.index == rollout.current_phase
                 else "done" if p.started else "upcoming"}, f"{p.percent}%")
        for p in rollout.phase_views])
    phase_table = _table(
        ["phase", "%", "devices", *(s.replace("_", " ") for s in states)],
        [[f"{p.index + 1}", f"{p.percent}%", p.devices,
          *(h("span", {"class": f"n n-{s}" + (" zero" if not p.counts[s] else "")},
              p.counts[s]) for s in states)]
         for p in rollout.phase_views], "compact phase-table")
    events = _table(["at", "event", "actor", "detail"],
                    [[e.at, e.kind, e.actor, e.summary] for e in rollout.events],
                    "compact events") if rollout.events else None
    devices = _table(
        ["device", "phase", "state", "detail", "assigned", "finished"],
        [[a.device_id, a.phase + 1, _badge(a.state, a.state), a.detail or "",
          a.assigned_at or "", a.finished_at or ""] for a in rollout.devices],
        "compact rollout-devices")
    more = rollout.total - len(rollout.devices)
    return h(
        "article", {"class": "rollout", "id": f"rollout-{rollout.id}",
                    "data-rollout": rollout.id},
        h("div", {"class": "rollout-head"},
          h("h3", None, f"#{rollout.id} {rollout.release}"),
          _badge(rollout.status, f"status-{rollout.status}"),
          h("span", {"class": "phase-label"},
            f"phase {rollout.current_phase + 1}/{len(rollout.phases)}"),
          phase_strip),
        h("p", {"class": "reason"}, rollout.status_reason) if rollout.status_reason else None,
        h("p", {"class": "muted meta"},
          f"{rollout.selector} · created {rollout.created_at} by {rollout.created_by}"
          + (f" · finished {rollout.finished_at}" if rollout.finished_at else "")),
        h("p", {"class": "progress", "id": f"progress-{rollout.id}"}, progress_text(rollout)),
        h("div", {"class": "chart", "id": f"chart-{rollout.id}"}),
        h("div", {"class": "rollout-tables"},
          h("div", None, h("h4", None, "Devices per phase and state"), phase_table),
          h("div", None, h("h4", None, "Events"),
            events or h("p", {"class": "empty"}, "No events."))),
        h("h4", None, "Devices"),
        devices,
        h("p", {"class": "muted"}, f"and {more} more") if more > 0 else None,
    )


def render_rollouts(rollouts: list[RolloutView], states: list[str]) -> Markup:
    if not rollouts:
        return h("p", {"class": "empty"}, "No rollouts yet.")
    return _join([render_rollout(r, states) for r in rollouts])


def render_failures(failures: list[FailureGroup]) -> Markup:
    if not failures:
        return h("p", {"class": "empty"}, "No failures.")
    return _table(
        ["reason", "outcome", "devices", "which", "deployments"],
        [[f.reason, _badge(f.state, f.state), f.count,
          ", ".join(f.devices) + (" …" if f.count > len(f.devices) else ""),
          ", ".join(f"#{d}" for d in f.deployments)] for f in failures], "failures")


def render_audit(data: DashboardData) -> Markup:
    if not data.audit:
        return h("p", {"class": "empty"}, "The audit log is empty.")
    return _table(["#", "recorded", "actor", "action", "subject", "detail"],
                  [[a.id, a.recorded_at, a.actor, a.action, a.subject,
                    h("code", None, a.detail)] for a in data.audit], "compact audit")


def _section(section_id: str, title: str, content: Markup) -> Markup:
    return h("section", {"id": section_id}, h("h2", None, title),
             h("div", {"id": f"{section_id}-body"}, content))


def render_dashboard(data: DashboardData, principal: Principal) -> str:
    head = _join(
        h("link", {"rel": "stylesheet", "href": "/static/uPlot.min.css"}),
        h("link", {"rel": "stylesheet", "href": "/static/dashboard.css"}),
        h("script", {"src": "/static/uPlot.iife.min.js", "defer": True}),
        h("script", {"src": "/static/dashboard.js", "defer": True}),
    )
    body = _join(
        h("header", {"class": "top"},
          h("h1", None, "edgeota"),
          h("span", {"class": "subtitle"}, "fleet and rollouts"),
          h("span", {"id": "updated", "class": "muted"}, f"as of {data.generated_at}"),
          h("span", {"id": "live", "class": "live off"}, "static"),
          h("span", {"class": "who"}, f"{principal.name} ({principal.role})"),
          h("form", {"method": "post", "action": "/logout", "class": "logout"},
            h("button", {"type": "submit"}, "Sign out"))),
        h("main", None,
          _section("fleet", "Fleet", render_fleet(data.fleet)),
          _section("rollouts", "Rollouts", render_rollouts(data.rollouts,
                                                            data.assignment_states)),
          _section("failures", "Failure reasons", render_failures(data.failures)),
          _section("audit", f"Audit trail (last {len(data.audit)})", render_audit(data))),
        h("script", {"type": "application/json", "id": "dashboard-data",
                     "data-poll-ms": POLL_INTERVAL_MS}, script_json(data.to_json())),
    )
    return page("edgeota dashboard", head, body)


def render_login(reason: str | None) -> str:
    head = h("link", {"rel": "stylesheet", "href": "/static/dashboard.css"})
    body = h(
        "main", {"class": "login"},
        h("h1", None, "edgeota"),
        h("p", None, "Sign in with an API token (role viewer or higher), e.g. from "),
        h("pre", None, "edgeota token create NAME --role viewer"),
        h("p", {"class": "error-text", "role": "alert", "id": "login-error"}, reason)
        if reason else None,
        h("form", {"method": "post", "action": "/login"},
          h("label", {"for": "token"}, "API token"),
          h("input", {"type": "password", "name": "token", "id": "token", "required": True,
                      "autocomplete": "off", "autofocus": True, "maxlength": 256}),
          h("button", {"type": "submit", "id": "sign-in"}, "Sign in")),
    )
    return page("edgeota: sign in", head, body, "login-page")


# -- routes ------------------------------------------------------------------------------


def _snapshot(ctx: ServerContext) -> DashboardData:
    with ctx.sessions() as session, session.begin():
        return dashboard_data(session, ctx.clock())


def _to_login(clear_cookie: bool, request: Request) -> RedirectResponse:
    response = RedirectResponse("/login", status_code=303, headers={"Cache-Control": "no-store"})
    if clear_cookie:
        response.delete_cookie(COOKIE_NAME, path="/", secure=_secure(request), httponly=True,
                               samesite="strict")
    return response


@router.get("/", include_in_schema=False, response_model=None)
def dashboard(request: Request) -> HTMLResponse | RedirectResponse:
    """The dashboard page, or a redirect to the sign-in form."""
    who = credentials(request)
    if who.principal is None:
        return _to_login(who.from_cookie and COOKIE_NAME in request.cookies, request)
    return _html(render_dashboard(_snapshot(_context(request)), who.principal))


@router.get("/dashboard/data", responses={401: {"description": "no valid credentials"}})
def data(request: Request) -> JSONResponse:
    """The dashboard's data as JSON (what the page polls): bearer token or login cookie."""
    who = credentials(request)
    if who.principal is None:
        raise HTTPException(401, who.reason, headers={"WWW-Authenticate": "Bearer"})
    return JSONResponse(_snapshot(_context(request)).to_json(),
                        headers={"Cache-Control": "no-store"})


@router.get("/login", include_in_schema=False)
def login_form() -> HTMLResponse:
    return _html(render_login(None))


@router.post("/login", include_in_schema=False, response_model=None)
async def login(request: Request) -> HTMLResponse | RedirectResponse:
    """Check the form's token and answer a session cookie for the dashboard routes."""
    if not same_origin(request):
        return _html(render_login("cross-site sign-in refused"), 403)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        return _html(render_login("the sign-in form must be sent as a form"), 415)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_LOGIN_BODY:
            return _html(render_login("the sign-in form is too large"), 413)
    try:
        fields = parse_qs(body.decode("utf-8"), max_num_fields=4, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        return _html(render_login("the sign-in form could not be read"), 400)
    token = (fields.get("token") or [""])[0].strip()
    if not token:
        return _html(render_login("enter an API token"), 401)
    ctx = _context(request)
    try:
        principal = await run_in_threadpool(check_token, ctx, token)
        cookie = await run_in_threadpool(new_session, ctx, principal)
    except AuthenticationError as e:
        return _html(render_login(f"sign-in refused: {e}"), 401)
    except PermissionError as e:
        return _html(render_login(f"sign-in refused: {e}"), 403)
    response = RedirectResponse("/", status_code=303, headers={"Cache-Control": "no-store"})
    response.set_cookie(COOKIE_NAME, cookie, path="/", httponly=True, samesite="strict",
                        secure=_secure(request),
                        max_age=int(_session_lifetime(ctx).total_seconds()))
    return response


@router.post("/logout", include_in_schema=False, response_model=None)
def logout(request: Request) -> HTMLResponse | RedirectResponse:
    if not same_origin(request):
        return _html(render_login("cross-site sign-out refused"), 403)
    return _to_login(True, request)


@dataclass(frozen=True)
class _StaticFile:
    content: bytes
    etag: str
    media_type: str


@lru_cache(maxsize=len(STATIC_FILES))
def _static_file(name: str) -> _StaticFile:
    content = (STATIC_DIR / name).read_bytes()
    etag = '"' + hashlib.sha256(content).hexdigest()[:32] + '"'
    return _StaticFile(content, etag, STATIC_FILES[name])


@router.get("/static/{name}", include_in_schema=False)
def static(name: str, request: Request) -> Response:
    """One of the dashboard's few static files (a fixed list; revalidated by ETag)."""
    if name not in STATIC_FILES:
        raise HTTPException(404, f"no static file {name!r}")
    file = _static_file(name)
    headers = {"ETag": file.etag, "Cache-Control": "no-cache",
               "X-Content-Type-Options": "nosniff"}
    if file.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(file.content, media_type=file.media_type, headers=headers)
