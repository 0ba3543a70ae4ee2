"""The operator dashboard: sign-in, the data it shows, escaping, and a real headless browser.

A realistic rollout without agents: devices are enrolled and the release is
published and deployed through the real CLI against a running server; the
devices' progress (what their signed reports would do) is then written to the
database directly, back-dated so the chart has a history.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from browser_support import artifacts_dir, chromium, require_browser, severe_console_entries
from server_support import RunningServer, running_server
from sqlalchemy import func, select

from edgeota.server.api.routes.dashboard import COOKIE_NAME, STATIC_FILES
from edgeota.server.db.models import (
    Assignment,
    AssignmentState,
    AuditEntry,
    Deployment,
    DeploymentEvent,
    Device,
    StatusEvent,
)
from edgeota.server.home import HomeOptions
from edgeota.server.services.dashboard import (
    MAX_AUDIT_ENTRIES,
    MAX_CHART_POINTS,
    fleet_overview,
    progress_series,
)
from edgeota.server.tokens import Role, issue_token, revoke

LAB = [f"pi-{i}" for i in range(1, 7)]
EVIL_DEVICE = "pi-evil"
EVIL_TAG = "<script>alert('tag')</script>"
EVIL_REASON = "<img src=x onerror=alert(1)> validation: golden accuracy 0.71 < 0.90"
HISTORY = timedelta(minutes=30)
BROWSER_TIMEOUT = 20  # seconds for any one browser wait


@dataclass(frozen=True)
class Rollout:
    deployment_id: int
    phase0: list[str]  # [installed, failed, pending] devices of the first phase
    viewer: str


def _telemetry(version: str) -> dict:
    return {"v": 1, "received_at": datetime.now(UTC).isoformat(), "models": {
        "digits": {"version": version, "inferences": 120, "errors": 0,
                   "p50_ms": 0.4, "p95_ms": 0.9, "p99_ms": 1.2}}}


def mark_installed(server: RunningServer, device_id: str, at: datetime) -> None:
    """What a device's ``committed`` report does to its assignment and device row."""
    with server.ctx.sessions() as session, session.begin():
        assignment = session.scalars(select(Assignment).where(
            Assignment.device_id == device_id,
            Assignment.state != AssignmentState.SUPERSEDED)).one()
        assignment.state = AssignmentState.INSTALLED
        assignment.detail = None
        assignment.finished_at = at
        assignment.updated_at = at
        device = session.get(Device, device_id)
        device.online = True
        device.last_seen = at
        device.reported_state = {"state": "committed", "release": "digits@1.0.0",
                                 "progress": None, "error": None, "seq": 3,
                                 "telemetry": _telemetry("1.0.0")}


def mark_failed(server: RunningServer, device_id: str, at: datetime, reason: str) -> None:
    with server.ctx.sessions() as session, session.begin():
        assignment = session.scalars(select(Assignment).where(
            Assignment.device_id == device_id)).one()
        assignment.state = AssignmentState.FAILED
        assignment.detail = reason
        assignment.finished_at = at
        assignment.updated_at = at
        device = session.get(Device, device_id)
        device.online = True
        device.last_seen = at
        device.reported_state = {"state": "failed", "release": "digits@1.0.0",
                                 "progress": None, "error": reason, "seq": 2}


@pytest.fixture
def rollout(server: RunningServer) -> Rollout:
    """Six lab devices deployed in phases 50,100; of phase 1: one installed, one failed."""
    for device_id in LAB:
        server.enroll(device_id, "rpi4", "site=lab")
    server.enroll(EVIL_DEVICE, "rpi5", f"note={EVIL_TAG}")
    assert server.publish("digits_v1", "1.0.0").code == 0
    # A long soak and no failure limit or gates: should the rollout engine run,
    # it leaves this state alone.
    deploy = server.cli("deploy", "digits@1.0.0", "--tag", "site=lab", "--phases", "50,100",
                        "--soak", "1h", "--max-failure-ratio", "1", "--latency-factor", "0",
                        "--error-rate-factor", "0", "--json")
    assert deploy.code == 0, deploy.err
    answer = json.loads(deploy.out)
    deployment_id = answer["deployment_id"]
    phase0 = sorted(answer["assigned"])
    assert len(phase0) == 3

    # Back-date the deployment so the progress chart has half an hour of history.
    with server.ctx.sessions() as session, session.begin():
        deployment = session.get(Deployment, deployment_id)
        start = deployment.created_at - HISTORY
        deployment.created_at = start
        deployment.phase_started_at = start
        for event in session.scalars(select(DeploymentEvent).where(
                DeploymentEvent.deployment_id == deployment_id)):
            event.at = start
        for assignment in session.scalars(select(Assignment).where(
                Assignment.deployment_id == deployment_id, Assignment.phase == 0)):
            assignment.assigned_at = start
    mark_installed(server, phase0[0], start + timedelta(minutes=8))
    mark_failed(server, phase0[1], start + timedelta(minutes=12), EVIL_REASON)
    return Rollout(deployment_id, phase0, server.token(Role.VIEWER, "dashboard-viewer"))


