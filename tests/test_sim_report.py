"""The simulator's report: classification, recorder bounds, figures, files and the live view.

Fast unit tests on duck-typed fake devices (exactly what the classifier reads:
the connection's ``ready``, ``serving()``, the agent's journals) with real
journal records and an injected clock.
"""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from PIL import Image
from rich.console import Console

from edgeota.agent.journal import JournalRecord, ModelRef, State
from edgeota.simulator.report import (
    DEVICE_STATES,
    FleetRecorder,
    classify,
    device_status,
    live_view,
    time_to_fraction,
)

MODEL = "digits"
_BASE = datetime(2025, 1, 1, tzinfo=UTC)


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeConnection:
    def __init__(self) -> None:
        self.ready = True
        self.counts = SimpleNamespace(connections=1)

    def counters(self) -> SimpleNamespace:
        return self.counts


class FakeJournal:
    def __init__(self, record: JournalRecord) -> None:
        self.current = record


class FakeAgent:
    def __init__(self) -> None:
        self.session = FakeConnection()
        self.journals: dict[str, FakeJournal] = {}

    def journal(self, name: str) -> FakeJournal:
        return self.journals[name]  # a KeyError here: the classifier created a journal

    def journal_records(self) -> dict[str, JournalRecord]:
        return {name: journal.current for name, journal in self.journals.items()}


class FakeDevice:
    """Moves through the journal states the real agent saves, with the same history."""

    def __init__(self, device_id: str, hardware: str = "rpi4", serving: str | None = "1.0.0"):
        self.device_id = device_id
        self.hardware = hardware
        self.agent = FakeAgent()
        self.counters = SimpleNamespace(reasons={})
        self.models: dict[str, str] = {MODEL: serving} if serving else {}
        self._tick = 0

    def serving(self) -> dict[str, str]:
        return dict(self.models)

    def _now(self) -> str:
        self._tick += 1
        return (_BASE + timedelta(seconds=self._tick)).isoformat()

    def enter(self, state: State, version: str = "2.0.0", reason: str | None = None,
              name: str = MODEL) -> None:
        journal = self.agent.journals.get(name)
        history = journal.current.history if journal else ()
        now = self._now()
        target = None if state is State.IDLE else _ref(name, version)
        record = JournalRecord(state, entered_at=now, target=target, reason=reason,
                               history=(*history, (state, now))[-16:])
        self.agent.journals[name] = FakeJournal(record)

    def fail(self, state: State, reason: str, version: str = "2.0.0") -> None:
        """An outcome, reported at once: the journal is idle again (as in Agent._finish)."""
        self.enter(State.DOWNLOADING, version)
        if state is State.ROLLED_BACK:
            self.enter(State.PROBATION, version)
        self.enter(state, version, reason)
        self.enter(State.IDLE)
        if hasattr(self.counters, "reasons"):  # the optional hook; tests remove it
            self.counters.reasons[MODEL] = reason

    def commit(self, version: str = "2.0.0", name: str = MODEL) -> None:
        for state in (State.DOWNLOADING, State.PROBATION, State.COMMITTED, State.IDLE):
            self.enter(state, version, name=name)
        self.models[name] = version


def _ref(name: str, version: str) -> ModelRef:
    return ModelRef(target_path=f"{name}/{version}.bundle", sha256="ab" * 32, name=name,
                    version=version, release_counter=1)


def _fleet(n: int, **kwargs) -> list[FakeDevice]:
    return [FakeDevice(f"dev-{i:02d}", hardware="rpi4" if i % 2 else "rpi5", **kwargs)
            for i in range(1, n + 1)]


TARGET = {MODEL: "2.0.0"}


def _times(wave: dict) -> tuple[float | None, ...]:
    return wave["time_to_50"], wave["time_to_95"], wave["time_to_100"]


# -- classification -----------------------------------------------------------------------


