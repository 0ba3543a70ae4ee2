"""A simulated fleet stepped in device processes: same agents, same report, same faults.

``Simulation(..., device_processes=P)`` keeps the server, timeline, faults and
recorder here and runs the agents in P spawned processes; these tests check
that the devices really ran elsewhere (the pids in their status snapshots),
that a rollout, a power cut and a dropped link work across the process
boundary, and that a device process that dies or cannot start is a problem
reported with its exit code and log -- never a hang.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sim_support import small_scenario

from edgeota.agent.config import AgentConfig
from edgeota.agent.runner import AgentSettings
from edgeota.simulator.device import DeviceSpec, DeviceTiming
from edgeota.simulator.processes import DeviceProcessError, DeviceProcessPool, RemoteDevice
from edgeota.simulator.run import Simulation, SimulationError
from edgeota.simulator.scenario import load_scenario

pytestmark = pytest.mark.timeout(300)



def scenario(devices: int, faults: list[dict[str, Any]], *, v2: bool = True,
             pad_mb: float = 0.0) -> Any:
    return small_scenario(devices, faults, v2=v2, pad_mb=pad_mb, hardware=("rpi4", "rpi5"),
                          name="processes-test.toml")


def fault_devices(events: list[tuple[float, str, dict]], kind: str) -> set[str]:
    return {d["device"] for _t, k, d in events
            if (k == "fault" and d.get("fault") == kind) or (k == kind == "disconnect")}


def test_a_fleet_in_two_processes_updates_with_power_cuts_and_dropped_links(
        tmp_path: Path) -> None:
    plan = scenario(6, [{"kind": "crash", "devices": 2, "when": "downloading"},
                        {"kind": "disconnect", "devices": 2, "when": "any"}], pad_mb=0.5)
    with Simulation(plan, tmp_path / "sim", workers=2, device_processes=2) as sim:
        assert sim.pool is not None and len(sim.pool.processes) == 2
        result = sim.run()
        statuses = {d.device_id: d.snapshot() for d in sim.devices}
        processes = {d.device_id: d.process.pid for d in sim.devices
                     if isinstance(d, RemoteDevice)}
        events = sim.recorder.events()
        logs = sorted(p.name for p in (tmp_path / "sim" / "device-processes").iterdir())
    assert result.ok, result.problems
    assert result.serving == {d: {"digits": "2.0.0"} for d in statuses}
    assert result.summary["waves"][-1]["devices_updated"] == 6
    assert result.summary["states"]["updated"] == 6
    # The agents ran in the two device processes, three each, not here.
    pids = Counter(s.pid for s in statuses.values())
    assert len(pids) == 2 and os.getpid() not in pids and set(pids.values()) == {3}
    assert all(statuses[d].pid == pid for d, pid in processes.items())
    assert "device-process-1.log" in logs and "device-process-2.log" in logs
    # Power cuts armed from here hit the agents there; each booted again and caught up.
    crashed = fault_devices(events, "crash")
    assert len(crashed) == 2
    for device_id in crashed:
        status = statuses[device_id]
        assert (status.power_losses, status.restarts, status.step_errors) == (1, 1, 0)
        assert status.download is not None and status.download.full_restarts == 0
    # Links cut from here were cut there: those devices connected again.
    dropped = fault_devices(events, "disconnect")
    assert dropped
    for device_id in dropped:
        connection = statuses[device_id].connection
        assert connection is not None and connection["connections"] >= 2
    assert all(s.step_errors == 0 for s in statuses.values())


def test_a_killed_device_process_is_a_problem_within_a_bounded_time(tmp_path: Path) -> None:
    plan = scenario(4, [], v2=False)
    killed: dict[str, Any] = {}

    def kill_once_deploying(sim: Simulation) -> None:
        if killed or sim.recorder.wave_label is None or sim.pool is None:
            return
        victim = sim.pool.processes[0]
        assert victim.pid is not None
        killed.update(pid=victim.pid, at=time.monotonic())
        os.kill(victim.pid, signal.SIGKILL)

    with Simulation(plan, tmp_path / "sim", workers=1, device_processes=2,
                    on_progress=kill_once_deploying) as sim:
        assert sim.pool is not None
        result = sim.run()
        noticed = time.monotonic() - killed["at"]
        offline = {d.device_id: d.snapshot().ready for d in sim.devices
                   if isinstance(d, RemoteDevice) and d.process.index == 1}
    assert killed and noticed < 30, noticed  # the deploy's own timeout is 120 s
    assert not result.ok
    (problem,) = [p for p in result.problems if p.startswith("device process 1 ")]
    assert f"(pid {killed['pid']};" in problem
    assert "exited with code -9 (SIGKILL)" in problem
    assert "its log ends:" in problem and "device process ready" in problem
    assert offline and not any(offline.values())  # its devices read as offline


def test_the_attack_suite_needs_the_devices_in_this_process(tmp_path: Path) -> None:
    with pytest.raises(SimulationError, match="needs the devices in this process"):
        Simulation(load_scenario(Path("attacks")), tmp_path, device_processes=2)
    with pytest.raises(SimulationError, match="device_processes must be in"):
        Simulation(scenario(2, []), tmp_path, device_processes=-1)


def test_a_device_process_that_cannot_start_says_why(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-device"
    config = AgentConfig(
        folder=missing, device_id="ghost-1", hardware="rpi4",
        repository_url="http://127.0.0.1:9/repo", token_file=missing / "token",
        identity_dir=missing / "identity", image_root=missing / "image-root.json",
        director_root=missing / "director-root.json", ca_cert=missing / "ca.pem",
        tls_cert=missing / "tls.pem", tls_key=missing / "tls.key", state_dir=missing / "state",
        mqtt_url="mqtts://127.0.0.1:9")
    pool = DeviceProcessPool([DeviceSpec(config, "rpi4")], processes=1,
                             settings=AgentSettings(), timing=DeviceTiming(),
                             log_dir=tmp_path / "logs")
    started = time.monotonic()
    try:
        with pytest.raises(DeviceProcessError) as error:
            pool.start(timeout=120)
    finally:
        pool.stop()
    assert time.monotonic() - started < 120
    text = str(error.value)
    assert text.startswith("device process 1 (pid ")
    assert "ghost-1) failed to start:" in text
    assert "its log ends:" in text
    assert not pool.processes[0].alive
