"""The rollout engine: phases advance, pause on failures and model regressions, roll back.

A deployment (created by :func:`edgeota.server.services.deployments.deploy`)
moves through its phases here. :func:`advance` is called periodically (the
server's background loop, or a test directly); under the ``director`` lock it
looks at every active deployment and, in this order:

1. lets devices that now match a tag selector join the current phase;
2. runs the **model-aware gates**: per hardware class, the new release's p95
   latency and error rate on the devices already running it, against the
   *same devices* on their previous release (from the telemetry the agents
   send, kept per version by the MQTT ingest). A gate that fires pauses the
   deployment with a reason naming the metric, the numbers and the devices,
   and with ``auto_rollback`` assigns the deployment's devices of that
   hardware class their previous release;
3. pauses when the failure ratio of the started phases crosses the limit;
4. advances to the next phase (or completes) when the success ratio is met and
   the phase has soaked long enough.

Status reports move each device's assignment (:func:`record_report`), so the
engine reads the database only: several replicas may run it, the lock makes
one act at a time. Anti-rollback still holds on a rollback: devices refuse
any release whose counter is below their floor, so a rollback is only
offered where the previous release's counter is not below the one the device
committed (the server says which devices cannot go back, and why).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgeota.protocol.reports import StatusReport
from edgeota.server import audit
from edgeota.server.context import ServerContext
from edgeota.server.db.models import (
    Assignment,
    AssignmentState,
    Deployment,
    DeploymentEvent,
    DeploymentStatus,
    Device,
    Release,
    StatusEvent,
)
from edgeota.server.db.session import lock
from edgeota.server.services.deployments import (
    add_assignment,
    assign_releases,
    director_failure,
    eligibility_problem,
    record_event,
    restart_stalled,
    selector_matches,
    start_assignment,
    start_phase,
)
from edgeota.server.services.errors import ConflictError, NotFoundError
from edgeota.server.services.types import (
    AssignmentView,
    DeploymentEventView,
    DeploymentView,
    PhaseView,
    RolloutActionResult,
    RolloutPolicy,
)

__all__ = [
    "ENGINE_ACTOR",
    "ERROR_RATE_FLOOR",
    "LATENCY_FLOOR_MS",
    "GateFinding",
    "ReportableAssignments",
    "advance",
    "cancel",
    "evaluate_gates",
    "get_deployment",
    "list_deployments",
    "pause",
    "record_report",
    "reportable_assignments",
    "resume",
    "rollback",
]

logger = logging.getLogger(__name__)

ENGINE_ACTOR = "rollout-engine"
# An error rate of the previous release below this counts as this: a factor of
# a zero baseline would fire on the first error of the new release.
ERROR_RATE_FLOOR = 0.01
# Likewise a previous p95 below this many milliseconds: below it, latency is noise.
LATENCY_FLOOR_MS = 1.0
MAX_NAMED_DEVICES = 20  # devices named in one pause reason

_IN_PROGRESS = frozenset({"checking", "downloading", "verifying", "validating", "staged",
                          "swapping", "probation"})
_STARTED = (AssignmentState.PENDING, AssignmentState.DOWNLOADING, AssignmentState.INSTALLED,
            AssignmentState.FAILED, AssignmentState.ROLLED_BACK)


@dataclass(frozen=True)
class GateFinding:
    """A model-aware gate that fired on one hardware class."""

    metric: str  # "latency_p95_ms" or "error_rate"
    hardware: str
    new_value: float
    old_value: float
    factor: float
    limit: float
    new_version: str
    devices: tuple[str, ...]

    def reason(self) -> str:
        shown = ", ".join(self.devices[:MAX_NAMED_DEVICES])
        more = len(self.devices) - MAX_NAMED_DEVICES
        return (f"{self.metric} on {self.hardware}: {self.new_value:.4g} on "
                f"{self.new_version} vs {self.old_value:.4g} before (x{self.factor:.2f} > "
                f"x{self.limit:g}) on {len(self.devices)} device(s): {shown}"
                + (f" and {more} more" if more > 0 else ""))

    def to_json(self) -> dict[str, object]:
        return {"metric": self.metric, "hardware": self.hardware, "new": self.new_value,
                "old": self.old_value, "factor": self.factor, "limit": self.limit,
                "devices": list(self.devices)}


# -- reports move assignments ---------------------------------------------------------


#: Assignments a report may still move (one per device, model and version: the newest).
_REPORTABLE = (AssignmentState.PENDING, AssignmentState.DOWNLOADING,
               AssignmentState.INSTALLED, AssignmentState.FAILED)

#: ``(device id, model name, release version)`` -> the assignment a report on it moves.
ReportableAssignments = dict[tuple[str, str, str], Assignment]


def reportable_assignments(session: Session,
                           keys: Iterable[tuple[str, str, str]]) -> ReportableAssignments:
    """The assignments reports on ``keys`` (device id, model name, version) may move, in one query.

    For a caller storing many reports in one transaction (the MQTT sink's
    batches): :func:`record_report` then looks each report's assignment up
    here instead of querying once per report. The query selects a superset of
    each key's rows, so every key gets what :func:`record_report`'s own query
    would find; and only :func:`record_report` changes these rows in such a
    transaction, between reportable states, so the lookup stays true.
    """
    keys = set(keys)
    found: ReportableAssignments = {}
    if not keys:
        return found
    devices, names, versions = (sorted({key[i] for key in keys}) for i in range(3))
    rows = session.execute(
        select(Assignment, Release.version).join(Release, Release.id == Assignment.release_id)
        .where(Assignment.device_id.in_(devices), Assignment.model_name.in_(names),
               Release.version.in_(versions), Assignment.state.in_(_REPORTABLE))
        .order_by(Assignment.id.desc()))
    for assignment, version in rows:
        found.setdefault((assignment.device_id, assignment.model_name, version), assignment)
    return found


def record_report(session: Session, device: Device, report: StatusReport,
                  now: datetime, *, late: bool = False,
                  assignments: ReportableAssignments | None = None) -> None:
    """Move the device's assignment for the reported release (called per accepted report).

    A ``late`` report (stored after a newer one of the same device) only moves
    the assignment forward: a failure it tells of does not undo an install
    that a newer report already confirmed. ``assignments``: what
    :func:`reportable_assignments` returned in this transaction for keys
    that include this report's, looked up instead of queried.
    """
    if not report.release or "@" not in report.release:
        return
    name, _, version = report.release.partition("@")
    if assignments is not None:
        assignment = assignments.get((device.id, name, version))
    else:
        assignment = session.scalars(
            select(Assignment).join(Release, Release.id == Assignment.release_id)
            .where(Assignment.device_id == device.id, Assignment.model_name == name,
                   Release.version == version, Assignment.state.in_(_REPORTABLE))
            .order_by(Assignment.id.desc())
        ).first()
    if assignment is None:
        return
    if report.state in _IN_PROGRESS:
        if assignment.state in (AssignmentState.PENDING, AssignmentState.DOWNLOADING):
            assignment.state = AssignmentState.DOWNLOADING
            assignment.detail = report.state
    elif report.state == "committed":
        assignment.state = AssignmentState.INSTALLED
        assignment.detail = None
        assignment.finished_at = now
    elif report.state in ("failed", "rolled_back"):
        if late and assignment.state is AssignmentState.INSTALLED:
            return
        assignment.state = AssignmentState.FAILED
        assignment.detail = report.error or report.state
        assignment.finished_at = now
    assignment.updated_at = now


# -- the engine ------------------------------------------------------------------------


def _options(deployment: Deployment) -> RolloutPolicy:
    # options also carries the engine's own notes (excused_devices): not operator settings.
    return RolloutPolicy.from_stored(deployment.options or {})


def _started(session: Session, deployment: Deployment) -> list[Assignment]:
    return list(session.scalars(
        select(Assignment).where(Assignment.deployment_id == deployment.id,
                                 Assignment.phase <= deployment.current_phase,
                                 Assignment.state.in_(_STARTED))
        .order_by(Assignment.device_id)))


def _last_resume(session: Session, deployment: Deployment) -> datetime | None:
    return session.scalars(
        select(DeploymentEvent.at).where(DeploymentEvent.deployment_id == deployment.id,
                                         DeploymentEvent.kind == "resumed")
        .order_by(DeploymentEvent.id.desc())).first()


def _join_new_devices(ctx: ServerContext, session: Session, deployment: Deployment,
                      now: datetime) -> list[str]:
    """Devices enrolled (or re-tagged) since the deploy that match its tag selector."""
    if "tags" not in deployment.selector:
        return []
    present = set(session.scalars(select(Assignment.device_id).where(
        Assignment.deployment_id == deployment.id)))
    joined = []
    release = deployment.release
    for device in session.scalars(select(Device).order_by(Device.id)):
        if device.id in present or not selector_matches(deployment.selector, device):
            continue
        if eligibility_problem(release, device) is not None:
            continue
        busy = session.scalars(select(Assignment.id).join(
            Deployment, Deployment.id == Assignment.deployment_id).where(
            Assignment.device_id == device.id, Assignment.model_name == deployment.model_name,
            Assignment.state != AssignmentState.SUPERSEDED,
            Deployment.id > deployment.id)).first()
        if busy is not None:
            continue  # a newer deployment of this model already has it
        assignment, _ = add_assignment(ctx, session, deployment, device.id,
                                       deployment.current_phase, now)
        session.flush()
        start_assignment(ctx, session, assignment, now)
        joined.append(device.id)
    if joined:
        record_event(session, deployment, "joined", ENGINE_ACTOR, now,
                     phase=deployment.current_phase, devices=joined)
    return joined


def _version_metrics(device: Device, model: str, version: str) -> dict[str, Any] | None:
    versions = ((device.reported_state or {}).get("versions") or {}).get(model) or {}
    entry = versions.get(version)
    return entry if isinstance(entry, dict) else None


def evaluate_gates(session: Session, deployment: Deployment) -> list[GateFinding]:
    """The model-aware gates of ``deployment``, per hardware class (empty: all clear)."""
    options = _options(deployment)
    if options.latency_factor is None and options.error_rate_factor is None:
        return []
    excused = set((deployment.options or {}).get("excused_devices", []))
    release = deployment.release
    groups: dict[str, list[tuple[str, dict[str, Any], dict[str, Any], str]]] = {}
    for assignment in _started(session, deployment):
        if assignment.state not in (AssignmentState.INSTALLED, AssignmentState.DOWNLOADING) \
                or assignment.previous_release is None or assignment.device_id in excused:
            continue
        device = assignment.device
        new = _version_metrics(device, deployment.model_name, release.version)
        old = _version_metrics(device, deployment.model_name,
                               assignment.previous_release.version)
        if new is None or old is None:
            continue
        if new.get("inferences", 0) < options.gate_min_inferences or \
                old.get("inferences", 0) < options.gate_min_inferences:
            continue
        groups.setdefault(device.hardware, []).append(
            (device.id, new, old, assignment.previous_release.version))
    findings = []
    for hardware, rows in sorted(groups.items()):
        if options.latency_factor is not None:
            pairs = [(d, n["p95_ms"], o["p95_ms"]) for d, n, o, _ in rows
                     if n.get("p95_ms") is not None and o.get("p95_ms")]
            if pairs:
                new_p95 = statistics.median(p[1] for p in pairs)
                old_p95 = statistics.median(p[2] for p in pairs)
                baseline = max(old_p95, LATENCY_FLOOR_MS)
                if new_p95 > options.latency_factor * baseline:
                    findings.append(GateFinding(
                        "latency_p95_ms", hardware, new_p95, old_p95, new_p95 / baseline,
                        options.latency_factor, release.version,
                        tuple(d for d, n, o in pairs
                              if n > options.latency_factor * max(o, LATENCY_FLOOR_MS))
                        or tuple(p[0] for p in pairs)))
        if options.error_rate_factor is not None:
            new_inf = sum(n["inferences"] for _, n, _, _ in rows)
            old_inf = sum(o["inferences"] for _, _, o, _ in rows)
            new_rate = sum(n.get("errors", 0) for _, n, _, _ in rows) / new_inf
            old_rate = sum(o.get("errors", 0) for _, _, o, _ in rows) / old_inf
            baseline = max(old_rate, ERROR_RATE_FLOOR)
            if new_rate > options.error_rate_factor * baseline:
                worse = tuple(d for d, n, o, _ in rows
                              if n.get("errors", 0) / n["inferences"]
                              > options.error_rate_factor
                              * max(o.get("errors", 0) / o["inferences"], ERROR_RATE_FLOOR))
                findings.append(GateFinding(
                    "error_rate", hardware, new_rate, old_rate, new_rate / baseline,
                    options.error_rate_factor, release.version,
                    worse or tuple(r[0] for r in rows)))
    return findings


def _rollback_assignments(ctx: ServerContext, session: Session, deployment: Deployment,
                          assignments: Iterable[Assignment], now: datetime,
                          reason: str) -> tuple[list[str], dict[str, str]]:
    """Assign each device its previous release; returns (rolled back, skipped with why).

    The director work of all of them runs on the deploy pool (a hardware class
    of hundreds rolls back in seconds, not one device after another); a device
    whose metadata could not be written is skipped with the error and keeps
    its assignment, so a later rollback can try it again.
    """
    done: list[str] = []
    skipped: dict[str, str] = {}
    release = deployment.release
    chosen: list[tuple[Assignment, Release]] = []
    for assignment in assignments:
        previous = assignment.previous_release
        if previous is None:
            skipped[assignment.device_id] = "it had no earlier release of this model"
            continue
        if assignment.state == AssignmentState.INSTALLED and \
                previous.release_counter < release.release_counter:
            skipped[assignment.device_id] = (
                f"it committed {release.version} (release counter {release.release_counter}); "
                f"its floor forbids {previous.version} (counter {previous.release_counter})")
            continue
        chosen.append((assignment, previous))
    failures = assign_releases(ctx, [(a.device, previous) for a, previous in chosen])
    for assignment, previous in chosen:
        error = failures.get(assignment.device_id)
        if error is not None:
            skipped[assignment.device_id] = (
                f"its director metadata could not be written ({director_failure(error)}): "
                f"{error}")
            continue
        assignment.state = AssignmentState.ROLLED_BACK
        assignment.detail = f"{reason}; back to {previous.version}"
        assignment.finished_at = now
        assignment.updated_at = now
        done.append(assignment.device_id)
    return done, skipped


def _pause(session: Session, deployment: Deployment, now: datetime, actor: str, reason: str,
           **detail: object) -> None:
    deployment.status = DeploymentStatus.PAUSED
    deployment.status_reason = reason
    record_event(session, deployment, "paused", actor, now, reason=reason, **detail)
    audit.append(session, actor=actor, action="rollout.pause", subject=str(deployment.id),
                 detail={"reason": reason, **detail})
    logger.warning("rollout paused", extra={"deployment_id": deployment.id, "reason": reason})


_OUTCOMES = ("committed", "failed", "rolled_back")
_IN_CHUNK = 500  # device ids per IN (...) list


def _catch_up_reports(session: Session, deployment: Deployment) -> None:
    """Apply outcomes that devices reported before their assignment was visible.

    A device is notified as soon as its director metadata is written, before
    the deploy's transaction commits; a fast outcome (a refusal takes
    milliseconds) can be stored while the assignment row is not yet visible
    to the report's transaction (PostgreSQL), and would leave the assignment
    pending for good. The report itself is in the device's history: take the
    newest outcome for this release received since the assignment was made.
    """
    open_ = [a for a in _started(session, deployment)
             if a.state in (AssignmentState.PENDING, AssignmentState.DOWNLOADING)
             and a.assigned_at is not None]
    if not open_:
        return
    since = min(a.assigned_at for a in open_ if a.assigned_at is not None)
    newest: dict[tuple[str, str | None], StatusEvent] = {}
    ids = sorted({a.device_id for a in open_})
    for start in range(0, len(ids), _IN_CHUNK):
        for event in session.scalars(select(StatusEvent).where(
                StatusEvent.device_id.in_(ids[start:start + _IN_CHUNK]),
                StatusEvent.state.in_(_OUTCOMES), StatusEvent.received_at >= since)):
            key = (event.device_id, event.release)
            if key not in newest or event.seq > newest[key].seq:
                newest[key] = event
    for assignment in open_:
        outcome = newest.get((assignment.device_id,
                              f"{assignment.model_name}@{assignment.release.version}"))
        if outcome is not None and assignment.assigned_at is not None \
                and outcome.received_at >= assignment.assigned_at:
            record_report(session, assignment.device, StatusReport(
                device_id=outcome.device_id, seq=outcome.seq, state=outcome.state,
                release=outcome.release, error=(outcome.detail or {}).get("error")),
                outcome.received_at)


def _step(ctx: ServerContext, session: Session, deployment: Deployment,
          now: datetime) -> str | None:
    """One engine step for one active deployment; returns what changed (None: nothing)."""
    options = _options(deployment)
    _catch_up_reports(session, deployment)
    retried = restart_stalled(ctx, session, deployment, now, ENGINE_ACTOR)
    joined = _join_new_devices(ctx, session, deployment, now) + retried.started
    findings = evaluate_gates(session, deployment)
    if findings:
        reasons = "; ".join(f.reason() for f in findings)
        rolled: list[str] = []
        skipped: dict[str, str] = {}
        if options.auto_rollback:
            # The whole hardware class regressed, not only the devices that had
            # sent enough figures yet: all of its devices on the release go back.
            hardware = {f.hardware for f in findings}
            targets = [a for a in _started(session, deployment)
                       if a.device.hardware in hardware
                       and a.state != AssignmentState.ROLLED_BACK]
            rolled, skipped = _rollback_assignments(ctx, session, deployment, targets, now,
                                                    f"gate {findings[0].metric}")
            record_event(session, deployment, "rolled_back", ENGINE_ACTOR, now,
                         devices=rolled, skipped=skipped, automatic=True)
        _pause(session, deployment, now, ENGINE_ACTOR, "model-aware gate: " + reasons,
               gates=[f.to_json() for f in findings], rolled_back=rolled, skipped=skipped)
        return f"deployment {deployment.id} paused by gate"
    started = _started(session, deployment)
    total = len(started)
    if total == 0:
        return f"deployment {deployment.id}: {len(joined)} joined" if joined else None
    since = _last_resume(session, deployment)
    failed = [a for a in started if a.state == AssignmentState.FAILED
              and (since is None or (a.finished_at is not None and a.finished_at > since))]
    if len(failed) / total > options.max_failure_ratio:
        named = ", ".join(f"{a.device_id} ({a.detail})" for a in failed[:MAX_NAMED_DEVICES])
        _pause(session, deployment, now, ENGINE_ACTOR,
               f"failure ratio {len(failed)}/{total} = {len(failed) / total:.2f} exceeds "
               f"{options.max_failure_ratio:g}: {named}",
               failed={a.device_id: a.detail for a in failed})
        return f"deployment {deployment.id} paused by failures"
    installed = sum(1 for a in started if a.state == AssignmentState.INSTALLED)
    soaked = deployment.phase_started_at is None or \
        now - deployment.phase_started_at >= timedelta(seconds=options.soak_seconds)
    if installed / total < options.min_success_ratio or not soaked:
        return f"deployment {deployment.id}: {len(joined)} joined" if joined else None
    if deployment.current_phase + 1 < len(deployment.phases):
        phase = deployment.current_phase + 1
        devices = start_phase(ctx, session, deployment, phase, now, ENGINE_ACTOR)
        audit.append(session, actor=ENGINE_ACTOR, action="rollout.phase",
                     subject=str(deployment.id),
                     detail={"phase": phase, "percent": deployment.phases[phase],
                             "devices": devices, "success": f"{installed}/{total}"})
        return f"deployment {deployment.id} phase {phase}"
    deployment.status = DeploymentStatus.COMPLETED
    deployment.finished_at = now
    record_event(session, deployment, "completed", ENGINE_ACTOR, now,
                 installed=installed, total=total)
    audit.append(session, actor=ENGINE_ACTOR, action="rollout.complete",
                 subject=str(deployment.id), detail={"installed": installed, "total": total})
    return f"deployment {deployment.id} completed"


def advance(ctx: ServerContext) -> list[str]:
    """One pass of the engine over every active deployment; returns what changed.

    One transaction per deployment, so a failing deployment (logged) does
    not hold the others back.
    """
    with ctx.sessions() as session:
        ids = list(session.scalars(select(Deployment.id).where(
            Deployment.status == DeploymentStatus.ACTIVE).order_by(Deployment.id)))
    changes = []
    for deployment_id in ids:
        try:
            with ctx.sessions() as session, session.begin():
                lock(session, "director")
                deployment = session.get(Deployment, deployment_id)
                if deployment is None or deployment.status != DeploymentStatus.ACTIVE:
                    continue
                change = _step(ctx, session, deployment, ctx.clock())
        except Exception:
            logger.exception("rollout step failed", extra={"deployment_id": deployment_id})
            continue
        if change:
            changes.append(change)
    return changes


# -- operator actions --------------------------------------------------------------------


def _deployment(session: Session, deployment_id: int) -> Deployment:
    deployment = session.get(Deployment, deployment_id)
    if deployment is None:
        raise NotFoundError(f"no deployment {deployment_id}")
    return deployment


def _locked(session: Session, deployment_id: int, allowed: tuple[DeploymentStatus, ...],
            wanted: str) -> Deployment:
    """The deployment under the director lock, refused unless its status is ``allowed``."""
    lock(session, "director")
    deployment = _deployment(session, deployment_id)
    if deployment.status not in allowed:
        raise ConflictError(f"deployment {deployment_id} is {deployment.status}{wanted}")
    return deployment


def pause(ctx: ServerContext, session: Session, actor: str,
          deployment_id: int) -> RolloutActionResult:
    deployment = _locked(session, deployment_id, (DeploymentStatus.ACTIVE,), ", not active")
    _pause(session, deployment, ctx.clock(), actor, f"paused by {actor}")
    return RolloutActionResult(deployment_id=deployment_id, action="pause",
                               status=str(deployment.status))


def resume(ctx: ServerContext, session: Session, actor: str,
           deployment_id: int) -> RolloutActionResult:
    """Continue a paused deployment; failures and gate findings so far are acknowledged."""
    deployment = _locked(session, deployment_id, (DeploymentStatus.PAUSED,), ", not paused")
    now = ctx.clock()
    excused = sorted({*(deployment.options or {}).get("excused_devices", []),
                      *(d for f in evaluate_gates(session, deployment) for d in f.devices)})
    deployment.options = {**(deployment.options or {}), "excused_devices": excused}
    deployment.status = DeploymentStatus.ACTIVE
    deployment.status_reason = None
    record_event(session, deployment, "resumed", actor, now, excused=excused)
    audit.append(session, actor=actor, action="rollout.resume", subject=str(deployment_id),
                 detail={"excused": excused})
    return RolloutActionResult(deployment_id=deployment_id, action="resume",
                               status=str(deployment.status))


def cancel(ctx: ServerContext, session: Session, actor: str,
           deployment_id: int) -> RolloutActionResult:
    """Stop: devices not yet started never get the release; started ones keep it."""
    deployment = _locked(session, deployment_id,
                         (DeploymentStatus.ACTIVE, DeploymentStatus.PAUSED), "")
    now = ctx.clock()
    deployment.status = DeploymentStatus.CANCELLED
    deployment.status_reason = f"cancelled by {actor}"
    deployment.finished_at = now
    record_event(session, deployment, "cancelled", actor, now)
    audit.append(session, actor=actor, action="rollout.cancel", subject=str(deployment_id),
                 detail={})
    return RolloutActionResult(deployment_id=deployment_id, action="cancel",
                               status=str(deployment.status))


def rollback(ctx: ServerContext, session: Session, actor: str,
             deployment_id: int) -> RolloutActionResult:
    """Give every started device of the deployment its previous release and cancel the rest."""
    lock(session, "director")
    deployment = _deployment(session, deployment_id)
    if deployment.status == DeploymentStatus.SUPERSEDED:
        raise ConflictError(f"deployment {deployment_id} was superseded by deployment "
                            f"{deployment.superseded_by}: roll that one back")
    now = ctx.clock()
    targets = [a for a in session.scalars(
        select(Assignment).where(Assignment.deployment_id == deployment.id,
                                 Assignment.state.in_((AssignmentState.PENDING,
                                                       AssignmentState.DOWNLOADING,
                                                       AssignmentState.INSTALLED,
                                                       AssignmentState.FAILED)))
        .order_by(Assignment.device_id))]
    done, skipped = _rollback_assignments(ctx, session, deployment, targets, now,
                                          f"rolled back by {actor}")
    deployment.status = DeploymentStatus.CANCELLED
    deployment.status_reason = f"rolled back by {actor}"
    deployment.finished_at = now
    record_event(session, deployment, "rolled_back", actor, now, devices=done, skipped=skipped,
                 automatic=False)
    audit.append(session, actor=actor, action="rollout.rollback", subject=str(deployment_id),
                 detail={"devices": done, "skipped": skipped})
    return RolloutActionResult(deployment_id=deployment_id, action="rollback",
                               status=str(deployment.status), devices=done,
                               skipped=skipped)


# -- views ---------------------------------------------------------------------------------


def _counts(assignments: Iterable[Assignment]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for a in assignments:
        counts[str(a.state)] = counts.get(str(a.state), 0) + 1
    return dict(sorted(counts.items()))


def _view(session: Session, deployment: Deployment, *, detail: bool) -> DeploymentView:
    assignments = list(session.scalars(
        select(Assignment).where(Assignment.deployment_id == deployment.id)
        .order_by(Assignment.phase, Assignment.device_id)))
    out = DeploymentView(
        id=deployment.id,
        release=f"{deployment.release.name}@{deployment.release.version}",
        model_name=deployment.model_name, selector=deployment.selector,
        status=str(deployment.status), status_reason=deployment.status_reason,
        phases=deployment.phases, current_phase=deployment.current_phase,
        phase_started_at=deployment.phase_started_at, options=deployment.options or {},
        created_at=deployment.created_at, created_by=deployment.created_by,
        finished_at=deployment.finished_at, superseded_by=deployment.superseded_by,
        counts=_counts(assignments),
    )
    if not detail:
        return out
    for index, percent in enumerate(deployment.phases):
        members = [a for a in assignments if a.phase == index]
        out.phase_detail.append(PhaseView(
            index=index, percent=percent,
            started=index <= deployment.current_phase
            and deployment.phase_started_at is not None,
            counts=_counts(members),
            devices=[AssignmentView(
                device_id=a.device_id, hardware=a.device.hardware, phase=a.phase,
                state=str(a.state), detail=a.detail,
                previous_version=a.previous_release.version if a.previous_release else None,
                assigned_at=a.assigned_at, finished_at=a.finished_at) for a in members]))
    out.events = [DeploymentEventView(at=e.at, kind=e.kind, actor=e.actor, detail=e.detail)
                  for e in session.scalars(
                      select(DeploymentEvent).where(
                          DeploymentEvent.deployment_id == deployment.id)
                      .order_by(DeploymentEvent.id))]
    return out


def get_deployment(session: Session, deployment_id: int) -> DeploymentView:
    return _view(session, _deployment(session, deployment_id), detail=True)


def list_deployments(session: Session, limit: int = 100) -> list[DeploymentView]:
    rows = session.scalars(select(Deployment).order_by(Deployment.id.desc()).limit(limit))
    return [_view(session, d, detail=False) for d in rows]