def test_offline_when_the_connection_is_not_ready() -> None:
    device = FakeDevice("d")
    device.enter(State.DOWNLOADING)
    device.agent.session.ready = False
    assert classify(device, TARGET) == "offline"


def test_a_device_serving_its_target_is_updated_even_while_its_link_is_down() -> None:
    device = FakeDevice("d")
    device.commit("2.0.0")
    device.agent.session.ready = False
    assert classify(device, TARGET) == "updated"
    assert classify(device, {}) == "offline"  # nothing to be updated to


def test_no_connection_is_never_offline() -> None:
    device = FakeDevice("d")
    device.agent.session = None
    assert classify(device, TARGET) == "waiting"


def test_a_device_without_a_journal_for_the_model_is_waiting() -> None:
    # FakeAgent.journal raises KeyError: the classifier must not create a journal.
    assert classify(FakeDevice("d"), TARGET) == "waiting"
    assert classify(FakeDevice("d", serving=None), TARGET) == "waiting"


@pytest.mark.parametrize("state", [State.DOWNLOADING, State.VERIFYING, State.VALIDATING,
                                   State.SWAPPING])
def test_update_in_progress_is_downloading(state: State) -> None:
    device = FakeDevice("d")
    device.enter(state)
    assert classify(device, TARGET) == "downloading"


def test_probation_even_while_serving_the_target() -> None:
    device = FakeDevice("d")
    device.enter(State.PROBATION)
    device.models[MODEL] = "2.0.0"
    assert classify(device, TARGET) == "probation"


def test_updated_once_committed_and_serving_every_target() -> None:
    device = FakeDevice("d")
    device.commit("2.0.0")
    assert device_status(device, TARGET).state == "updated"
    assert device_status(device, TARGET).version == "digits@2.0.0"
    assert classify(device, {MODEL: "3.0.0"}) == "waiting"


def test_failed_read_from_an_unreported_journal_state() -> None:
    device = FakeDevice("d")
    device.enter(State.FAILED, reason="corrupt_journal")
    status = device_status(device, TARGET)
    assert (status.state, status.reason) == ("failed", "corrupt_journal")


def test_outcomes_read_from_the_history_once_reported() -> None:
    failed, rolled = FakeDevice("a"), FakeDevice("b")
    failed.fail(State.FAILED, "hash_mismatch")
    rolled.fail(State.ROLLED_BACK, "latency_regression")
    assert failed.agent.journal(MODEL).current.state is State.IDLE
    assert device_status(failed, TARGET).state == "failed"
    assert device_status(failed, TARGET).reason == "hash_mismatch"
    assert device_status(rolled, TARGET).state == "rolled_back"
    assert device_status(rolled, TARGET).reason == "latency_regression"
    # Without the counters' reason hook the reason is unknown, the state is not.
    del rolled.counters.reasons
    assert device_status(rolled, TARGET).reason is None
    assert classify(rolled, TARGET) == "rolled_back"


def test_outcomes_before_the_wave_do_not_count() -> None:
    device = FakeDevice("d")
    device.fail(State.ROLLED_BACK, "latency_regression")
    since = {MODEL: device.agent.journal(MODEL).current.history[-1]}
    assert classify(device, {MODEL: "3.0.0"}, since=since) == "waiting"
    device.fail(State.FAILED, "vectors_mismatch", version="3.0.0")
    assert classify(device, {MODEL: "3.0.0"}, since=since) == "failed"
    # A ``since`` entry no longer in the bounded history: all of it is newer.
    assert classify(device, TARGET, since={MODEL: (State.IDLE, _BASE.isoformat())}) == "failed"


def test_a_new_attempt_clears_the_failure() -> None:
    device = FakeDevice("d")
    device.fail(State.FAILED, "hash_mismatch")
    device.enter(State.DOWNLOADING)
    assert classify(device, TARGET) == "downloading"
    device.enter(State.DOWNLOADING)
    device.enter(State.PROBATION)
    device.enter(State.COMMITTED)
    device.enter(State.IDLE)
    assert classify(device, TARGET) == "waiting"  # committed but not served: not updated


