"""The running agent against a real server: install, probation, commit, revert, restart.

Predictions go through an unmodified tritonclient against the agent's local
Open Inference Protocol endpoint, so "the device serves v2" is measured the
way an application on the device sees it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from server_support import RunningServer

from edgeota.agent.config import AgentConfig
from edgeota.agent.inference_server import InferenceServer
from edgeota.agent.journal import TERMINAL_STATES, JournalRecord, State
from edgeota.agent.runner import SEQ_BLOCK, STEPS, Agent, AgentSettings
from edgeota.samples import load_catalog, load_test_split

SETTINGS = AgentSettings(probation_seconds=0, probation_min_inferences=5)


def served_accuracy(agent: Agent) -> tuple[str, float]:
    import tritonclient.http as triton

    x, y = load_test_split()
    with InferenceServer(agent.host) as endpoint:
        client = triton.InferenceServerClient(endpoint.url.removeprefix("http://"))
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("digits", [tensor],
                              outputs=[triton.InferRequestedOutput("label")])
        version = result.get_response()["model_version"]
        client.close()
    return version, float(np.mean(result.as_numpy("label") == y))


def exercise(agent: Agent, count: int = 10) -> None:
    x, _ = load_test_split()
    for row in range(count):
        agent.host.predict("digits", {"input": x[row:row + 1]})


def deploy(server: RunningServer, sample: str, version: str) -> None:
    assert server.publish(sample, version).code == 0
    assert server.cli("deploy", f"digits@{version}", "--devices", "pi-1").code == 0


def agent_serving_v1(server: RunningServer, config: AgentConfig) -> Agent:
    """An agent that installed digits 1.0.0 and committed it after probation."""
    agent = Agent(config, SETTINGS)
    agent.start()
    deploy(server, "digits_v1", "1.0.0")
    agent.run_cycle()
    exercise(agent)
    assert agent.check_probation() == {"digits": "committed"}
    return agent


def reported_state(server: RunningServer) -> dict:
    fleet = json.loads(server.cli("fleet", "status", "--json").out)
    return fleet[0]["reported_state"]


def test_agent_installs_probates_commits_and_survives_a_restart(server: RunningServer) -> None:
    catalog = load_catalog()
    config = AgentConfig.load(server.enroll("pi-1") / "agent.toml")
    agent = Agent(config, SETTINGS)
    agent.start()
    assert agent.run_cycle().states == {}
    deploy(server, "digits_v1", "1.0.0")
    assert agent.run_cycle().states == {"digits": "probation"}
    exercise(agent)
    assert agent.check_probation() == {"digits": "committed"}
    version, accuracy = served_accuracy(agent)
    assert version == "1.0.0"
    assert accuracy == pytest.approx(catalog["digits_v1"].test_accuracy, abs=1e-4)
    assert reported_state(server)["state"] == "committed"

    deploy(server, "digits_v2", "2.0.0")
    assert agent.run_cycle().states == {"digits": "probation"}
    exercise(agent)
    assert agent.check_probation() == {"digits": "committed"}
    version, accuracy = served_accuracy(agent)
    assert (version, round(accuracy, 4)) == ("2.0.0", catalog["digits_v2"].test_accuracy)
    assert agent.release_floor() == 1
    assert agent.run_cycle().states == {"digits": "current"}

    # A restarted agent serves the committed model from disk, before any network check.
    restarted = Agent(config, SETTINGS)
    restarted.start()
    assert restarted.host.current_version("digits") == "2.0.0"


def test_the_swap_serves_the_very_session_the_gate_validated(
        server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """One load per update: the session validated on the device is the one that goes live."""
    from edgeota.agent import model_host
    from edgeota.runtime import validation

    made: list[tuple[Path, object]] = []
    real = validation.create_session

    def counting(model_path: Path, *args: object, **kwargs: object) -> object:
        session = real(model_path, *args, **kwargs)
        made.append((Path(model_path), session))
        return session

    monkeypatch.setattr(validation, "create_session", counting)
    monkeypatch.setattr(model_host, "create_session", counting)
    config = AgentConfig.load(server.enroll("pi-1") / "agent.toml")
    agent = agent_serving_v1(server, config)
    deploy(server, "digits_v2", "2.0.0")  # the server validates it too, in this process
    made.clear()
    assert agent.run_cycle().states == {"digits": "probation"}
    made = [(path, session) for path, session in made if path.is_relative_to(config.state_dir)]
    assert len(made) == 1, made
    assert agent.host.model("digits").version == "2.0.0"
    assert agent.host.model("digits").session is made[0][1]
    assert agent.host.model("digits").model_path == made[0][0]


def test_report_numbers_are_reserved_a_block_at_a_time_and_never_reused(
        server: RunningServer) -> None:
    config = AgentConfig.load(server.enroll("pi-1") / "agent.toml")
    seq_file = config.state_dir / "report-seq"
    agent = Agent(config, SETTINGS)
    assert [agent.next_report_seq() for _ in range(SEQ_BLOCK)] == list(range(1, SEQ_BLOCK + 1))
    assert int(seq_file.read_text()) == SEQ_BLOCK  # one durable write for the whole block
    assert agent.next_report_seq() == SEQ_BLOCK + 1
    assert int(seq_file.read_text()) == 2 * SEQ_BLOCK

    # A restart continues above everything reserved, even beside a live old instance.
    restarted = Agent(config, SETTINGS)
    assert restarted.next_report_seq() == 2 * SEQ_BLOCK + 1
    assert agent.next_report_seq() == SEQ_BLOCK + 2
    assert int(seq_file.read_text()) == 3 * SEQ_BLOCK


def test_an_assignment_that_arrives_during_probation_is_taken_when_probation_ends(
        server: RunningServer) -> None:
    config = AgentConfig.load(server.enroll("pi-1") / "agent.toml")
    agent = agent_serving_v1(server, config)
    deploy(server, "digits_v2", "2.0.0")
    assert agent.run_cycle().states == {"digits": "probation"}
    # The operator changes their mind while 2.0.0 is in probation (a rollback, say).
    assert server.cli("deploy", "digits@1.0.0", "--devices", "pi-1").code == 0
    agent.wake.clear()  # its notify was spent on this cycle, which must leave it for later
    assert agent.run_cycle().states == {"digits": "probation"}
    assert not agent.wake.is_set()
    exercise(agent)
    assert agent.check_probation() == {"digits": "committed"}
    assert agent.wake.is_set()  # look again now, not at the next poll
    agent.wake.clear()
    assert agent.run_cycle().states == {"digits": "probation"}
    assert agent.host.current_version("digits") == "1.0.0"
    exercise(agent)
    assert agent.check_probation() == {"digits": "committed"}
    assert not agent.wake.is_set()  # nothing was left for later this time


def test_probation_regression_rolls_back_and_is_reported(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = AgentConfig.load(server.enroll("pi-1") / "agent.toml")
    agent = agent_serving_v1(server, config)
    deploy(server, "digits_v2", "2.0.0")
    assert agent.run_cycle().states == {"digits": "probation"}
    exercise(agent)
    real = agent.host.metrics

    def nan_for_v2(name: str, version: str):
        metrics = real(name, version)
        return dataclasses.replace(metrics, non_finite=3) if version == "2.0.0" else metrics

    monkeypatch.setattr(agent.host, "metrics", nan_for_v2)
    assert agent.check_probation() == {"digits": "rolled_back"}
    assert agent.host.current_version("digits") == "1.0.0"
    state = reported_state(server)
    assert (state["state"], state["error"]) == ("rolled_back", "nan_output")
    assert agent.release_floor() == 1


def test_clock_before_the_floor_blocks_updates(server: RunningServer, tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    config = AgentConfig.load(server.enroll("pi-1") / "agent.toml")
    now = [datetime.now(UTC)]
    agent = Agent(config, SETTINGS, clock=lambda: now[0])
    agent.start()
    agent.floor.advance()
    deploy(server, "digits_v1", "1.0.0")
    now[0] = now[0] - timedelta(days=400)  # booted without NTP
    outcome = agent.run_cycle()
    assert outcome.states == {"*": "clock_untrusted"}
    assert reported_state(server)["state"] == "clock_untrusted"
    assert not list((config.state_dir / "models").rglob("model.onnx")) if (
        config.state_dir / "models").exists() else True


def test_edgeota_agent_run_as_a_process(server: RunningServer) -> None:
    """The console script, as a device would run it: updates, serves, stops on SIGTERM."""
    import os
    import shutil
    import signal
    import subprocess
    import sys

    from server_support import wait_for

    device = server.enroll("pi-1")
    deploy(server, "digits_v1", "1.0.0")
    script = shutil.which("edgeota-agent", path=str(Path(sys.executable).parent))
    assert script
    process = subprocess.Popen(
        [script, "run", "--config", str(device / "agent.toml"), "--poll", "1",
         "--probation", "0", "--http-port", "0", "--transport", "http"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (reported_state(server) or {}).get("state") == "probation", 60,
                 "the agent to install v1")
        # Probation needs inferences; with none it stays on probation, which the server sees.
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "serving on http://127.0.0.1:" in err
    assert os.path.isdir(device / "state" / "models" / "digits")


def test_device_validation_gate_refuses_and_the_old_model_keeps_serving(
    server: RunningServer,
) -> None:
    """Latency is a device property: the server accepts the release, the device's gate
    refuses it, and v1 keeps serving."""
    config = AgentConfig.load(server.enroll("pi-1") / "agent.toml")
    agent = agent_serving_v1(server, config)
    assert server.publish("digits_v2", "2.0.0", "--latency-budget-ms", "0.000001").code == 0
    assert server.cli("deploy", "digits@2.0.0", "--devices", "pi-1").code == 0
    outcome = agent.run_cycle()
    assert outcome.states == {"digits": "failed"}
    assert outcome.reasons == {"digits": "latency_over_budget"}
    assert agent.host.current_version("digits") == "1.0.0"
    version, _ = served_accuracy(agent)
    assert version == "1.0.0"
    state = reported_state(server)
    assert (state["state"], state["error"]) == ("failed", "latency_over_budget")
    assert not any((config.state_dir / "models" / "digits").glob("2.0.0-*"))
    # Refused once, not retried on every cycle while the director still assigns it.
    assert agent.run_cycle().states == {"digits": "refused"}


def test_a_model_that_keeps_crashing_the_agent_in_probation_is_refused(
    server: RunningServer,
) -> None:
    """A crash in probation is retried (it may be a power cut); the third one refuses it."""
    from edgeota.agent.runner import MAX_CRASHES_PER_TARGET

    config = AgentConfig.load(server.enroll("pi-1") / "agent.toml")
    agent = agent_serving_v1(server, config)
    deploy(server, "digits_v2", "2.0.0")
    for crash in range(1, MAX_CRASHES_PER_TARGET + 1):
        assert agent.run_cycle().states == {"digits": "probation"}, crash
        # The process dies in probation: a new agent over the same state folder starts.
        agent = Agent(config, SETTINGS)
        agent.start()
        assert agent.host.current_version("digits") == "1.0.0"
        assert reported_state(server)["error"] == "crash_during_probation"
    assert agent.run_cycle().states == {"digits": "refused"}
    assert agent.host.current_version("digits") == "1.0.0"


def test_expired_metadata_is_refused_and_changes_nothing(tmp_path: Path, db_url: str) -> None:
    """A server whose metadata expired (or an attacker freezing it): the device refuses it,
    reports why, and keeps serving what it had."""
    from datetime import UTC, datetime, timedelta

    from server_support import running_server

    past = [datetime.now(UTC)]
    with running_server(tmp_path, db_url, clock=lambda: past[0]) as server:
        config = AgentConfig.load(server.enroll("pi-1") / "agent.toml")
        agent = agent_serving_v1(server, config)
        # From now on the server signs as if it were 30 days ago: everything it serves is
        # already expired, whatever the device's (sane) clock says.
        past[0] = datetime.now(UTC) - timedelta(days=30)
        deploy(server, "digits_v2", "2.0.0")
        outcome = agent.run_cycle()
        assert outcome.states == {"*": "failed"}
        assert outcome.reasons == {"*": "expired_metadata"}
        assert agent.host.current_version("digits") == "1.0.0"
        assert reported_state(server)["error"] == "expired_metadata"


def test_a_cycle_that_fails_in_transit_is_retried_sooner_with_backoff(
        server: RunningServer) -> None:
    from edgeota.agent.runner import RETRY_BASE_SECONDS, RETRY_MAX_SECONDS

    config = AgentConfig.load(server.enroll("pi-1") / "agent.toml")
    agent = agent_serving_v1(server, config)
    assert agent.retry_delay() is None  # a clean cycle: the poll decides
    server.stop()  # the repository is gone: a passing failure
    try:
        delays = []
        for _ in range(8):
            outcome = agent.run_cycle()
            assert outcome.transient and outcome.states == {"*": "unreachable"}
            delays.append(agent.retry_delay())
    finally:
        server.start()
    assert delays[:3] == [RETRY_BASE_SECONDS, 2 * RETRY_BASE_SECONDS, 4 * RETRY_BASE_SECONDS]
    assert max(delays) == RETRY_MAX_SECONDS  # bounded
    assert agent.host.current_version("digits") == "1.0.0"  # nothing changed meanwhile
    assert not agent.run_cycle().transient
    assert agent.retry_delay() is None  # back to the poll once the server answers


class _PowerCut(BaseException):
    """The device loses power: nothing of the agent's own clean-up runs."""