def client(server: RunningServer, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=server.url, headers=headers, follow_redirects=False,
                        timeout=30)


def dashboard_json(server: RunningServer, token: str) -> dict:
    with client(server, token) as http:
        response = http.get("/dashboard/data")
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    return response.json()


# -- sign-in -----------------------------------------------------------------------------


def test_sign_in_sets_an_http_only_cookie_and_guards_the_pages(server: RunningServer) -> None:
    viewer = server.token(Role.VIEWER)
    with client(server) as http:
        # Nobody signed in: the page sends to the form, the data says 401.
        page = http.get("/")
        assert page.status_code == 303
        assert page.headers["location"] == "/login"
        data = http.get("/dashboard/data")
        assert data.status_code == 401
        assert data.headers["www-authenticate"] == "Bearer"
        assert "sign in" in data.json()["detail"]
        form = http.get("/login")
        assert form.status_code == 200
        assert 'name="token"' in form.text and 'action="/login"' in form.text

        bad = http.post("/login", data={"token": "eot_not-a-real-token"})
        assert bad.status_code == 401
        assert "sign-in refused: unknown API token" in bad.text
        assert "set-cookie" not in bad.headers
        malformed = http.post("/login", data={"token": "hunter2"})
        assert malformed.status_code == 401
        assert "malformed API token" in malformed.text
        assert "hunter2" not in malformed.text  # a presented secret is never echoed

        good = http.post("/login", data={"token": viewer})
        assert good.status_code == 303
        assert good.headers["location"] == "/"
        cookie = good.headers["set-cookie"]
        # A signed session, never the token itself: a leaked cookie is no API credential.
        assert cookie.startswith(f"{COOKIE_NAME}=eos1.") and viewer not in cookie
        attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
        assert {"httponly", "path=/", "samesite=strict"} <= attributes
        assert "secure" not in attributes  # plain http on loopback
        session = http.cookies.get(COOKIE_NAME)
        assert session is not None and session.startswith("eos1.")
        as_bearer = http.get("/api/v1/whoami", headers={"Authorization": f"Bearer {session}"})
        assert as_bearer.status_code == 401

        page = http.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert page.headers["x-frame-options"] == "DENY"
        assert "test-viewer (viewer)" in page.text
        assert http.get("/dashboard/data").status_code == 200

        out = http.post("/logout")
        assert out.status_code == 303
        assert out.headers["location"] == "/login"
        assert out.headers["set-cookie"].startswith(f'{COOKIE_NAME}="";')
        assert COOKIE_NAME not in http.cookies
        assert http.get("/").status_code == 303
        assert http.get("/dashboard/data").status_code == 401