def test_several_models_show_the_most_telling_state() -> None:
    device = FakeDevice("d")
    device.commit("2.0.0")
    targets = {MODEL: "2.0.0", "kws": "1.0.0"}
    assert classify(device, targets) == "waiting"
    device.enter(State.DOWNLOADING, "1.0.0", name="kws")
    assert classify(device, targets) == "downloading"
    device.commit("1.0.0", name="kws")
    status = device_status(device, targets)
    assert (status.state, status.version) == ("updated", "digits@2.0.0;kws@1.0.0")
    assert classify(device, {}) == "waiting"  # nothing to be updated to


# -- recorder -----------------------------------------------------------------------------


def test_transitions_are_recorded_only_on_change() -> None:
    clock = FakeClock()
    devices = _fleet(3)
    recorder = FleetRecorder(devices, clock=clock)
    for step in range(5):
        clock.t = 100 + step
        recorder.sample()
    assert [len(recorder.transitions(d.device_id)) for d in devices] == [1, 1, 1]
    assert len(recorder.count_rows()) == 1
    clock.t = 110
    recorder.set_targets(TARGET, "v2")  # waiting under the new targets too: no change
    clock.t = 112.5
    devices[0].enter(State.DOWNLOADING)
    recorder.sample()
    recorder.sample()
    clock.t = 114
    devices[0].commit("2.0.0")
    recorder.sample()
    rows = recorder.transitions("dev-01")
    assert [(t, s.state) for t, s in rows] == [(0.0, "waiting"), (12.5, "downloading"),
                                             (14.0, "updated")]
    assert rows[-1][1].version == "digits@2.0.0"
    assert len(recorder.transitions("dev-02")) == 1
    counts = recorder.count_rows()
    assert [t for t, _c in counts] == [0.0, 12.5, 14.0]
    assert counts[-1][1]["updated"] == 1 and counts[-1][1]["waiting"] == 2
    assert recorder.counts() == {**dict.fromkeys(DEVICE_STATES, 0), "waiting": 2, "updated": 1}


def test_time_to_update_percentiles_are_exact() -> None:
    clock = FakeClock(50.0)
    devices = _fleet(20)
    recorder = FleetRecorder(devices, clock=clock)
    clock.t = 55.0
    recorder.set_targets(TARGET, "to 2.0.0")
    for i, device in enumerate(devices, start=1):  # device i is updated i seconds in
        clock.t = 55.0 + i
        device.commit("2.0.0")
        recorder.sample()
        if i == 9:
            early = recorder.summary()["waves"][0]
            assert early["time_to_50"] is early["time_to_95"] is early["time_to_100"] is None
    wave = recorder.summary()["waves"][0]
    assert _times(wave) == (10.0, 19.0, 20.0)
    assert wave["devices_updated"] == wave["updated_at_end"] == wave["eligible_devices"] == 20
    assert wave["time_to_update_seconds"] == {"min": 1.0, "mean": 10.5, "max": 20.0}
    assert wave["started_at_seconds"] == 5.0 and wave["duration_seconds"] == 20.0
    assert wave["ongoing"] is True


def test_a_wave_for_some_devices_counts_only_them() -> None:
    clock = FakeClock()
    devices = _fleet(4)
    recorder = FleetRecorder(devices, clock=clock)
    recorder.set_targets(TARGET, "half", devices=["dev-01", "dev-02"])
    for i, device in enumerate(devices, start=1):
        clock.t = 100 + i
        device.commit("2.0.0")
        recorder.sample()
    wave = recorder.summary()["waves"][0]
    assert wave["eligible_devices"] == 2
    assert _times(wave) == (1.0, 2.0, 2.0)


