"""What the operator dashboard shows, read from the database in one pass.

:func:`dashboard_data` builds a :class:`DashboardData` snapshot: the fleet
(devices by serving version and by reported state, online counts), each
rollout's phases, per-state counts and progress over time, the failure
reasons, and the tail of the audit log. It only reads; the page at ``/`` and
the JSON at ``/dashboard/data`` (polled by the page for live refresh) are
both rendered from the same snapshot, so they cannot disagree.

Every value in the snapshot is JSON-native (str, int, float, bool, None,
lists, dicts) and every instant is an ISO-8601 UTC string (chart x values are
Unix seconds, what uPlot expects), so :meth:`DashboardData.to_json` is just
:func:`dataclasses.asdict`. Every list has a bound: the page is polled every
few seconds, and a fleet of many thousands of devices must not turn each poll
into megabytes.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgeota.server.db.models import (
    Assignment,
    AssignmentState,
    AuditEntry,
    Deployment,
    DeploymentEvent,
    Device,
    Release,
    StatusEvent,
)

__all__ = [
    "ASSIGNMENT_STATES",
    "MAX_AUDIT_ENTRIES",
    "MAX_CHART_POINTS",
    "MAX_DEVICE_ROWS",
    "MAX_ROLLOUTS",
    "AssignmentRow",
    "AuditRow",
    "Count",
    "DashboardData",
    "DeviceRow",
    "EventRow",
    "FailureGroup",
    "FleetOverview",
    "PhaseView",
    "ProgressSeries",
    "RolloutView",
    "dashboard_data",
]

MAX_DEVICE_ROWS = 500  # rows of the fleet table (the counts cover every device)
MAX_ROLLOUTS = 10  # newest deployments shown
MAX_ROLLOUT_DEVICE_ROWS = 200  # device rows per rollout (the counts cover every device)
MAX_EVENTS = 100  # newest events per rollout
MAX_CHART_POINTS = 600  # points per progress series, evenly thinned beyond
MAX_FAILURE_GROUPS = 50
MAX_FAILURE_ROWS = 5000  # newest failed assignments aggregated
MAX_DEVICES_PER_REASON = 20
MAX_AUDIT_ENTRIES = 50
MAX_TEXT = 300  # characters of a reason, an event summary or an audit detail

# Columns of the per-phase table, in lifecycle order.
ASSIGNMENT_STATES: tuple[str, ...] = tuple(state.value for state in AssignmentState)
_FAILED_STATES = (AssignmentState.FAILED, AssignmentState.ROLLED_BACK)
NO_REPORT = "no report"
UNKNOWN_VERSION = "unknown"


@dataclass(frozen=True)
class Count:
    label: str
    count: int


@dataclass(frozen=True)
class DeviceRow:
    id: str
    hardware: str
    tags: dict[str, str]
    serving: list[str]  # "name@version" per model the device serves
    state: str  # the agent's last reported state, or NO_REPORT
    release: str | None  # the release that state is about
    error: str | None
    online: bool
    disabled: bool
    last_seen: str | None


@dataclass(frozen=True)
class FleetOverview:
    total: int
    online: int
    offline: int
    disabled: int
    by_version: list[Count]
    by_state: list[Count]
    devices: list[DeviceRow]  # at most MAX_DEVICE_ROWS, by id


@dataclass(frozen=True)
class AssignmentRow:
    device_id: str
    phase: int
    state: str
    detail: str | None
    assigned_at: str | None
    finished_at: str | None


@dataclass(frozen=True)
class PhaseView:
    index: int
    percent: int
    started: bool
    devices: int
    counts: dict[str, int]  # assignment state -> devices, every state present


@dataclass(frozen=True)
class EventRow:
    at: str
    t: float  # Unix seconds, for chart markers
    kind: str
    actor: str
    summary: str


@dataclass(frozen=True)
class ProgressSeries:
    """Cumulative device counts over time; ``t`` in Unix seconds, step-shaped."""

    t: list[float] = field(default_factory=list)
    assigned: list[int] = field(default_factory=list)
    installed: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    rolled_back: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class RolloutView:
    id: int
    release: str
    model_name: str
    status: str
    status_reason: str | None
    selector: str
    current_phase: int
    phases: list[int]
    created_at: str
    created_by: str
    finished_at: str | None
    total: int
    counts: dict[str, int]  # assignment state -> devices over all phases
    phase_views: list[PhaseView]
    devices: list[AssignmentRow]  # at most MAX_ROLLOUT_DEVICE_ROWS, by phase then id
    series: ProgressSeries
    events: list[EventRow]  # oldest first, the newest MAX_EVENTS


@dataclass(frozen=True)
class FailureGroup:
    reason: str
    state: str
    count: int
    devices: list[str]  # at most MAX_DEVICES_PER_REASON
    deployments: list[int]


@dataclass(frozen=True)
class AuditRow:
    id: int
    recorded_at: str
    actor: str
    action: str
    subject: str
    detail: str


@dataclass(frozen=True)
class DashboardData:
    generated_at: str
    fleet: FleetOverview
    rollouts: list[RolloutView]
    failures: list[FailureGroup]
    audit: list[AuditRow]
    assignment_states: list[str] = field(default_factory=lambda: list(ASSIGNMENT_STATES))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def iso(instant: datetime | None) -> str | None:
    """``2025-01-02T10:03:04Z``: second precision is what a person reads."""
    if instant is None:
        return None
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _clip(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def dashboard_data(session: Session, now: datetime) -> DashboardData:
    """The whole dashboard as of ``now`` (read-only; the caller owns the transaction)."""
    return DashboardData(
        generated_at=iso(now) or "",
        fleet=fleet_overview(session),
        rollouts=rollout_views(session, now),
        failures=failure_groups(session),
        audit=audit_tail(session),
    )


# -- fleet -------------------------------------------------------------------------------


def _serving(device: Device, state: Mapping[str, Any],
             known: Mapping[str, Mapping[str, str]]) -> list[str]:
    """What the device runs, per model: its telemetry, else what it last committed.

    Telemetry names the versions actually loaded. Without it, ``known`` (the
    newest committed report per model, else the newest installed assignment)
    is the best knowledge there is; the current report is newer still when it
    is a commit.
    """
    telemetry = state.get("telemetry")
    models = telemetry.get("models") if isinstance(telemetry, dict) else None
    if isinstance(models, dict) and models:
        serving = {}
        for name, info in models.items():
            version = info.get("version") if isinstance(info, dict) else None
            serving[str(name)] = f"{name}@{version or UNKNOWN_VERSION}"
    else:
        serving = dict(known.get(device.id, {}))
        release = state.get("release")
        if state.get("state") == "committed" and isinstance(release, str) and "@" in release:
            serving[release.partition("@")[0]] = release
    return [serving[name] for name in sorted(serving)]


def _known_releases(session: Session) -> dict[str, dict[str, str]]:
    """device id -> model name -> ``name@version`` it last committed (or installed).

    From the newest ``committed`` status report per device and release (a
    rollback ends in the previous release's commit or keeps it serving), and,
    for devices without reports, the newest installed assignment.
    """
    known: dict[str, dict[str, str]] = {}
    assignments = session.execute(
        select(Assignment.device_id, Assignment.model_name, Release.name, Release.version)
        .join(Release, Release.id == Assignment.release_id)
        .where(Assignment.state == AssignmentState.INSTALLED)
        .order_by(Assignment.finished_at.is_(None), Assignment.finished_at, Assignment.id)
    )
    for device_id, model_name, name, version in assignments:
        known.setdefault(device_id, {})[model_name] = f"{name}@{version}"
    newest = (
        select(func.max(StatusEvent.id))
        .where(StatusEvent.state == "committed", StatusEvent.release.is_not(None))
        .group_by(StatusEvent.device_id, StatusEvent.release)
    )
    commits = session.execute(
        select(StatusEvent.device_id, StatusEvent.release)
        .where(StatusEvent.id.in_(newest)).order_by(StatusEvent.id)
    )
    for device_id, release in commits:
        # The query drops NULL releases; the check narrows the column's type.
        if release is not None and "@" in release:
            known.setdefault(device_id, {})[release.partition("@")[0]] = release
    return known


def _text(value: object) -> str | None:
    return _clip(str(value)) if value not in (None, "") else None


def fleet_overview(session: Session) -> FleetOverview:
    known = _known_releases(session)
    rows: list[DeviceRow] = []
    by_version: Counter[str] = Counter()
    by_state: Counter[str] = Counter()
    total = online = disabled = 0
    for device in session.scalars(select(Device).order_by(Device.id)):
        total += 1
        state = device.reported_state if isinstance(device.reported_state, dict) else {}
        serving = _serving(device, state, known)
        by_version.update(serving or ["none"])
        state_name = str(state.get("state") or NO_REPORT)
        by_state[state_name] += 1
        online += bool(device.online)
        disabled += bool(device.disabled)
        if len(rows) < MAX_DEVICE_ROWS:
            release = state.get("release")
            rows.append(DeviceRow(
                id=device.id,
                hardware=device.hardware,
                tags={str(k): str(v) for k, v in (device.tags or {}).items()},
                serving=serving,
                state=state_name,
                release=release if isinstance(release, str) else None,
                error=_text(state.get("error")),
                online=bool(device.online),
                disabled=bool(device.disabled),
                last_seen=iso(device.last_seen),
            ))
    return FleetOverview(
        total=total,
        online=online,
        offline=total - online,
        disabled=disabled,
        by_version=_counts(by_version),
        by_state=_counts(by_state),
        devices=rows,
    )


def _counts(counter: Counter[str]) -> list[Count]:
    return [Count(label, n) for label, n in sorted(counter.items(), key=lambda i: (-i[1], i[0]))]


# -- rollouts ----------------------------------------------------------------------------


def _selector_text(selector: Mapping[str, Any]) -> str:
    if selector.get("devices"):
        return "devices " + ", ".join(map(str, selector["devices"]))
    tags = selector.get("tags") or {}
    if tags:
        return "tags " + ", ".join(f"{k}={v}" for k, v in sorted(tags.items()))
    return "all devices"


def _event_summary(kind: str, detail: Mapping[str, Any]) -> str:
    """One readable line per event; the full detail stays in the API and the audit log."""
    if kind == "phase_started" and "phase" in detail:
        devices = detail.get("devices") or []
        return (f"phase {int(detail['phase']) + 1} ({detail.get('percent')}%) started: "
                f"{len(devices)} device(s)")
    if "reason" in detail:
        return _clip(str(detail["reason"]))
    if kind == "rolled_back" and "devices" in detail:
        devices = detail.get("devices") or []
        return _clip(f"{len(devices)} device(s) rolled back: {', '.join(map(str, devices))}")
    parts = []
    for key, value in detail.items():
        if isinstance(value, list | dict) and not value:
            value = "-"
        elif isinstance(value, list):
            value = f"{len(value)} items" if len(value) > 5 else ", ".join(map(str, value))
        elif isinstance(value, dict):
            value = f"{len(value)} items"
        parts.append(f"{key}: {value}")
    return _clip("; ".join(parts))


def _thin(points: list[tuple[float, int, int, int, int]]) -> list[tuple[float, int, int, int, int]]:
    """At most MAX_CHART_POINTS points: evenly spaced picks, always keeping the last."""
    if len(points) <= MAX_CHART_POINTS:
        return points
    step = len(points) / (MAX_CHART_POINTS - 1)
    picked = [points[int(i * step)] for i in range(MAX_CHART_POINTS - 1)]
    return [*picked, points[-1]]


def progress_series(assignments: Iterable[Assignment], start: datetime,
                    end: datetime) -> ProgressSeries:
    """Cumulative assigned / installed / failed / rolled-back devices from ``start`` to ``end``.

    A device counts as assigned from its ``assigned_at``, and in its final
    state from its ``finished_at`` (the state it is in now: a device that
    installed and was later rolled back counts as rolled back).
    """
    changes: dict[float, list[int]] = {}

    def bump(instant: datetime | None, column: int) -> None:
        if instant is not None:
            changes.setdefault(instant.timestamp(), [0, 0, 0, 0])[column] += 1

    columns = {AssignmentState.INSTALLED: 1, AssignmentState.FAILED: 2,
               AssignmentState.ROLLED_BACK: 3}
    for assignment in assignments:
        if assignment.state == AssignmentState.SUPERSEDED:
            continue
        bump(assignment.assigned_at, 0)
        column = columns.get(assignment.state)
        if column is not None:
            bump(assignment.finished_at or assignment.updated_at, column)
    totals = [0, 0, 0, 0]
    points: list[tuple[float, int, int, int, int]] = [(start.timestamp(), 0, 0, 0, 0)]
    for t in sorted(changes):
        totals = [a + b for a, b in zip(totals, changes[t], strict=True)]
        assigned, installed, failed, rolled_back = totals
        point = (max(t, start.timestamp()), assigned, installed, failed, rolled_back)
        if point[0] == points[-1][0]:
            points[-1] = point
        else:
            points.append(point)
    if end.timestamp() > points[-1][0]:
        points.append((end.timestamp(), *points[-1][1:]))
    points = _thin(points)
    return ProgressSeries(
        t=[round(p[0], 3) for p in points],
        assigned=[p[1] for p in points],
        installed=[p[2] for p in points],
        failed=[p[3] for p in points],
        rolled_back=[p[4] for p in points],
    )


def _assignment_row(assignment: Assignment) -> AssignmentRow:
    return AssignmentRow(
        device_id=assignment.device_id,
        phase=assignment.phase,
        state=assignment.state.value,
        detail=_text(assignment.detail),
        assigned_at=iso(assignment.assigned_at),
        finished_at=iso(assignment.finished_at),
    )


def _rollout_view(deployment: Deployment, assignments: Sequence[Assignment],
                  events: Sequence[DeploymentEvent], now: datetime) -> RolloutView:
    phases = [int(p) for p in deployment.phases]
    per_phase: list[Counter[str]] = [Counter() for _ in phases]
    for assignment in assignments:
        if 0 <= assignment.phase < len(phases):
            per_phase[assignment.phase][assignment.state.value] += 1
    totals: Counter[str] = sum(per_phase, Counter())
    ordered = sorted(assignments, key=lambda a: (a.phase, a.device_id))
    end = deployment.finished_at or now
    return RolloutView(
        id=deployment.id,
        release=f"{deployment.release.name}@{deployment.release.version}",
        model_name=deployment.model_name,
        status=deployment.status.value,
        status_reason=_text(deployment.status_reason),
        selector=_clip(_selector_text(deployment.selector or {})),
        current_phase=deployment.current_phase,
        phases=phases,
        created_at=iso(deployment.created_at) or "",
        created_by=deployment.created_by,
        finished_at=iso(deployment.finished_at),
        total=len(assignments),
        counts={state: totals.get(state, 0) for state in ASSIGNMENT_STATES},
        phase_views=[
            PhaseView(
                index=i,
                percent=percent,
                started=i <= deployment.current_phase,
                devices=sum(per_phase[i].values()),
                counts={state: per_phase[i].get(state, 0) for state in ASSIGNMENT_STATES},
            )
            for i, percent in enumerate(phases)
        ],
        devices=[_assignment_row(a) for a in ordered[:MAX_ROLLOUT_DEVICE_ROWS]],
        series=progress_series(assignments, deployment.created_at, max(end,
                                                                        deployment.created_at)),
        events=[
            EventRow(at=iso(e.at) or "", t=round(e.at.timestamp(), 3), kind=e.kind,
                     actor=e.actor, summary=_event_summary(e.kind, e.detail or {}))
            for e in events
        ],
    )


def rollout_views(session: Session, now: datetime) -> list[RolloutView]:
    """The newest MAX_ROLLOUTS deployments, newest first."""
    deployments = list(session.scalars(
        select(Deployment).order_by(Deployment.id.desc()).limit(MAX_ROLLOUTS)))
    ids = [d.id for d in deployments]
    by_deployment: dict[int, list[Assignment]] = {i: [] for i in ids}
    if ids:
        for assignment in session.scalars(
                select(Assignment).where(Assignment.deployment_id.in_(ids))):
            by_deployment[assignment.deployment_id].append(assignment)
    views = []
    for deployment in deployments:
        events = list(session.scalars(
            select(DeploymentEvent).where(DeploymentEvent.deployment_id == deployment.id)
            .order_by(DeploymentEvent.id.desc()).limit(MAX_EVENTS)))
        events.reverse()
        views.append(_rollout_view(deployment, by_deployment[deployment.id], events, now))
    return views


# -- failures and audit ------------------------------------------------------------------


def failure_groups(session: Session) -> list[FailureGroup]:
    """Failed and rolled-back assignments grouped by reason, most frequent first."""
    rows = session.execute(
        select(Assignment.device_id, Assignment.deployment_id, Assignment.state,
               Assignment.detail)
        .where(Assignment.state.in_(_FAILED_STATES))
        .order_by(Assignment.id.desc()).limit(MAX_FAILURE_ROWS)
    )
    groups: dict[tuple[str, str], tuple[list[str], set[int]]] = {}
    for device_id, deployment_id, state, detail in rows:
        key = (_clip(detail or "(no reason given)"), AssignmentState(state).value)
        devices, deployments = groups.setdefault(key, ([], set()))
        devices.append(device_id)
        deployments.add(deployment_id)
    ordered = sorted(groups.items(), key=lambda item: (-len(item[1][0]), item[0]))
    return [
        FailureGroup(reason=reason, state=state, count=len(devices),
                     devices=sorted(set(devices))[:MAX_DEVICES_PER_REASON],
                     deployments=sorted(deployments))
        for (reason, state), (devices, deployments) in ordered[:MAX_FAILURE_GROUPS]
    ]


def _audit_detail(detail: str) -> str:
    """The canonical JSON, compacted for a table cell."""
    try:
        parsed = json.loads(detail)
    except ValueError:
        return _clip(detail)
    if parsed in ({}, None):
        return ""
    return _clip(json.dumps(parsed, separators=(", ", ": "), ensure_ascii=False))


def _audit_time(recorded_at: str) -> str:
    """The stored ISO text to the second (the exact text stays in the log for verification)."""
    try:
        instant = datetime.fromisoformat(recorded_at)
    except ValueError:
        return recorded_at
    return iso(instant if instant.tzinfo else instant.replace(tzinfo=UTC)) or recorded_at


def audit_tail(session: Session, limit: int = MAX_AUDIT_ENTRIES) -> list[AuditRow]:
    """The newest audit entries, newest first."""
    return [
        AuditRow(id=e.id, recorded_at=_audit_time(e.recorded_at), actor=e.actor, action=e.action,
                 subject=e.subject, detail=_audit_detail(e.detail))
        for e in session.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit))
    ]