def _target_bytes_served(server: RunningServer) -> float:
    """The server's ``edgeota_fetch_bytes_total`` for bundles over HTTP, read as /metrics would."""
    value = server.ctx.metrics.registry.get_sample_value(
        "edgeota_fetch_bytes_total", {"transport": "http", "kind": "target"})
    return 0.0 if value is None else value


def test_an_agent_that_dies_before_the_swap_reopens_its_bundle_instead_of_refetching(
        server: RunningServer) -> None:
    config = AgentConfig.load(server.enroll("pi-1") / "agent.toml")
    agent = agent_serving_v1(server, config)
    deploy(server, "digits_v2", "2.0.0")

    def power_cut(_name: str, state: State) -> None:
        if state is State.VALIDATING:
            raise _PowerCut

    agent.on_step = power_cut
    with pytest.raises(_PowerCut):
        agent.run_cycle()  # downloaded and verified: dies in the validation gate
    assert agent.journal("digits").current.state is State.VALIDATING
    fetched = _target_bytes_served(server)
    assert fetched > 0
    rebooted = Agent(config, SETTINGS)
    steps: list[State] = []
    rebooted.on_step = lambda _name, state: steps.append(state)
    rebooted.start()  # the swap was never reached: serve 1.0.0, go on from verifying
    assert rebooted.host.current_version("digits") == "1.0.0"
    assert rebooted.journal("digits").current.state is State.VERIFYING
    assert rebooted.run_cycle().states == {"digits": "probation"}
    assert steps == [State.VERIFYING, State.VALIDATING, State.SWAPPING, State.PROBATION]
    assert rebooted.host.current_version("digits") == "2.0.0"
    # The bundle was opened (so verified) again from disk: not one byte fetched twice.
    assert _target_bytes_served(server) == fetched
    exercise(rebooted)
    assert rebooted.check_probation() == {"digits": "committed"}
    downloads = config.state_dir / "downloads"
    assert not [p for p in downloads.rglob("*") if p.is_file() and "2.0.0" in p.name], \
        "the installed bundle was not deleted"