def test_sign_in_refuses_devices_revoked_tokens_and_odd_forms(server: RunningServer) -> None:
    server.enroll("pi-1")
    with server.ctx.sessions() as session, session.begin():
        _, device_token = issue_token(session, name="pi-1-extra", role=Role.DEVICE,
                                      device_id="pi-1")
        revoked_row, revoked = issue_token(session, name="gone", role=Role.ADMIN)
        revoke(session, revoked_row.id)
    with client(server) as http:
        device = http.post("/login", data={"token": device_token})
        assert device.status_code == 403
        assert "has role device; the dashboard needs viewer or higher" in device.text
        gone = http.post("/login", data={"token": revoked})
        assert gone.status_code == 401
        assert "has been revoked" in gone.text
        empty = http.post("/login", data={"token": " "})
        assert empty.status_code == 401
        as_json = http.post("/login", json={"token": revoked})
        assert as_json.status_code == 415
        huge = http.post("/login", content=b"token=" + b"a" * 10_000,
                         headers={"content-type": "application/x-www-form-urlencoded"})
        assert huge.status_code == 413

        # A bearer header works without the cookie; a device's does not.
        assert http.get("/dashboard/data",
                        headers={"Authorization": f"Bearer {device_token}"}).status_code == 401
        viewer = server.token(Role.VIEWER)
        assert http.get("/", headers={"Authorization": f"Bearer {viewer}"}).status_code == 200

        # A session whose token was revoked later: sent to the form, the cookie cleared.
        with server.ctx.sessions() as session, session.begin():
            later_row, later = issue_token(session, name="later", role=Role.VIEWER)
        assert http.post("/login", data={"token": later}).status_code == 303
        assert http.get("/").status_code == 200
        with server.ctx.sessions() as session, session.begin():
            revoke(session, later_row.id)
        stale = http.get("/")
        assert stale.status_code == 303
        assert stale.headers["location"] == "/login"
        assert stale.headers["set-cookie"].startswith(f'{COOKIE_NAME}="";')
        assert http.get("/dashboard/data").status_code == 401


# -- data --------------------------------------------------------------------------------


def test_dashboard_data_matches_the_database(server: RunningServer, rollout: Rollout) -> None:
    data = dashboard_json(server, rollout.viewer)
    installed, failed, pending = rollout.phase0

    fleet = data["fleet"]
    assert fleet["total"] == len(LAB) + 1
    assert (fleet["online"], fleet["offline"], fleet["disabled"]) == (2, len(LAB) - 1, 0)
    assert [d["id"] for d in fleet["devices"]] == sorted([*LAB, EVIL_DEVICE])
    by_version = {c["label"]: c["count"] for c in fleet["by_version"]}
    assert by_version == {"digits@1.0.0": 1, "none": len(LAB)}
    by_state = {c["label"]: c["count"] for c in fleet["by_state"]}
    assert by_state == {"committed": 1, "failed": 1, "no report": len(LAB) - 1}
    row = {d["id"]: d for d in fleet["devices"]}
    assert row[installed]["serving"] == ["digits@1.0.0"]
    assert row[installed]["online"] is True
    assert row[failed]["error"] == EVIL_REASON
    assert row[EVIL_DEVICE]["tags"] == {"note": EVIL_TAG}

    (view,) = data["rollouts"]
    assert view["id"] == rollout.deployment_id
    assert view["release"] == "digits@1.0.0"
    assert (view["status"], view["current_phase"], view["phases"]) == ("active", 0, [50, 100])
    with server.ctx.sessions() as session:
        states = Counter(
            state.value for state in session.scalars(select(Assignment.state).where(
                Assignment.deployment_id == rollout.deployment_id)))
        per_phase = Counter(
            (phase, state.value) for phase, state in session.execute(
                select(Assignment.phase, Assignment.state).where(
                    Assignment.deployment_id == rollout.deployment_id)))
        audit_count = session.scalar(select(func.count()).select_from(AuditEntry))
        newest_audit = session.scalar(select(func.max(AuditEntry.id)))
        event_kinds = list(session.scalars(
            select(DeploymentEvent.kind).where(
                DeploymentEvent.deployment_id == rollout.deployment_id)
            .order_by(DeploymentEvent.id)))
    assert view["counts"] == {s.value: states.get(s.value, 0) for s in AssignmentState}
    assert view["counts"]["installed"] == 1 and view["counts"]["failed"] == 1
    assert view["counts"]["pending"] == 1 and view["counts"]["waiting"] == 3
    for phase in view["phase_views"]:
        assert phase["counts"] == {s.value: per_phase.get((phase["index"], s.value), 0)
                                   for s in AssignmentState}
    assert [p["started"] for p in view["phase_views"]] == [True, False]
    assert sorted(a["device_id"] for a in view["devices"]) == LAB
    assert {a["device_id"]: a["state"] for a in view["devices"]}[pending] == "pending"
    assert [e["kind"] for e in view["events"]] == event_kinds
    assert "phase 1 (50%) started: 3 device(s)" in [e["summary"] for e in view["events"]]

    series = view["series"]
    assert len(series["t"]) == len(series["installed"]) == len(series["assigned"])
    assert series["t"] == sorted(series["t"])
    assert (series["assigned"][-1], series["installed"][-1], series["failed"][-1],
            series["rolled_back"][-1]) == (3, 1, 1, 0)
    # The installation happened 8 minutes in, the failure 12 minutes in.
    start = series["t"][0]
    first_installed = series["t"][series["installed"].index(1)]
    first_failed = series["t"][series["failed"].index(1)]
    assert (first_installed - start, first_failed - start) == (480, 720)

    (failure,) = data["failures"]
    assert failure == {"reason": EVIL_REASON, "state": "failed", "count": 1,
                       "devices": [failed], "deployments": [rollout.deployment_id]}

    audit = data["audit"]
    assert len(audit) == min(audit_count, MAX_AUDIT_ENTRIES)
    assert audit[0]["id"] == newest_audit
    assert [a["id"] for a in audit] == sorted((a["id"] for a in audit), reverse=True)
    assert "deploy" in [a["action"] for a in audit]


