"""Scenario files: what they accept, what they refuse and why, how the fleet is split."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeota.simulator.scenario import (
    ScenarioError,
    builtin_scenarios,
    load_scenario,
    parse_scenario,
)

MINIMAL = {"timeline": [{"action": "publish", "sample": "digits_v1",
                         "release": "digits@1.0.0"}]}


def test_every_builtin_scenario_loads() -> None:
    names = builtin_scenarios()
    assert {"staged", "flaky", "gate", "attacks", "demo"} <= set(names)
    for name in names:
        scenario = load_scenario(Path(name))
        assert scenario.timeline and scenario.devices >= 1


def test_the_fleet_is_split_by_share_and_interleaved() -> None:
    scenario = parse_scenario({**MINIMAL, "devices": 10, "fleet": [
        {"hardware": "rpi4", "share": 3}, {"hardware": "rpi5", "share": 1}]}, "t.toml")
    classes = [c.hardware for c in scenario.hardware_of()]
    assert classes.count("rpi4") == 8 or classes.count("rpi4") == 7
    assert len(classes) == 10 and classes[:2] == ["rpi4", "rpi5"]
    assert [c.hardware for c in scenario.with_devices(3).hardware_of()].count("rpi5") == 1


@pytest.mark.parametrize(("data", "why"), [
    ({**MINIMAL, "devise": 3}, "unknown key(s) ['devise']"),
    ({**MINIMAL, "devices": 0}, "devices must be a number in [1"),
    ({"timeline": []}, "must have 1 to"),
    ({"timeline": [{"action": "explode"}]}, "timeline[0].action must be one of"),
    ({"timeline": [{"action": "deploy", "release": "digits"}]}, "must be NAME@VERSION"),
    ({"timeline": [{"action": "publish", "release": "digits@1.0.0"}]},
     "timeline[0].sample must name a sample model"),
    ({**MINIMAL, "fleet": [{"hardware": "rpi4", "link": "wifi"}]}, "names no [links.wifi]"),
    ({**MINIMAL, "links": {"lan": {"disconnects_per_minute": -1}}}, "disconnects_per_minute"),
    ({**MINIMAL, "faults": [{"kind": "meteor"}]}, "faults[0].kind must be one of"),
    ({**MINIMAL, "faults": [{"kind": "crash", "when": "idle"}]}, "faults[0].when must be one of"),
    ({**MINIMAL, "behaviour": [{"release": "digits@2.0.0", "extra_latency_ms": -5}]},
     "extra_latency_ms must be a number"),
])
def test_bad_scenarios_are_refused_with_where_and_why(data: dict, why: str) -> None:
    with pytest.raises(ScenarioError) as error:
        parse_scenario(data, "bad.toml")
    assert str(error.value).startswith("bad.toml: ")
    assert why in str(error.value)


def test_a_missing_or_broken_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"no such scenario file .*built-in: attacks"):
        load_scenario(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("devices = [")
    with pytest.raises(ScenarioError, match="not valid TOML"):
        load_scenario(broken)
