"""``edgeota sim run``: rehearse a fleet on this machine, and ``edgeota demo`` built on it."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from edgeota.protocol.errors import EdgeotaError

app = typer.Typer(help="Simulate a fleet of real agents against a real server and broker.",
                  no_args_is_help=True)


class SimulationFailedError(EdgeotaError):
    """The scenario ran but something in it did not hold (listed above the error)."""


def _scenario(name_or_path: str, devices: int | None) -> Any:
    from edgeota.simulator.scenario import load_scenario

    scenario = load_scenario(Path(name_or_path))
    return scenario.with_devices(devices) if devices else scenario


@app.command()
def run(
    devices: Annotated[int | None, typer.Option(
        help="Devices to simulate (default: the scenario's).", min=1, max=5000)] = None,
    scenario: Annotated[str, typer.Option(
        help="A scenario TOML file, or a built-in one: staged, flaky, gate, attacks, demo, "
        "faults.")]
    = "staged",
    report: Annotated[Path | None, typer.Option(
        help="Write summary.json, per-device CSV timelines and PNG plots here.")] = None,
    workdir: Annotated[Path | None, typer.Option(
        help="Keep the server home and device folders here (default: a temporary folder).")]
    = None,
    workers: Annotated[int, typer.Option(
        help="Threads that step the agents, in each device process (their MQTT runs on one "
        "network loop per process).",
        min=1, max=64)] = 4,
    device_processes: Annotated[int, typer.Option(
        help="Run the agents in this many child processes (each with its own network loop "
        "and --workers threads), so a large fleet uses several cores; 0 runs them in this "
        "process. The attack suite needs 0.",
        min=0, max=64)] = 0,
    in_process: Annotated[bool | None, typer.Option(
        "--in-process/--server-process",
        help="Run the server in this process (needed by the attack suite, which plays a "
        "malicious server, and by corrupt_chunks faults) or as `edgeota serve` in a child "
        "process, so the report has its CPU per update. Default: in-process only for "
        "scenarios that need it.",
        show_default=False)] = None,
    server: Annotated[str | None, typer.Option(
        help="Join a running server at this URL instead of starting one (needs --home).")]
    = None,
    home: Annotated[Path | None, typer.Option(
        help="With --server: the operator home (operator.toml: release keys, trusted roots, "
        "admin token) of that server, as written by `edgeota init`.")] = None,
    broker: Annotated[str | None, typer.Option(
        help="With --server: mqtts://HOST:PORT for the devices, instead of the broker the "
        "server advertises.")] = None,
) -> None:
    """Run real agents (each with its own identity, journal and MQTT connection) through a
    scenario: a server and embedded broker start (or --server joins a running one), the
    devices enrol, the timeline publishes and deploys, faults and attacks happen; a live
    table shows devices per state. Exits 1 if a step did not reach its goal or an attack
    was not refused.

    With --device-processes P the agents run in P child processes (this one keeps the
    server, timeline, faults and report), so a fleet of thousands uses several cores; a
    child that dies is reported with its exit code and the end of its log.

    Joining a server adds devices with ids and a `sim` tag unique to the run and deploys
    only to them; the scenario's releases are published there (a version that exists is
    refused by the server).

    Examples:

      edgeota sim run --devices 100 --scenario flaky --report sim-report

      edgeota sim run --devices 1000 --device-processes 4 --report sim-report

      edgeota sim run --scenario staged --server http://10.0.0.5:8443 --home ./ops-home
    """
    from edgeota.simulator.run import needs_server_in_process
    from edgeota.simulator.server import ServerChoice

    plan = _scenario(scenario, devices)
    inside = needs_server_in_process(plan)
    if server is not None:
        if in_process:
            raise typer.BadParameter("--in-process starts a server: it cannot join --server")
        choice = ServerChoice(mode="join", url=server, home=home, broker=broker)
    else:
        if home is not None or broker is not None:
            raise typer.BadParameter("--home and --broker only apply with --server URL")
        choice = ServerChoice(mode="in-process" if (inside if in_process is None
                                                    else in_process) else "process")
    console = Console()
    with tempfile.TemporaryDirectory(prefix="edgeota-sim-") as scratch:
        base = (workdir or Path(scratch)).resolve()
        base.mkdir(parents=True, exist_ok=True)
        result = simulate(plan, base, report, workers, console, server=choice,
                          device_processes=device_processes)
    print_result(console, result)
    if not result.ok:
        raise SimulationFailedError("; ".join(result.problems))


def simulate(plan: Any, base: Path, report: Path | None, workers: int, console: Console,
             on_start: Any = None, on_finish: Any = None, server: Any = None,
             device_processes: int = 0) -> Any:
    """Run ``plan`` with a live view on ``console``; returns the SimulationResult."""
    from edgeota.simulator.report import live_view
    from edgeota.simulator.run import Simulation

    console.rule(f"edgeota sim: {plan.name} ({plan.devices} devices)")
    # The simulated devices' own warnings (a dropped link, a report retried over
    # HTTP) are the scenario working as intended: the report counts them.
    for noisy in ("edgeota.agent", "amqtt", "edgeota.server.mqtt_bridge"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    live: Live | None = None

    def refresh(sim: Simulation) -> None:
        if live is not None:
            live.update(live_view(sim.recorder))

    with Simulation(plan, base, workers=workers, device_processes=device_processes,
                    server=server, on_progress=refresh,
                    say=lambda text: console.print(f"  {text}")) as sim:
        if on_start is not None:
            on_start(sim)
        with Live(console=console, refresh_per_second=4, transient=True) as live:
            result = sim.run(report)
        if on_finish is not None:
            on_finish(sim, result)
    return result


def print_result(console: Console, result: Any) -> None:
    versions: dict[tuple[str, str], int] = {}
    for device_id, serving in result.serving.items():
        key = (result.hardware[device_id],
               ", ".join(f"{m}@{v}" for m, v in sorted(serving.items())) or "nothing")
        versions[key] = versions.get(key, 0) + 1
    table = Table(title="what the fleet serves")
    for column in ("hardware", "model", "devices"):
        table.add_column(column)
    for (hardware, model), count in sorted(versions.items()):
        table.add_row(hardware, model, str(count))
    console.print(table)
    deployments = Table(title="deployments")
    for column in ("id", "release", "status", "devices", "reason"):
        deployments.add_column(column)
    for d in reversed(result.deployments):
        deployments.add_row(str(d["id"]), d["release"], d["status"],
                            ", ".join(f"{k} {v}" for k, v in d["counts"].items()),
                            d["status_reason"] or "")
    console.print(deployments)
    if result.attacks:
        from edgeota.simulator.attacks import verdict_table

        console.print(verdict_table(result.attacks))
    summary = result.summary or {}
    for wave in summary.get("waves", []):
        console.print(f"  {wave.get('label')}: " + ", ".join(
            f"{k} {wave[k]:.1f} s" if isinstance(wave.get(k), float) else f"{k} {wave.get(k)}"
            for k in ("time_to_50", "time_to_95", "time_to_100") if k in wave)
            + (f", server CPU {wave['server_cpu_seconds_per_update'] * 1000:.0f} ms per update"
               if wave.get("server_cpu_seconds_per_update") is not None else ""))
    if result.report_dir is not None:
        console.print(f"report: {result.report_dir}")
    for problem in result.problems:
        console.print(f"[red]problem:[/] {problem}")