def test_every_step_runs_with_its_state_already_on_disk(server: RunningServer) -> None:
    """The runner follows the journal's table: each state of STEPS is saved before its work.

    The hook runs between the save and the work; what it reads from disk is
    what a power cut at that moment would leave.
    """
    config = AgentConfig.load(server.enroll("pi-1") / "agent.toml")
    agent = Agent(config, SETTINGS)
    agent.start()
    journal_file = config.state_dir / "journal-digits.json"
    on_disk: list[tuple[State, State]] = []
    agent.on_step = lambda _name, state: on_disk.append(
        (state, JournalRecord.from_json(journal_file.read_bytes()).state))
    deploy(server, "digits_v1", "1.0.0")
    assert agent.run_cycle().states == {"digits": "probation"}
    assert [state for state, _ in on_disk] == list(STEPS)
    assert all(state is saved for state, saved in on_disk), on_disk
    # Every state with work is a state of the table, and every step is reached.
    assert set(STEPS) == {s for s in State if s not in TERMINAL_STATES | {State.IDLE}}


def test_a_malformed_local_request_is_a_400_and_never_counts_against_probation(
        server: RunningServer) -> None:
    """A zero-row tensor during the first model's probation: refused, the model commits."""
    import threading

    import httpx

    from edgeota.agent.runner import run_forever

    config = AgentConfig.load(server.enroll("pi-1") / "agent.toml")
    agent = Agent(config, AgentSettings(probation_seconds=0.5, probation_min_inferences=5))
    agent.start()
    deploy(server, "digits_v1", "1.0.0")
    assert agent.run_cycle().states == {"digits": "probation"}
    stop = threading.Event()
    committed = threading.Event()
    agent.on_journal_saved = lambda _name, record: (
        committed.set() if record.state is State.COMMITTED else None)
    loop = threading.Thread(target=run_forever, args=(agent, stop),
                            kwargs={"poll_seconds": 3600.0})
    with InferenceServer(agent.host) as endpoint:
        loop.start()
        try:
            for shape in ([0, 64], [0, 2**62]):
                response = httpx.post(f"{endpoint.url}/v2/models/digits/infer", json={
                    "inputs": [{"name": "input", "shape": shape, "datatype": "FP32",
                                "data": []}]})
                assert response.status_code == 400, response.text
            metrics = agent.host.metrics("digits", "1.0.0")
            assert (metrics.errors, metrics.rejected) == (0, 1)  # the second: a bad shape
            exercise(agent)
            assert committed.wait(20), "probation did not commit"
            assert loop.is_alive()
        finally:
            stop.set()
            loop.join(10)
    assert reported_state(server)["state"] == "committed"


