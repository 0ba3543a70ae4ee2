"""``edgeota demo``: the whole release flow on this machine, on embedded defaults.

A temporary home (SQLite, local keys), the update server in this process on
a loopback port, a small simulated fleet on two hardware classes. Release
managers publish digits v1 and v2 through the same code as `release
publish`; each device runs the agent's verified check and install (Uptane
full verification with ngclient over HTTP, key unwrap, one-pass decrypt,
validation gate) and the demo measures the accuracy each device's model
reaches on the digits test split. Then four attacks, refused. The MQTT
transport, hot swap and staged rollouts join as they land.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from edgeota.protocol.errors import EdgeotaError

_HARDWARE = ("rpi4", "rpi5")


def demo(
    devices: Annotated[int, typer.Option(min=1, max=200, help="Simulated devices.")] = 10,
    workdir: Annotated[
        Path | None,
        typer.Option(help="Keep the demo's files here instead of a temporary folder."),
    ] = None,
) -> None:
    """Publish two releases; watch a simulated fleet verify, decrypt, validate and install them."""
    with tempfile.TemporaryDirectory(prefix="edgeota-demo-") as scratch:
        base = workdir or Path(scratch)
        base.mkdir(parents=True, exist_ok=True)
        _run(base.resolve(), devices, Console())


def _run(base: Path, count: int, console: Console) -> None:
    import numpy as np

    from edgeota.agent.runner import Agent, AgentSettings
    from edgeota.samples import load_catalog, load_test_split, sample_path
    from edgeota.server.client import OperatorClient
    from edgeota.server.config import load_operator_config, load_server_config
    from edgeota.server.embedded import EmbeddedServer, bind_loopback
    from edgeota.server.enrollment import enroll_device
    from edgeota.server.home import HomeOptions, init_home
    from edgeota.server.publisher import PublishRequest, publish_release
    from edgeota.server.transport import MqttTransport

    console.rule("edgeota demo")
    sock = bind_loopback()
    probe = bind_loopback()
    mqtt_port = probe.getsockname()[1]
    probe.close()  # the embedded broker binds it
    init_home(base / "home", HomeOptions(http=f"127.0.0.1:{sock.getsockname()[1]}",
                                         mqtt=f"127.0.0.1:{mqtt_port}", bin_bits=4))
    operator = load_operator_config(base / "home")
    catalog = load_catalog()
    x_test, y_test = load_test_split()
    config = load_server_config(base / "home")
    agents: list[Agent] = []
    with EmbeddedServer(config, sock) as server, OperatorClient(
        server.url, operator.token()
    ) as client, MqttTransport(config.ca_dir, server.ctx.store, embedded_port=mqtt_port,
                               sessions=server.ctx.sessions,
                               clock=server.ctx.clock) as transport:
        server.ctx.notify = transport.notify
        console.print(f"server {server.url}, embedded broker {transport.address.url} "
                      f"(home {base / 'home'}, SQLite)")
        console.print(f"\n[bold]1. Enrol {count} devices on {len(_HARDWARE)} hardware classes[/]")
        fleet = []
        for index in range(count):
            hardware = _HARDWARE[index % len(_HARDWARE)]
            device_id = f"pi-{index + 1:03d}"
            agent = enroll_device(operator, client, device_id, hardware=hardware,
                                  tags={"fleet": "demo"}, out=base / "devices" / device_id)
            fleet.append(agent)
        console.print(f"  {count} identities (HPKE + Ed25519 + TLS), device tokens, agent.toml")
        settings = AgentSettings(probation_seconds=0, probation_min_inferences=len(y_test))
        for config_of_device in fleet:
            agent = Agent(config_of_device, settings, transport="mqtt")
            agent.start()
            agents.append(agent)
        console.print(f"  {count} agents connected to the broker with their device certificates")

        served: dict[str, tuple[str, float]] = {}
        for step, key in ((2, "digits_v1"), (3, "digits_v2")):
            sample = catalog[key]
            console.print(f"\n[bold]{step}. Release manager publishes digits {sample.version}; "
                          "the operator deploys it to the fleet[/]")
            release = publish_release(operator, client, PublishRequest(
                model=sample.path, name="digits", version=sample.version, hardware=_HARDWARE,
                vectors=sample.vectors_path, golden=sample_path("digits_golden.json"),
                min_accuracy=sample.recommended_min_accuracy))
            console.print(f"  release {release['id']} {release['status']}: "
                          f"{release['target_path']} ({release['length']} bytes sealed)")
            answer = client.post("/api/v1/deployments", {
                "name": "digits", "version": sample.version, "tags": {"fleet": "demo"},
                "devices": []})
            console.print(f"  deployment {answer['deployment_id']}: "
                          f"{len(answer['assigned'])} devices")
            outcomes: dict[str, str] = {}
            with Progress(console=console, transient=True) as progress:
                task = progress.add_task("devices verify, decrypt, validate and swap", total=count)
                for agent in agents:
                    agent.run_cycle()
                    # Probation on real traffic: the test split, one request per row.
                    labels = [int(agent.host.predict("digits", {"input": x_test[i:i + 1]})
                                  .outputs["label"][0]) for i in range(len(y_test))]
                    outcomes.update(agent.check_probation())
                    served[agent.config.device_id] = (
                        agent.host.current_version("digits"),
                        float(np.mean(np.array(labels) == y_test)))
                    progress.advance(task)
            versions = sorted({v for v, _ in served.values()})
            scores = sorted({f"{s:.4f}" for _, s in served.values()})
            states = sorted(set(outcomes.values()))
            console.print(f"  over MQTT every device verified both repositories, hot-swapped to "
                          f"{', '.join(versions)} and {', '.join(states)} it after probation; "
                          f"measured accuracy {', '.join(scores)}")

        console.print("\n[bold]4. Attacks, refused[/]")
        _attacks(console, base, operator, client, fleet, catalog)

        table = Table(title="what each device serves")
        for column in ("device", "hardware", "model", "accuracy (digits test split)"):
            table.add_column(column)
        for agent in fleet:
            version, score = served[agent.device_id]
            table.add_row(agent.device_id, agent.hardware, f"digits {version}", f"{score:.4f}")
        console.print(table)
        for agent in agents:
            agent.updates.close()
    expected = catalog["digits_v2"].test_accuracy
    wrong = [d for d, (v, s) in served.items() if v != "2.0.0" or abs(s - expected) > 1e-4]
    if wrong:
        raise EdgeotaError(f"devices not on digits 2.0.0 with accuracy {expected}: {wrong}")
    console.rule("done")
    console.print(f"{count} devices on digits 2.0.0 (accuracy {expected:.4f}). Coming next: "
                  "staged rollouts with model-aware gates, the dashboard and the fleet simulator.")


def _attacks(console: Console, base: Path, operator, client, fleet, catalog) -> None:
    from tuf.api.exceptions import DownloadHTTPError
    from tuf.ngclient import Updater

    from edgeota.agent.http_fetcher import HttpFetcher, HttpFetcherConfig
    from edgeota.agent.update_cycle import UpdateClient
    from edgeota.agent.validation import ValidationError
    from edgeota.protocol.errors import KeyUnwrapError
    from edgeota.server.publisher import PublishRequest, publish_release

    bad = catalog["digits_bad"]
    try:
        publish_release(operator, client, PublishRequest(
            model=bad.path, name="digits", version="3.0.0", hardware=_HARDWARE,
            vectors=catalog["digits_v2"].vectors_path))
        raise EdgeotaError("BUG: the bad model was published")
    except ValidationError as e:
        console.print(f"  a bad model with v2's vectors: [green]refused[/] ({e.reason})")

    victim, thief = fleet[0], fleet[1]
    folder = base / "attack-cache"
    folder.mkdir()
    try:
        Updater(str(folder), victim.director_metadata_url,
                fetcher=HttpFetcher(HttpFetcherConfig(token=thief.token())),
                bootstrap=victim.director_root.read_bytes()).refresh()
        raise EdgeotaError("BUG: another device's director metadata was served")
    except DownloadHTTPError as e:
        console.print(f"  {thief.device_id} reads {victim.device_id}'s director metadata: "
                      f"[green]refused[/] (HTTP {e.status_code})")

    thief_client = UpdateClient(thief)
    (own,) = thief_client.check()
    (theirs,) = UpdateClient(victim).check()
    stolen = dataclasses.replace(own, director=dataclasses.replace(
        own.director, wrapped_key=theirs.director.wrapped_key))
    try:
        thief_client.install(stolen)
        raise EdgeotaError("BUG: a key wrapped for another device opened")
    except KeyUnwrapError:
        console.print(f"  {thief.device_id} uses {victim.device_id}'s wrapped content key: "
                      "[green]refused[/] (KeyUnwrapError)")

    from edgeota.agent.uptane import RefusalReason, UptaneRefusal

    try:
        thief_client.check(release_floor=99)
        raise EdgeotaError("BUG: a release below the floor was accepted")
    except UptaneRefusal as e:
        assert e.reason is RefusalReason.BELOW_FLOOR
        console.print("  a release below the device's release-counter floor: [green]refused[/] "
                      f"({e.reason})")