def test_everything_from_the_database_is_escaped(server: RunningServer,
                                                 rollout: Rollout) -> None:
    with client(server, rollout.viewer) as http:
        page = http.get("/")
    assert page.status_code == 200
    body = page.text
    # No markup from the database survives, neither in the HTML nor in the embedded JSON.
    assert "<script>alert" not in body
    assert "<img src=x" not in body
    assert "&lt;script&gt;alert(&#x27;tag&#x27;)&lt;/script&gt;" in body
    assert "&lt;img src=x onerror=alert(1)&gt; validation" in body
    embedded = re.search(r'<script type="application/json" id="dashboard-data"[^>]*>(.*?)'
                         r"</script>", body, re.S)
    assert embedded is not None
    assert "\\u003cscript\\u003e" in embedded.group(1)
    assert json.loads(embedded.group(1))["fleet"]["total"] == len(LAB) + 1
    # The only <script> elements are the page's own.
    assert re.findall(r"<script[^>]*>", body) == [
        '<script src="/static/uPlot.iife.min.js" defer>',
        '<script src="/static/dashboard.js" defer>',
        '<script type="application/json" id="dashboard-data" data-poll-ms="2000">',
    ]


def test_static_files_are_a_fixed_list_with_their_media_types(server: RunningServer) -> None:
    expected = {"dashboard.css": "text/css", "dashboard.js": "text/javascript",
                "uPlot.iife.min.js": "text/javascript", "uPlot.min.css": "text/css"}
    assert set(STATIC_FILES) == set(expected)
    with client(server) as http:  # no credentials: these are public files
        for name, media_type in expected.items():
            response = http.get(f"/static/{name}")
            assert response.status_code == 200, name
            assert response.headers["content-type"].split(";")[0] == media_type
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["cache-control"] == "no-cache"
            etag = response.headers["etag"]
            again = http.get(f"/static/{name}", headers={"If-None-Match": etag})
            assert again.status_code == 304
            assert again.content == b""
        assert b"uPlot" in http.get("/static/uPlot.iife.min.js").content
        for name in ("uPlot.LICENSE", "README.md", "..%2Froutes%2Fdashboard.py",
                     "dashboard.JS", "nothing.js"):
            assert http.get(f"/static/{name}").status_code == 404, name
        assert http.get("/static/../api/app.py").status_code == 404


# -- the snapshot's parts ------------------------------------------------------------------


