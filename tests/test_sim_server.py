"""Where a simulation's server runs: a child ``edgeota serve``, or one that already runs.

A simulation that starts ``edgeota serve`` in a child process reports the
server's own CPU time per device update (from its ``/metrics``); one that
joins a running server adds devices with ids and a tag unique to the run and
deploys only to them, so an operator can rehearse against a real server
without touching its real devices.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgeota.simulator.run import Simulation, SimulationError
from edgeota.simulator.scenario import load_scenario, parse_scenario
from edgeota.simulator.server import ServerChoice, ServerProcess, SimServerError

pytestmark = pytest.mark.timeout(300)

SMALL = {
    "name": "small",
    "devices": 3,
    "agent": {"probation_seconds": 0.2, "probation_min_inferences": 2},
    "timeline": [
        {"action": "publish", "sample": "digits_v1", "release": "digits@1.0.0"},
        {"action": "deploy", "release": "digits@1.0.0", "phases": [100],
         "latency_factor": 0, "error_rate_factor": 0, "timeout_seconds": 120},
    ],
}


def test_a_server_in_a_child_process_reports_its_cpu_per_update(tmp_path: Path) -> None:
    scenario = parse_scenario(SMALL, "small.toml")
    with Simulation(scenario, tmp_path, server=ServerChoice(mode="process")) as sim:
        assert not sim.server.in_process
        result = sim.run()
        server = sim.server
        assert isinstance(server, ServerProcess)
        process = server.process
        assert process is not None and process.poll() is None
    assert result.ok, result.problems
    assert all(serving == {"digits": "1.0.0"} for serving in result.serving.values())
    wave = result.summary["waves"][0]
    assert wave["server_cpu_seconds"] > 0
    assert wave["server_cpu_seconds_per_update"] == pytest.approx(
        wave["server_cpu_seconds"] / 3, rel=0.01)
    assert process.poll() is not None, "the child server outlived its simulation"


def test_joining_a_running_server_touches_only_the_runs_own_devices(tmp_path: Path) -> None:
    owner = ServerProcess()  # stands for a server an operator already runs
    try:
        owner.start(tmp_path / "existing")
        real = Simulation(parse_scenario({**SMALL, "devices": 1, "timeline": SMALL["timeline"][:1]},
                                         "one.toml"),
                          tmp_path / "real", server=ServerChoice(
                              mode="join", url=owner.url, home=owner.operator.home))
        with real:  # one device enrolled by another run: it must not be deployed to
            assert real.devices[0].device_id.startswith("sim-")
            real_device = real.devices[0].device_id
            real.run()
        choice = ServerChoice(mode="join", url=owner.url, home=owner.operator.home)
        scenario = parse_scenario({**SMALL, "timeline": [
            {"action": "deploy", "release": "digits@1.0.0", "phases": [100],
             "latency_factor": 0, "error_rate_factor": 0, "timeout_seconds": 120}]},
            "join.toml")
        with Simulation(scenario, tmp_path / "joined", server=choice) as sim:
            ids = [d.device_id for d in sim.devices]
            prefix = sim.server.device_id_prefix
            result = sim.run()
        assert result.ok, result.problems
        assert len(set(ids)) == 3 and all(i.startswith(prefix + "-") for i in ids)
        assert real_device not in ids
        assert result.summary["waves"][0]["server_cpu_seconds"] is not None
        deployment = result.deployments[0]
        assert deployment["counts"] == {"installed": 3}
        devices = {d["id"]: d for d in owner.client.get("/api/v1/devices")}
        assert devices[real_device]["tags"]["sim"] != prefix
        assert devices[ids[0]]["tags"]["sim"] == prefix
        detail = owner.client.get(f"/api/v1/deployments/{deployment['id']}")
        assigned = [a["device_id"] for phase in detail["phase_detail"] for a in phase["devices"]]
        assert sorted(assigned) == sorted(ids)
        assert devices[real_device]["assigned"] == {}
        metrics = httpx.get(f"{owner.url}/metrics", timeout=5).text
        assert any(f.name == "process_cpu_seconds"
                   for f in text_string_to_metric_families(metrics))
    finally:
        owner.stop()


def test_joining_needs_a_url_a_home_and_a_server_that_answers(tmp_path: Path) -> None:
    with pytest.raises(SimServerError, match="needs its URL"):
        ServerChoice(mode="join", url="http://127.0.0.1:1")
    with pytest.raises(SimServerError, match="only apply with --server"):
        ServerChoice(mode="process", broker="mqtts://x:1")
    from edgeota.server.home import init_home

    init_home(tmp_path / "home")
    choice = ServerChoice(mode="join", url="http://127.0.0.1:9", home=tmp_path / "home")
    with pytest.raises(SimulationError, match=r"no edgeota server answers http://127.0.0.1:9"):
        Simulation(parse_scenario(SMALL, "s.toml"), tmp_path / "w", server=choice).__enter__()


def test_the_attack_suite_refuses_a_server_out_of_reach(tmp_path: Path) -> None:
    with pytest.raises(SimulationError, match="need it in this process"):
        Simulation(load_scenario(Path("attacks")), tmp_path, server=ServerChoice(mode="process"))
