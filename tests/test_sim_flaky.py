"""100 simulated devices update over a flaky network, resuming instead of starting over.

The built-in ``flaky`` scenario, run as ``edgeota sim run --scenario flaky`` runs it:
real server, embedded TLS broker, 100 real agents on one shared network loop,
a 1 MiB bundle, links that drop at random and 30 devices whose link drops
mid-download. Every device must end on 2.0.0, with downloads resumed and no
bundle fetched twice.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgeota.simulator.run import Simulation
from edgeota.simulator.scenario import load_scenario


def test_a_flaky_network_fleet_updates_completely_without_full_redownloads(
        tmp_path: Path) -> None:
    scenario = load_scenario(Path("flaky"))
    assert scenario.devices == 100
    with Simulation(scenario, tmp_path / "sim", workers=6) as sim:
        result = sim.run(tmp_path / "report")
        lengths = {r["target_path"]: r["length"] for r in sim.client.get("/api/v1/releases")}
        stats = {d.device_id: d.download_stats() for d in sim.devices}
        drops = sum(d.agent.session.counters().connections - 1 for d in sim.devices)
    assert result.ok, result.problems
    assert {v.get("digits") for v in result.serving.values()} == {"2.0.0"}
    assert len(result.serving) == 100
    (bundle,) = lengths.values()
    # Links really dropped, and downloads continued where they stopped ...
    assert drops >= 30
    assert sum(s.resumes for s in stats.values()) > 0
    # ... and no device fetched its bundle twice: at most one window (8 x 64 KiB) again.
    assert sum(s.full_restarts for s in stats.values()) == 0
    assert all(s.completed >= 1 for s in stats.values())
    assert all(s.bytes_fetched <= bundle + 8 * 64 * 1024 * max(1, s.resumes)
               for s in stats.values())
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["waves"][-1]["resume"]["full_restarts"] == 0
