"""Simulator faults on real agents: power cuts at any state, a full disk, damaged chunks, skew.

Each fault acts on the unmodified agent (its journal, its fetcher, its
clock) or on real bytes in transit; the tests check what a device ends with
(the model it serves, the reason it reported) and what it cost (resumes,
refused frames), never that a hook was merely called. Fleets are two or three
devices with small bundles, so each simulation takes seconds.
"""

from __future__ import annotations

import errno
import hashlib
import os
import types
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from server_support import RunningServer
from sim_support import small_scenario

from edgeota.agent.config import AgentConfig
from edgeota.agent.journal import Journal, JournalRecord, ModelRef, State
from edgeota.agent.runner import Agent, AgentSettings
from edgeota.agent.update_cycle import FREE_SPACE_MARGIN, DiskFullError
from edgeota.protocol import archive
from edgeota.protocol.manifest import Manifest
from edgeota.simulator.device import POWER_LOSS_STATES, SimulatedPowerLoss
from edgeota.simulator.run import Simulation
from edgeota.simulator.scenario import CRASH_STATES, ScenarioError

SETTINGS = AgentSettings(probation_seconds=0, probation_min_inferences=5)
WINDOW_BYTES = 8 * 64 * 1024  # the resumable download's window: what a cut may re-fetch


def scenario(devices: int, faults: list[dict[str, Any]], *, pad_mb: float = 0.0,
             v2: bool = False, **extra: Any) -> Any:
    return small_scenario(devices, faults, v2=v2, pad_mb=pad_mb, name="faults-test.toml", **extra)


def bundle_length(sim: Simulation, version: str) -> int:
    (length,) = [r["length"] for r in sim.client.get("/api/v1/releases")
                 if r["version"] == version]
    return int(length)