def test_already_updated_devices_count_at_time_zero_and_waves_close() -> None:
    clock = FakeClock()
    devices = _fleet(2)
    devices[0].commit("2.0.0")
    recorder = FleetRecorder(devices, clock=clock)
    clock.t = 101
    recorder.set_targets(TARGET, "v2")
    clock.t = 104
    recorder.set_targets({MODEL: "3.0.0"}, "v3")
    clock.t = 110
    summary = recorder.summary()
    first, second = summary["waves"]
    assert _times(first) == (0.0, None, None)
    assert (first["duration_seconds"], first["ongoing"], first["updated_at_end"]) == (3.0, False, 1)
    assert second["devices_updated"] == 0 and second["ongoing"] is True
    assert summary["states"]["waiting"] == 2


def test_an_earlier_wave_counts_devices_that_reach_its_target_late() -> None:
    clock = FakeClock()
    devices = _fleet(2)
    recorder = FleetRecorder(devices, clock=clock)
    recorder.set_targets({MODEL: "1.5.0"}, "v1.5", devices=["dev-01", "dev-02", "ghost"])
    clock.t = 101
    for device in devices:
        device.enter(State.PROBATION, "1.5.0")
        device.models[MODEL] = "1.5.0"  # swapped, not yet committed
    recorder.sample()
    clock.t = 102
    recorder.set_targets(TARGET, "v2")
    clock.t = 103.5
    devices[0].enter(State.COMMITTED, "1.5.0")
    devices[0].enter(State.IDLE)
    recorder.sample()
    first, second = recorder.summary()["waves"]
    assert first["eligible_devices"] == 2  # the unknown id is ignored
    assert (first["devices_updated"], first["updated_at_end"]) == (1, 0)
    assert _times(first) == (3.5, None, None)
    assert second["devices_updated"] == 0


def test_time_to_fraction() -> None:
    times = [float(i) for i in range(1, 21)]
    assert [time_to_fraction(times, 20, p) for p in (50, 95, 100)] == [10.0, 19.0, 20.0]
    assert time_to_fraction(times[:3], 3, 50) == 2.0  # ceil(1.5) = 2nd device
    assert time_to_fraction([], 0, 50) is None
    assert time_to_fraction([1.0], 3, 100) is None


def test_failures_by_reason() -> None:
    clock = FakeClock()
    devices = _fleet(4)
    recorder = FleetRecorder(devices, clock=clock)
    devices[3].fail(State.FAILED, "before_the_wave")  # an earlier outcome: not this wave's
    recorder.set_targets(TARGET, "v2")
    assert recorder.counts()["waiting"] == 4
    devices[0].fail(State.ROLLED_BACK, "latency_regression")
    devices[1].fail(State.ROLLED_BACK, "latency_regression")
    devices[2].fail(State.FAILED, "hash_mismatch")
    for _ in range(3):
        clock.t += 1
        recorder.sample()  # seen again and again: counted once
    devices[2].fail(State.FAILED, "hash_mismatch")  # a retry failed between two samples
    recorder.sample()
    assert recorder.failures == {"latency_regression": 2, "hash_mismatch": 2}
    wave = recorder.summary()["waves"][0]
    assert wave["failures"] == {"latency_regression": 2, "hash_mismatch": 2}
    assert wave["failures_by_state"] == {"rolled_back": 2, "failed": 2}
    assert recorder.counts()["rolled_back"] == 2 and recorder.counts()["failed"] == 1
    del devices[3].counters.reasons
    devices[3].fail(State.FAILED, "x")
    recorder.sample()
    assert recorder.failures["unknown"] == 1