def test_serving_version_comes_from_telemetry_else_the_last_commit(db_session) -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)

    def device(device_id: str, state: dict | None, commits: list[str]) -> None:
        db_session.add(Device(id=device_id, hardware="rpi4", tags={}, identity={},
                              reported_state=state))
        db_session.flush()
        for seq, release in enumerate(commits, start=1):
            db_session.add(StatusEvent(device_id=device_id, received_at=t0, seq=seq,
                                       state="committed", release=release, detail={}))
        db_session.flush()

    # Updating to 2.0.0 right now: still serving what it committed before.
    device("busy", {"state": "downloading", "release": "digits@2.0.0"}, ["digits@1.0.0"])
    # Telemetry says what is loaded, whatever the reports said.
    device("measured", {"state": "probation", "release": "digits@2.0.0",
                        "telemetry": _telemetry("2.0.0")}, ["digits@1.0.0"])
    # Went to 2.0.0 and was rolled back to 1.0.0 by the server: the newest commit counts.
    device("reverted", {"state": "idle", "release": None},
           ["digits@1.0.0", "digits@2.0.0", "digits@1.0.0", "other@3.1.0"])
    device("silent", None, [])
    db_session.commit()

    fleet = fleet_overview(db_session)
    serving = {d.id: d.serving for d in fleet.devices}
    assert serving == {"busy": ["digits@1.0.0"], "measured": ["digits@2.0.0"],
                       "reverted": ["digits@1.0.0", "other@3.1.0"], "silent": []}
    assert {c.label: c.count for c in fleet.by_version} == {
        "digits@1.0.0": 2, "digits@2.0.0": 1, "other@3.1.0": 1, "none": 1}
    assert {c.label: c.count for c in fleet.by_state} == {
        "downloading": 1, "probation": 1, "idle": 1, "no report": 1}


def test_progress_series_is_cumulative_and_bounded() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    outcomes = [AssignmentState.INSTALLED] * 1500 + [AssignmentState.FAILED] * 300 + \
        [AssignmentState.ROLLED_BACK] * 100 + [AssignmentState.PENDING] * 50 + \
        [AssignmentState.SUPERSEDED] * 50
    assignments = [
        Assignment(state=state, assigned_at=start + timedelta(seconds=i),
                   finished_at=start + timedelta(seconds=i + 30),
                   updated_at=start + timedelta(seconds=i + 30))
        for i, state in enumerate(outcomes)
    ]
    end = start + timedelta(hours=2)
    series = progress_series(assignments, start, end)
    assert len(series.t) <= MAX_CHART_POINTS
    assert series.t[0] == start.timestamp() and series.t[-1] == end.timestamp()
    for values in (series.assigned, series.installed, series.failed, series.rolled_back):
        assert values == sorted(values)  # cumulative: never goes down
    assert (series.assigned[-1], series.installed[-1], series.failed[-1],
            series.rolled_back[-1]) == (1950, 1500, 300, 100)

    empty = progress_series([], start, start)
    assert empty.t == [start.timestamp()] and empty.installed == [0]


# -- a real browser ----------------------------------------------------------------------


def test_dashboard_in_headless_chromium(server: RunningServer, rollout: Rollout) -> None:
    require_browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    _installed, failed, pending = rollout.phase0
    with chromium() as driver:
        wait = WebDriverWait(driver, BROWSER_TIMEOUT)
        driver.get(server.url + "/")
        wait.until(ec.url_to_be(server.url + "/login"))

        # A wrong token first: the form comes back with the reason.
        driver.find_element(By.ID, "token").send_keys("eot_wrong")
        driver.find_element(By.ID, "sign-in").click()
        error = wait.until(ec.presence_of_element_located((By.ID, "login-error")))
        assert "unknown API token" in error.text
        # The refused sign-in answers 401, which Chromium logs as a failed load; that
        # one is expected, and reading the log clears it for the checks below.
        refused = severe_console_entries(driver)
        assert all("/login" in e["message"] and "401" in e["message"] for e in refused), refused

        driver.find_element(By.ID, "token").send_keys(rollout.viewer)
        driver.find_element(By.ID, "sign-in").click()
        wait.until(ec.url_to_be(server.url + "/"))
        # The script took over (live) and uPlot drew the rollout's chart.
        wait.until(ec.text_to_be_present_in_element((By.ID, "live"), "live"))
        chart = f"#chart-{rollout.deployment_id} canvas"
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, chart)))
        assert driver.find_element(By.CSS_SELECTOR, chart).size["width"] > 200
        assert driver.get_cookie(COOKIE_NAME)["httpOnly"] is True
        assert driver.execute_script("return document.cookie") == ""

        article = driver.find_element(By.ID, f"rollout-{rollout.deployment_id}")
        for device_id in LAB:
            assert device_id in article.text
        progress = driver.find_element(By.ID, f"progress-{rollout.deployment_id}")
        assert progress.text.startswith("installed 1 of 6 (17%) · failed 1")
        assert "phase 1/2" in article.text
        fleet = driver.find_element(By.ID, "fleet").text
        assert f"note={EVIL_TAG}" in fleet  # shown as text, not run
        failures = driver.find_element(By.ID, "failures").text
        assert EVIL_REASON in failures and failed in failures
        assert "deploy" in driver.find_element(By.ID, "audit").text

        # One more device commits: the page shows it without a reload.
        mark_installed(server, pending, datetime.now(UTC))
        wait.until(ec.text_to_be_present_in_element(
            (By.ID, f"progress-{rollout.deployment_id}"), "installed 2 of 6 (33%)"))
        wait.until(ec.text_to_be_present_in_element(
            (By.CSS_SELECTOR, "#fleet .stat-on .stat-value"), "3"))
        # The chart survived the refresh (updated in place, not rebuilt).
        assert len(driver.find_elements(By.CSS_SELECTOR, chart)) == 1

        driver.execute_script("window.scrollTo(0, 0)")
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1400, min(max(height + 200, 900), 4000))
        shot = artifacts_dir() / f"dashboard-{server.ctx.engine.dialect.name}.png"
        assert driver.save_screenshot(str(shot))
        if server.ctx.engine.dialect.name == "sqlite":
            (artifacts_dir() / "dashboard.png").write_bytes(shot.read_bytes())
        assert shot.stat().st_size > 10_000

        severe = severe_console_entries(driver)
        assert severe == [], severe