def test_a_first_model_that_fails_probation_keeps_serving_and_is_reported(
        server: RunningServer) -> None:
    """Nothing to revert to: the agent does not die; it reports and refuses the target."""
    failing = {"on": False}

    def hardware(_name: str, _version: str) -> None:
        if failing["on"]:
            raise RuntimeError("wrong on this hardware")

    config = AgentConfig.load(server.enroll("pi-1") / "agent.toml")
    agent = Agent(config, SETTINGS, run_hook=hardware)
    agent.start()
    deploy(server, "digits_v1", "1.0.0")
    assert agent.run_cycle().states == {"digits": "probation"}
    failing["on"] = True
    x, _ = load_test_split()
    for row in range(5):
        with pytest.raises(Exception, match="wrong on this hardware"):
            agent.host.predict("digits", {"input": x[row:row + 1]})
    assert agent.check_probation() == {"digits": "rolled_back"}
    assert agent.host.current_version("digits") == "1.0.0"  # still serving
    failing["on"] = False
    agent.host.predict("digits", {"input": x[:1]})
    state = reported_state(server)
    assert (state["state"], state["error"]) == ("rolled_back", "error_rate")
    assert agent.run_cycle().states == {"digits": "current"}


def test_the_retry_backoff_stays_bounded_however_long_the_server_is_away(
        server: RunningServer) -> None:
    """Over a thousand failed checks in a row (days offline): the delay stays the cap."""
    from tuf.api.exceptions import DownloadError

    from edgeota.agent.runner import RETRY_MAX_SECONDS
    from edgeota.agent.update_cycle import UpdateClient

    class Unreachable(UpdateClient):
        def check(self, release_floor: int = 0) -> list:  # type: ignore[type-arg]
            raise DownloadError("the server is away")

    config = AgentConfig.load(server.enroll("pi-1") / "agent.toml")
    agent = Agent(config, SETTINGS, update_client=Unreachable(config))
    for _ in range(1100):
        assert agent.run_cycle().transient
    assert agent.retry_delay() == RETRY_MAX_SECONDS
