"""``edgeota deploy`` (phased) and ``edgeota rollout list|status|pause|resume|cancel|rollback``."""

from __future__ import annotations

import re
from typing import Annotated, Any

import typer

from edgeota.cli.common import (
    DEFAULT_HOME,
    HomeOption,
    JsonOption,
    emit_json,
    operator,
    parse_tags,
    split_list,
    table,
)

app = typer.Typer(
    help="Watch and steer phased rollouts: status, pause, resume, cancel, rollback.",
    no_args_is_help=True,
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``10m``, ``2h``, ``1d`` -> seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise typer.BadParameter(f"{text!r} is not a duration like 30s, 10m or 2h",
                                 param_hint="--soak")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2) or "s"]


def parse_phases(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a list of percentages like 1,10,50,100",
                                 param_hint="--phases") from None


def deploy(
    release: Annotated[str, typer.Argument(help="NAME@VERSION of a published release.")],
    devices: Annotated[list[str], typer.Option(help="Device ids (repeatable or "
                                               "comma-separated).")] = [],  # noqa: B006
    tag: Annotated[list[str], typer.Option(help="Select devices by KEY=VALUE tag "
                                           "(repeatable: all must match).")] = [],  # noqa: B006
    phases: Annotated[str, typer.Option(
        help="Cumulative percentages of the selected devices per phase, ending at 100.")]
    = "100",
    soak: Annotated[str, typer.Option(
        help="How long a phase runs before the next may start (30s, 10m, 2h).")] = "0s",
    min_success_ratio: Annotated[float, typer.Option(
        help="Share of the started devices that must have installed to advance.")] = 0.95,
    max_failure_ratio: Annotated[float, typer.Option(
        help="Pause when more than this share of started devices failed.")] = 0.05,
    latency_factor: Annotated[float, typer.Option(
        help="Gate: pause when a hardware class's p95 latency on the new release exceeds "
             "this multiple of the same devices' p95 on their previous release (0: off).")]
    = 2.0,
    error_rate_factor: Annotated[float, typer.Option(
        help="Gate: the same for the error rate (0: off).")] = 2.0,
    gate_min_inferences: Annotated[int, typer.Option(
        help="Inferences a device must have made on each release before the gates count "
             "it.")] = 20,
    auto_rollback: Annotated[bool, typer.Option(
        help="When a gate fires, give the deployment's devices of the regressed hardware "
             "class their previous release.")] = False,
    home: HomeOption = DEFAULT_HOME,
    as_json: JsonOption = False,
) -> None:
    """Roll a release out to devices (by id or tag), in phases with soak times and gates.

    Devices are ordered by a stable hash of deployment and device, so each
    phase's devices are fixed when the deployment is created (the same after a
    server restart). A phase advances when --min-success-ratio of the started
    devices installed and --soak has passed; the deployment pauses when
    --max-failure-ratio is crossed, or when a model-aware gate sees the new
    release slower or more error-prone than the same devices' previous
    release. Devices enrolled later that match --tag join the current phase.
    A device already in another deployment of this model moves to this one
    (the output says which deployments this supersedes).

    Example: edgeota deploy digits@2.0.0 --tag site=lab --phases 1,10,50,100
    --soak 10m --max-failure-ratio 0.05 --auto-rollback
    """
    name, sep, version = release.partition("@")
    if not sep or not name or not version:
        raise typer.BadParameter("expected NAME@VERSION, e.g. digits@2.0.0",
                                 param_hint="RELEASE")
    options: dict[str, Any] = {
        "soak_seconds": parse_duration(soak),
        "min_success_ratio": min_success_ratio,
        "max_failure_ratio": max_failure_ratio,
        "latency_factor": latency_factor or None,
        "error_rate_factor": error_rate_factor or None,
        "gate_min_inferences": gate_min_inferences,
        "auto_rollback": auto_rollback,
    }
    _, client = operator(home)
    with client:
        answer = client.post("/api/v1/deployments", {
            "name": name, "version": version, "devices": split_list(devices),
            "tags": parse_tags(tag), "phases": parse_phases(phases), "options": options,
        })
    if as_json:
        emit_json(answer)
        return
    total = len(answer["scheduled"])
    typer.echo(f"deployment {answer['deployment_id']}: {answer['release']} to {total} "
               f"device(s) in phases {','.join(map(str, answer['phases']))} %")
    typer.echo(f"  phase 0 assigned now: {', '.join(answer['assigned']) or '-'}")
    for device_id, reason in answer["skipped"].items():
        typer.echo(f"  skipped {device_id}: {reason}")
    for device_id, reason in answer.get("failed", {}).items():
        typer.echo(f"  not assigned yet {device_id}: {reason} (the rollout engine retries it)")
    if answer["superseded"]:
        typer.echo(f"  supersedes deployment(s) {', '.join(map(str, answer['superseded']))}")
    typer.echo(f"  follow it with: edgeota rollout status {answer['deployment_id']}")


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{state} {n}" for state, n in counts.items()) or "-"