def assert_verified_install(device: Any, version: str) -> None:
    """The committed model's files are exactly what its signed manifest pins."""
    record = device.agent.journal("digits").current
    served = record.previous if record.state == "idle" else record.target
    assert served is not None and served.version == version
    folder = Path(served.model_dir)
    manifest = Manifest.from_json((folder / "manifest.json").read_bytes())
    for pinned in manifest.files:
        data = (folder / pinned.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == pinned.sha256


# -- the scenario keys ----------------------------------------------------------------


def test_the_crash_states_are_the_journal_states_an_update_passes() -> None:
    assert CRASH_STATES == POWER_LOSS_STATES


@pytest.mark.parametrize(("fault", "why"), [
    ({"kind": "disk_full", "ratio": 0.5}, "has key(s) ['ratio'] that kind disk_full"),
    ({"kind": "corrupt_chunks"}, "faults[0].ratio is required"),
    ({"kind": "corrupt_chunks", "ratio": 0}, "faults[0].ratio must be above 0"),
    ({"kind": "corrupt_chunks", "ratio": 1.5}, "faults[0].ratio must be a number"),
    ({"kind": "clock_skew"}, "faults[0].seconds is required"),
    ({"kind": "clock_skew", "seconds": 0}, "faults[0].seconds must not be 0"),
    ({"kind": "clock_skew", "seconds": 1e12}, "faults[0].seconds must be a number"),
    ({"kind": "disk_full", "duration": -1}, "faults[0].duration must be a number"),
    ({"kind": "disk_full", "when": "downloading"}, "faults[0].when must be one of"),
    ({"kind": "crash", "when": "committed"}, "faults[0].when must be one of"),
    ({"kind": "crash", "seconds": 3}, "that kind crash does not take"),
])
def test_bad_faults_are_refused_with_where_and_why(fault: dict, why: str) -> None:
    with pytest.raises(ScenarioError) as error:
        scenario(1, [fault])
    assert str(error.value).startswith("faults-test.toml: ")
    assert why in str(error.value)


@pytest.mark.parametrize(("link", "why"), [
    ({"bandwidth_kbps": 1}, "links.wan.bandwidth_kbps must be a number in [16.0"),
    ({"latency_ms": -5}, "links.wan.latency_ms must be a number"),
    ({"latency_ms": 20, "jitter_ms": 5}, "has unknown key(s) ['jitter_ms']"),
])
def test_bad_link_shapes_are_refused(link: dict, why: str) -> None:
    with pytest.raises(ScenarioError, match=r"^faults-test\.toml: ") as error:
        scenario(1, [], links={"wan": link})
    assert why in str(error.value)


def test_the_shipped_faults_scenario_loads_small() -> None:
    from edgeota.simulator.scenario import load_scenario

    loaded = load_scenario(Path("faults"))
    assert loaded.devices <= 12
    assert {f.kind for f in loaded.faults} == {"crash", "disk_full", "corrupt_chunks",
                                               "clock_skew"}
    assert any(p.shaped for p in loaded.links.values())


# -- power cuts -----------------------------------------------------------------------


def test_the_journal_observer_runs_once_a_record_is_durable(tmp_path: Path) -> None:
    path = tmp_path / "journal-digits.json"
    seen: list[tuple[str, bool]] = []

    def observe(record: JournalRecord) -> None:
        seen.append((str(record.state), JournalRecord.from_json(path.read_bytes()) == record))
        if record.state is State.DOWNLOADING:
            raise SimulatedPowerLoss("pi-1", "downloading")

    def clock() -> datetime:
        return datetime.now(UTC)

    journal = Journal(path, clock=clock, on_saved=observe)
    journal.load()
    target = ModelRef("models/digits-2.eotb", "a" * 64, "digits", "2.0.0", 2)
    with pytest.raises(SimulatedPowerLoss):
        journal.begin(target)
    assert seen == [("downloading", True)]
    # What the next boot finds is the state the cut happened in.
    assert Journal(path, clock=clock).load().state is State.DOWNLOADING


def test_a_power_cut_mid_download_resumes_and_the_device_ends_updated(
        tmp_path: Path) -> None:
    plan = scenario(2, [{"kind": "crash", "devices": 2, "when": "downloading"}], pad_mb=1.0)
    with Simulation(plan, tmp_path / "sim", workers=2) as sim:
        result = sim.run()
        length = bundle_length(sim, "1.0.0")
        devices = list(sim.devices)
        stats = [d.download_stats() for d in devices]
    assert result.ok, result.problems
    assert {v.get("digits") for v in result.serving.values()} == {"1.0.0"}
    assert length > 2 * WINDOW_BYTES  # the cut lands after a durable window
    for device, stat in zip(devices, stats, strict=True):
        assert device.counters.power_losses == 1 and device.restarts == 1
        assert device.counters.step_errors == 0
        # Resumed from what was durable, not started over.
        assert stat.resumes >= 1 and stat.full_restarts == 0
        assert stat.bytes_fetched <= length + WINDOW_BYTES * stat.resumes
        assert_verified_install(device, "1.0.0")


@pytest.mark.parametrize("state", ["validating", "probation"])
def test_a_power_cut_in_a_later_state_ends_updated_too(tmp_path: Path, state: str) -> None:
    plan = scenario(1, [{"kind": "crash", "devices": 1, "when": state}])
    with Simulation(plan, tmp_path / "sim", workers=1) as sim:
        result = sim.run()
        (device,) = sim.devices
        history = [str(s) for s, _ in device.agent.journal("digits").current.history]
    assert result.ok, result.problems
    assert result.serving[device.device_id] == {"digits": "1.0.0"}
    assert device.counters.power_losses == 1 and device.counters.step_errors == 0
    assert_verified_install(device, "1.0.0")
    # The reboot's recovery is in the journal: before the swap the update goes on
    # from verifying (the unpacked files are not trusted; nothing failed); in
    # probation the new model is reverted (it may be the culprit).
    if state == "probation":
        assert "rolled_back" in history
    else:
        assert "failed" not in history and history.count("verifying") >= 2, history
    assert history[-2:] == ["committed", "idle"]


# -- a full disk ------------------------------------------------------------------------


def agent_serving_v1(server: RunningServer) -> Agent:
    config = AgentConfig.load(server.enroll("pi-1") / "agent.toml")
    agent = Agent(config, SETTINGS)
    agent.start()
    assert server.publish("digits_v1", "1.0.0").code == 0
    assert server.cli("deploy", "digits@1.0.0", "--devices", "pi-1").code == 0
    assert agent.run_cycle().states == {"digits": "probation"}
    exercise(agent)
    assert agent.check_probation() == {"digits": "committed"}
    return agent


def exercise(agent: Agent) -> None:
    from edgeota.samples import load_test_split

    x, _ = load_test_split()
    for row in range(6):
        agent.host.predict("digits", {"input": x[row:row + 1]})


def leftovers(agent: Agent) -> list[str]:
    """Files an install attempt may leave: downloads, half-unpacked or unpacked model folders."""
    state = agent.config.state_dir
    found = [p for p in (state / "downloads").rglob("*") if p.is_file()]
    found += [p for p in (state / "models" / "digits").iterdir() if not p.name.startswith("1.")]
    return sorted(str(p.relative_to(state)) for p in found)


def test_a_full_disk_fails_the_update_cleanly_and_it_is_retried(server: RunningServer) -> None:
    agent = agent_serving_v1(server)
    assert server.publish("digits_v2", "2.0.0").code == 0
    assert server.cli("deploy", "digits@2.0.0", "--devices", "pi-1").code == 0
    asked: list[Path] = []

    def nearly_full(folder: Path) -> int:
        asked.append(folder)
        return FREE_SPACE_MARGIN  # the margin alone: no room for bundle and model

    agent.updates.disk_free = nearly_full
    outcome = agent.run_cycle()
    assert outcome.states == {"digits": "failed"}
    assert outcome.reasons == {"digits": "disk_full"}
    assert asked == [agent.config.state_dir]
    assert agent.host.current_version("digits") == "1.0.0"
    assert leftovers(agent) == []
    record = agent.journal("digits").current
    assert record.state == "idle" and record.previous is not None
    assert record.previous.version == "1.0.0"
    assert ("failed" in [str(s) for s, _ in record.history])
    # Space came back: the next cycle installs it.
    agent.updates.disk_free = lambda _folder: 1 << 40
    assert agent.run_cycle().states == {"digits": "probation"}
    exercise(agent)
    assert agent.check_probation() == {"digits": "committed"}
    assert agent.host.current_version("digits") == "2.0.0"


class _Card:
    """``os.write``/``os.writev`` for the unpacker that take ``room`` bytes, then fail
    as a full disk does (``room[1]`` counts the refusals)."""

    def __init__(self, room: list[int]) -> None:
        self._room = room

    def _take(self, size: int) -> None:
        if size > self._room[0]:
            self._room[1] += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room[0] -= size

    def write(self, fd: int, data: Any) -> int:
        self._take(len(data))
        return os.write(fd, data)

    def writev(self, fd: int, buffers: Any) -> int:
        buffers = list(buffers)
        self._take(sum(len(b) for b in buffers))
        return os.writev(fd, buffers)


def test_enospc_while_unpacking_becomes_disk_full_and_leaves_nothing(
        server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    agent = agent_serving_v1(server)
    assert server.publish("digits_v2", "2.0.0").code == 0
    assert server.cli("deploy", "digits@2.0.0", "--devices", "pi-1").code == 0
    room = [4096, 0]  # bytes left on the card, writes refused
    fake_os = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os)
                                       if not k.startswith("__")})
    card = _Card(room)
    fake_os.write, fake_os.writev = card.write, card.writev
    monkeypatch.setattr(archive, "os", fake_os)
    (decision,) = agent.updates.check(release_floor=agent.release_floor())
    with pytest.raises(DiskFullError, match="disk full while unpacking"):
        agent.updates.install(decision)
    assert room[1] == 1  # the write path really ran out of room
    assert leftovers(agent) == []
    # Through the agent: the journal says why, the old model keeps serving.
    room[0] = 4096
    assert agent.run_cycle().reasons == {"digits": "disk_full"}
    assert agent.host.current_version("digits") == "1.0.0"
    assert leftovers(agent) == []
    monkeypatch.undo()
    assert agent.run_cycle().states == {"digits": "probation"}


