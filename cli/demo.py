"""``edgeota demo``: the whole release flow on this machine, on embedded defaults.

A temporary home (SQLite, local keys), the update server and the embedded
TLS broker in a child process (``edgeota serve``), 20 simulated devices on two hardware classes
running the real agent (the fleet simulator's built-in ``demo`` scenario).
The release manager publishes digits 1.0.0, the operator deploys it; then
2.0.0 goes out in a staged rollout (10 %, 50 %, 100 %) that the server's
rollout engine advances on the devices' reports and telemetry. The
dashboard URL is printed while it runs; at the end, each device's served
version and the accuracy it measures on the digits test split.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from edgeota.protocol.errors import EdgeotaError


def demo(
    devices: Annotated[int, typer.Option(min=2, max=200, help="Simulated devices.")] = 20,
    workdir: Annotated[Path | None, typer.Option(
        help="Keep the demo's files here instead of a temporary folder.")] = None,
    report: Annotated[Path, typer.Option(
        help="Where to write the report (JSON summary, CSV timelines, PNG plots).")]
    = Path("edgeota-demo-report"),
    device_processes: Annotated[int, typer.Option(
        help="Run the devices in this many child processes (0: in this one).",
        min=0, max=16)] = 0,
) -> None:
    """Publish two releases and watch a simulated fleet verify, decrypt and hot-swap them
    in a staged rollout; prints the dashboard URL while it runs and the report at the end."""
    from edgeota.cli.sim import print_result, simulate
    from edgeota.simulator.scenario import load_scenario
    from edgeota.simulator.server import ServerChoice

    console = Console()
    plan = load_scenario(Path("demo")).with_devices(devices)
    accuracy: dict[str, tuple[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="edgeota-demo-") as scratch:
        base = (workdir or Path(scratch)).resolve()
        base.mkdir(parents=True, exist_ok=True)
        target = report.resolve()
        result = simulate(plan, base, target, workers=4, console=console,
                          server=ServerChoice(mode="process"),
                          device_processes=device_processes,
                          on_start=lambda sim: _dashboard(console, sim),
                          on_finish=lambda sim, _result: accuracy.update(_measure(sim)))
        print_result(console, result)
        _final_table(console, result.hardware, accuracy)
        _check(result, accuracy)
        if workdir is None:
            console.print("(the demo's server home and devices are removed with its temporary "
                          "folder: use --workdir DIR to keep them)")
    console.rule("done")


def _dashboard(console: Console, sim: Any) -> None:
    token = sim.client.post("/api/v1/tokens", {"name": "demo-viewer", "role": "viewer"})["token"]
    console.print(f"  dashboard: {sim.server.url}/  (sign in with the viewer token {token})")


def _measure(sim: Any) -> dict[str, tuple[str, float]]:
    """Each device's served digits version and its accuracy on the test split.

    The prediction runs where the device runs (this process, or its device
    process with ``--device-processes``), on the model it serves.
    """
    import numpy as np

    from edgeota.samples import load_test_split

    x_test, y_test = load_test_split()
    measured = {}
    for device in sim.devices:
        answer = device.predict_rows("digits", x_test)
        if answer is None:
            continue
        version, outputs = answer
        labels = np.asarray(outputs["label"]).ravel()
        measured[device.device_id] = (version, float(np.mean(labels == y_test)))
    return measured


def _final_table(console: Console, hardware: dict[str, str],
                 accuracy: dict[str, tuple[str, float]]) -> None:
    table = Table(title="each device: model served and its accuracy on the digits test split")
    for column in ("device", "hardware", "model", "accuracy"):
        table.add_column(column)
    for device_id in sorted(hardware):
        version, score = accuracy.get(device_id, ("-", float("nan")))
        table.add_row(device_id, hardware[device_id], f"digits {version}", f"{score:.4f}")
    console.print(table)


def _check(result: Any, accuracy: dict[str, tuple[str, float]]) -> None:
    from edgeota.samples import load_catalog

    expected = load_catalog()["digits_v2"].test_accuracy
    wrong = sorted(d for d in result.hardware
                   if accuracy.get(d, ("", 0.0))[0] != "2.0.0"
                   or abs(accuracy[d][1] - expected) > 1e-4)
    problems = list(result.problems)
    if wrong:
        problems.append(f"devices not on digits 2.0.0 at accuracy {expected:.4f}: "
                        f"{', '.join(wrong)}")
    if problems:
        raise EdgeotaError("; ".join(problems))