@app.command("list")
def list_(home: HomeOption = DEFAULT_HOME, as_json: JsonOption = False) -> None:
    """Deployments, newest first, with device counts per state."""
    _, client = operator(home)
    with client:
        rows = client.get("/api/v1/deployments")
    if as_json:
        emit_json(rows)
        return
    table(f"deployments ({len(rows)})", ["id", "release", "status", "phase", "devices", "reason"],
          [[d["id"], d["release"], d["status"],
            f"{d['current_phase'] + 1}/{len(d['phases'])} ({d['phases'][d['current_phase']]}%)",
            _counts(d["counts"]), d["status_reason"] or ""] for d in rows])


@app.command()
def status(
    deployment_id: Annotated[int, typer.Argument(help="The deployment id (from deploy).")],
    home: HomeOption = DEFAULT_HOME,
    as_json: JsonOption = False,
) -> None:
    """Per phase: each device's state (waiting, pending, downloading, installed, failed,
    rolled_back) with the reason, then the deployment's history."""
    _, client = operator(home)
    with client:
        d = client.get(f"/api/v1/deployments/{deployment_id}")
    if as_json:
        emit_json(d)
        return
    typer.echo(f"deployment {d['id']}: {d['release']} - {d['status']}"
               + (f" ({d['status_reason']})" if d["status_reason"] else ""))
    typer.echo(f"  phase {d['current_phase'] + 1} of {len(d['phases'])}; devices: "
               f"{_counts(d['counts'])}")
    for phase in d["phase_detail"]:
        table(f"phase {phase['index'] + 1}: {phase['percent']}%"
              + ("" if phase["started"] else " (not started)"),
              ["device", "hardware", "state", "reason", "previous"],
              [[a["device_id"], a["hardware"], a["state"], a["detail"] or "",
                a["previous_version"] or "-"] for a in phase["devices"]])
    table("history", ["when", "what", "by", "detail"],
          [[e["at"], e["kind"], e["actor"],
            e["detail"].get("reason") or ", ".join(
                f"{k}={v}" for k, v in e["detail"].items() if k != "reason")[:200]]
           for e in d["events"]])


def _action(action: str, deployment_id: int, home: Any, as_json: bool) -> None:
    _, client = operator(home)
    with client:
        answer = client.post(f"/api/v1/deployments/{deployment_id}/{action}", {})
    if as_json:
        emit_json(answer)
        return
    typer.echo(f"deployment {deployment_id}: {answer['status']}")
    if answer["devices"]:
        typer.echo(f"  back on their previous release: {', '.join(answer['devices'])}")
    for device_id, reason in answer["skipped"].items():
        typer.echo(f"  not rolled back {device_id}: {reason}")


_IdArgument = Annotated[int, typer.Argument(help="The deployment id.")]


@app.command()
def pause(deployment_id: _IdArgument, home: HomeOption = DEFAULT_HOME,
          as_json: JsonOption = False) -> None:
    """Start no further phases; devices already assigned carry on."""
    _action("pause", deployment_id, home, as_json)


@app.command()
def resume(deployment_id: _IdArgument, home: HomeOption = DEFAULT_HOME,
           as_json: JsonOption = False) -> None:
    """Continue a paused deployment, accepting the failures and gate findings so far."""
    _action("resume", deployment_id, home, as_json)


@app.command()
def cancel(deployment_id: _IdArgument, home: HomeOption = DEFAULT_HOME,
           as_json: JsonOption = False) -> None:
    """End the deployment: waiting devices never get the release, started ones keep it."""
    _action("cancel", deployment_id, home, as_json)


@app.command()
def rollback(deployment_id: _IdArgument, home: HomeOption = DEFAULT_HOME,
             as_json: JsonOption = False) -> None:
    """Give every started device its previous release and end the deployment.

    Anti-rollback still holds: a device that committed a release with a higher
    release counter than its previous one cannot go back (it is listed with
    the reason).
    """
    _action("rollback", deployment_id, home, as_json)