def served_while(kind: str, seen: dict[str, set[str]]) -> Callable[[Simulation], None]:
    """A progress hook noting, per device, the digits versions served while ``kind`` is on."""
    def watch(sim: Simulation) -> None:
        if sim.faults is None:
            return
        for device in sim.devices:
            if device.device_id in sim.faults.active(kind):
                seen.setdefault(device.device_id, set()).add(
                    device.serving().get("digits", "-"))

    return watch


def test_a_fleet_with_a_full_disk_reports_it_keeps_its_model_then_updates(
        tmp_path: Path) -> None:
    plan = scenario(2, [{"kind": "disk_full", "devices": 1, "when": "serving",
                         "duration": 10}], v2=True)
    seen: dict[str, set[str]] = {}  # what the full device served while its disk was full
    with Simulation(plan, tmp_path / "sim", workers=2,
                    on_progress=served_while("disk_full", seen)) as sim:
        result = sim.run()
        failures = sim.recorder.failures
        reasons = {d.device_id: d.agent.journal("digits").current for d in sim.devices}
    assert result.ok, result.problems
    assert {v.get("digits") for v in result.serving.values()} == {"2.0.0"}
    assert failures.get("disk_full", 0) >= 1, failures
    (full,) = seen
    assert seen[full] == {"1.0.0"}  # never without a model, never half-updated
    assert reasons[full].previous is not None