def test_bounds_are_kept_and_overflow_counted(tmp_path) -> None:
    clock = FakeClock()
    devices = _fleet(2)
    recorder = FleetRecorder(devices, clock=clock, max_transitions=5, max_count_rows=4,
                             max_events=3, max_waves=2)
    recorder.set_targets(TARGET, "v2")
    for step in range(10):
        clock.t += 1
        device = devices[step % 2]
        device.enter(State.DOWNLOADING if step % 4 < 2 else State.IDLE)
        recorder.sample()
    for i in range(5):
        recorder.event("disconnect", device=f"dev-{i}")
    recorder.set_targets({MODEL: "3.0.0"}, "v3")
    recorder.set_targets({MODEL: "4.0.0"}, "v4")
    bounds = recorder.summary()["bounds"]
    assert bounds["transitions"] == 5 and bounds["transitions_dropped"] > 0
    assert bounds["count_rows"] <= 4 and bounds["count_rows_thinned"] > 0
    assert bounds["events_dropped"] == 2 and len(recorder.events()) == 3
    assert bounds["waves_dropped"] == 1
    assert [w["label"] for w in recorder.summary()["waves"]] == ["v3", "v4"]
    assert recorder.summary()["events"] == {"disconnect": 5}
    # The per-device timeline still ends where the device ended.
    recorder.write_report(tmp_path)
    for device in devices:
        with (tmp_path / "timeline" / f"{device.device_id}.csv").open() as f:
            last = list(csv.DictReader(f))[-1]
        assert last["state"] == classify(device, {MODEL: "4.0.0"})


def test_bytes_cpu_and_reconnects_per_wave() -> None:
    clock = FakeClock()
    devices = _fleet(2)
    served = {("dev-01", "targets/a"): 100, ("stranger", "targets/a"): 999}
    bridge = SimpleNamespace(served=served, bytes_sent=1099)
    cpu = [1.0]
    recorder = FleetRecorder(devices, clock=clock, bridge_counters=lambda: bridge,
                             server_cpu_seconds=lambda: cpu[0])
    recorder.set_targets(TARGET, "v2")
    bridge.served = {**served, ("dev-01", "targets/b"): 3000, ("dev-02", "targets/b"): 1000,
                     ("dev-02", "metadata/1.root.json"): 200}
    bridge.bytes_sent = 1099 + 4200
    cpu[0] = 3.0
    devices[1].agent.session.counts = SimpleNamespace(connections=4)
    for device in devices:
        device.commit("2.0.0")
    recorder.sample()
    wave = recorder.summary()["waves"][0]
    assert wave["bytes_sent_per_device"] == {"mean": 2100.0, "max": 3000, "total": 4200,
                                             "source": "bridge", "fleet_total": 4200}
    assert wave["server_cpu_seconds"] == 2.0
    assert wave["server_cpu_seconds_per_update"] == 1.0
    assert wave["reconnects"] == {"mean": 1.5, "max": 3, "total": 3}
    assert wave["resume"] is None  # no device counter reports resumes


def test_bytes_from_device_counters_without_a_bridge() -> None:
    devices = _fleet(2)
    for device in devices:
        device.agent.session.counts = SimpleNamespace(connections=1,
                                                                 bytes_received=10)
    recorder = FleetRecorder(devices, clock=FakeClock())
    recorder.set_targets(TARGET, "v2")
    devices[0].agent.session.counts = SimpleNamespace(connections=1,
                                                                 bytes_received=510)
    wave = recorder.summary()["waves"][0]
    assert wave["bytes_sent_per_device"]["source"] == "device"
    assert (wave["bytes_sent_per_device"]["mean"], wave["bytes_sent_per_device"]["max"]) == \
        (250.0, 500)
    bare = FleetRecorder(_fleet(1), clock=FakeClock())
    bare.set_targets(TARGET, "v2")
    assert bare.summary()["waves"][0]["bytes_sent_per_device"] is None
    assert bare.summary()["waves"][0]["server_cpu_seconds_per_update"] is None


# -- files and the live view ----------------------------------------------------------------