def test_sign_in_and_out_refuse_cross_site_posts_and_forged_sessions(
    server: RunningServer,
) -> None:
    viewer = server.token(Role.VIEWER)
    with client(server) as http:
        for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"},
                        {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                        {"Sec-Fetch-Site": "cross-site", "Origin": server.url}):
            refused = http.post("/login", data={"token": viewer}, headers=headers)
            assert refused.status_code == 403, headers
            assert "cross-site sign-in refused" in refused.text
            assert "set-cookie" not in refused.headers
        # The browser's own form: Sec-Fetch-Site same-origin, or an Origin naming this site.
        assert http.post("/login", data={"token": viewer},
                         headers={"Sec-Fetch-Site": "same-origin"}).status_code == 303
        assert http.post("/login", data={"token": viewer},
                         headers={"Origin": server.url}).status_code == 303
        # Another site cannot sign the browser out either.
        out = http.post("/logout", headers={"Origin": "https://evil.example"})
        assert out.status_code == 403 and "set-cookie" not in out.headers
        assert http.get("/").status_code == 200

        session = http.cookies[COOKIE_NAME]
        prefix, token_id, expires, nonce, mac = session.split(".")
        for forged in (f"{prefix}.{token_id}.{int(expires) + 86400}.{nonce}.{mac}",
                       f"{prefix}.{token_id}.{expires}.{nonce}.{'0' * len(mac)}",
                       viewer):  # the raw token is no session either
            answer = httpx.get(f"{server.url}/dashboard/data", cookies={COOKIE_NAME: forged})
            assert answer.status_code == 401, forged
        # A session lasts [http] session_hours, judged by the server's clock.
        real_clock = server.ctx.clock
        later = datetime.now(UTC) + timedelta(hours=server.config.http_limits.session_hours)
        server.ctx.set_clock(lambda: later)
        try:
            expired = http.get("/dashboard/data")
            assert expired.status_code == 401 and "expired" in expired.json()["detail"]
        finally:
            server.ctx.set_clock(real_clock)
        assert http.get("/dashboard/data").status_code == 200


def test_session_cookie_is_secure_when_the_public_url_is_https(
    tmp_path: Path, db_url: str,
) -> None:
    options = HomeOptions(bin_bits=4, public_url="https://ota.example")
    with running_server(tmp_path, db_url, options) as server:
        viewer = server.token(Role.VIEWER)
        with client(server) as http:
            good = http.post("/login", data={"token": viewer},
                             headers={"Origin": "https://ota.example"})
            assert good.status_code == 303
            attributes = {part.strip().lower()
                          for part in good.headers["set-cookie"].split(";")[1:]}
            assert {"secure", "httponly", "samesite=strict"} <= attributes