# -- damaged chunks -----------------------------------------------------------------------


def test_damaged_chunks_are_refused_refetched_and_never_installed(tmp_path: Path) -> None:
    plan = scenario(2, [{"kind": "corrupt_chunks", "devices": 1, "ratio": 0.3}], pad_mb=0.5)
    with Simulation(plan, tmp_path / "sim", workers=2) as sim:
        result = sim.run()
        assert sim.faults is not None and sim.faults.corrupter is not None
        damaged = dict(sim.faults.corrupter.damaged)
        devices = list(sim.devices)
        corrupt = {d.device_id: d.agent.session.counters().corrupt for d in devices}
        stats = {d.device_id: d.download_stats() for d in devices}
        length = bundle_length(sim, "1.0.0")
    assert result.ok, result.problems
    assert {v.get("digits") for v in result.serving.values()} == {"1.0.0"}
    (victim,) = damaged
    assert damaged[victim] >= 1
    # Every damaged frame was caught by the device's frame check, and retried.
    assert corrupt[victim] == damaged[victim]
    assert stats[victim].resumes >= 1
    assert all(c == 0 for d, c in corrupt.items() if d != victim)
    # No damaged byte reached a file: the bundles hashed right the first time.
    assert all(s.full_restarts == 0 and s.completed == 1 for s in stats.values())
    assert stats[victim].bytes_fetched <= length + WINDOW_BYTES * stats[victim].resumes
    for device in devices:
        assert_verified_install(device, "1.0.0")


# -- a skewed clock -------------------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "reason"), [
    (-86400 * 400, "clock_untrusted"),  # far behind the persisted time floor
    (86400 * 400, "expired_metadata"),  # beyond every metadata expiry
])
def test_a_skewed_clock_stops_updates_until_it_is_right(
        tmp_path: Path, seconds: int, reason: str) -> None:
    plan = scenario(2, [{"kind": "clock_skew", "devices": 1, "seconds": seconds,
                         "when": "serving", "duration": 10}], v2=True)
    seen: dict[str, set[str]] = {}  # what the skewed device served while skewed
    with Simulation(plan, tmp_path / "sim", workers=2,
                    on_progress=served_while("clock_skew", seen)) as sim:
        result = sim.run()
        refused = {d.device_id: dict(d.counters.check_failures) for d in sim.devices}
        floors = {d.device_id: d.agent.floor.floor for d in sim.devices}
    assert result.ok, result.problems
    assert {v.get("digits") for v in result.serving.values()} == {"2.0.0"}
    (skewed,) = seen
    assert seen[skewed] == {"1.0.0"}  # the model did not change while the clock was wrong
    assert refused[skewed].get(reason, 0) >= 1, refused
    assert result.summary["check_failures"].get(reason, 0) >= 1  # and the report says so
    assert all(reason not in r for d, r in refused.items() if d != skewed)
    # A clock set forward never pushed the floor out of reach.
    assert max(floors.values()) - min(floors.values()) < timedelta(days=1)