def _run(clock: FakeClock) -> tuple[FleetRecorder, list[FakeDevice]]:
    devices = _fleet(6)
    devices.append(FakeDevice("odd/id", hardware="jetson"))
    recorder = FleetRecorder(devices, clock=clock)
    recorder.sample()
    clock.t += 1
    recorder.event("publish", release="digits@2.0.0", status="published")
    recorder.set_targets(TARGET, "digits@2.0.0")
    recorder.event("deploy", release="digits@2.0.0", phases=[50, 100], blob=b"x")
    for i, device in enumerate(devices):
        clock.t += 0.5
        device.enter(State.DOWNLOADING)
        recorder.sample()
        clock.t += 0.5
        if i == 2:
            device.fail(State.ROLLED_BACK, "latency_regression")
        elif i == 3:
            device.agent.session.ready = False
        else:
            device.commit("2.0.0")
        recorder.sample()
        recorder.event("disconnect", device=device.device_id)
    return recorder, devices


def test_write_report_files(tmp_path) -> None:
    clock = FakeClock()
    recorder, devices = _run(clock)
    out = recorder.write_report(tmp_path / "report")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["devices"] == 7
    assert summary["hardware"] == {"rpi4": 3, "rpi5": 3, "jetson": 1}
    assert summary["failures"] == {"latency_regression": 1}
    assert summary["states"]["updated"] == 5 and summary["states"]["offline"] == 1
    (wave,) = summary["waves"]
    assert wave["devices_updated"] == 5 and wave["time_to_100"] is None

    timelines = sorted(p.name for p in (out / "timeline").iterdir())
    assert timelines == sorted([*(f"{d.device_id}.csv" for d in devices[:-1]), "odd_id.csv"])
    with (out / "timeline" / "dev-01.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["t_seconds"], r["state"], r["version"]) for r in rows] == [
        ("0.000", "waiting", "digits@1.0.0"),
        ("1.500", "downloading", "digits@1.0.0"),
        ("2.000", "updated", "digits@2.0.0"),
    ]
    with (out / "timeline" / "dev-03.csv").open() as f:
        last = list(csv.DictReader(f))[-1]
    assert (last["state"], last["reason"]) == ("rolled_back", "latency_regression")
    with (out / "states.csv").open() as f:
        header = next(csv.reader(f))
    assert header == ["t_seconds", *DEVICE_STATES]
    with (out / "events.csv").open() as f:
        events = list(csv.DictReader(f))
    assert [e["kind"] for e in events[:2]] == ["publish", "deploy"]
    assert json.loads(events[1]["detail"]) == {"release": "digits@2.0.0", "phases": [50, 100],
                                               "blob": "b'x'"}
    for name in ("states.png", "time_to_update.png"):
        path = out / name
        assert path.stat().st_size > 10_000
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] >= 800


def test_write_report_without_a_wave_or_samples(tmp_path) -> None:
    recorder = FleetRecorder(_fleet(2), clock=FakeClock())
    recorder.write_report(tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["waves"] == []
    for name in ("states.png", "time_to_update.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG"


def test_live_view_renders_counts_per_state_and_hardware() -> None:
    clock = FakeClock()
    recorder, _devices = _run(clock)
    console = Console(record=True, width=160, color_system=None)
    console.print(live_view(recorder))
    text = console.export_text()
    rows = [line.replace("│", " ").split() for line in text.splitlines()]
    for state in DEVICE_STATES:
        assert state in text
    assert "Fleet: 7 devices" in text and "digits@2.0.0" in text
    lines = {row[0]: row for row in rows if row}
    assert lines["updated"][1] == "5"
    assert lines["offline"][1] == "1" and lines["rolled_back"][1] == "1"
    # By hardware: offline, waiting, downloading, probation, updated, failed, rolled_back.
    assert lines["jetson"][1:] == ["0", "0", "0", "0", "1", "0", "0"]
    assert sum(int(lines[h][5]) for h in ("rpi4", "rpi5", "jetson")) == 5
    assert "latency_regression" in text
