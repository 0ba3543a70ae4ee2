"""Each attack of the suite as a unit test on one agent: the precise refusal, nothing changed.

One real agent (MQTT transport through the embedded TLS broker, ngclient,
journal, model host) serving a committed digits 1.0.0 faces one attack at a
time, staged with the attacker primitives of ``edgeota.simulator.attacks`` (the
malicious server signs with the online keys and rewrites storage; the broker
man-in-the-middle decides what reaches the device). Each test asserts

* the cycle's outcome as the agent reports it (state and reason code),
* the precise exception of ``UpdateClient.check`` or ``install`` under the attack,
* that the served version, the served model file and the model folders are
  byte-for-byte what they were; for attacks refused during ``check`` the
  journal file is byte-for-byte unchanged too (the journal is not touched
  before a target is decided). An attack refused during ``install`` leaves
  the journal idle with the same known-good model; its history records the
  attempt (checking, downloading, failed, idle), which is the journal's job.

One server for the module (SQLite: the database plays no part in what the
agent decides), a fresh enrolled device per test. Slow retrieval is also shown
on the director metadata and, at fetcher level, over HTTP (the real HTTP server
cannot be made to trickle).
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from server_support import RunningServer, running_mqtt_server
from tuf.api import exceptions as tuf_errors

from edgeota.agent.journal import JournalRecord, State
from edgeota.agent.runner import Agent, AgentSettings, CycleOutcome
from edgeota.agent.update_cycle import (
    BundleMismatchError,
    BundleTooLargeError,
    BundleTooSlowError,
    TransferLimits,
)
from edgeota.agent.uptane import RefusalReason, UptaneRefusal
from edgeota.protocol.errors import KeyUnwrapError
from edgeota.server.client import OperatorClient
from edgeota.simulator.attacks import (
    AnotherDevicesKey,
    ArbitrarySoftware,
    AttackLab,
    EndlessData,
    MixAndMatch,
    PublishSpec,
    ReplayedDirectorMetadata,
    Rollback,
    SlowRetrieval,
    UnsignedModel,
    WrongHardware,
    device_clock_ahead,
    release_publisher,
)
from edgeota.simulator.device import SimulatedDevice

SETTINGS = AgentSettings(probation_seconds=0, probation_min_inferences=1)
LIMITS = TransferLimits(frame_timeout=2.0, min_rate=16 * 1024, grace=1.0, max_retries=2)


@dataclass
class World:
    server: RunningServer
    transport: object
    publish: Callable[[PublishSpec], None]
    ids: Iterator[int]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("agent-attacks")
    with running_mqtt_server(base, f"sqlite:///{base / 'edgeota.db'}") as (server, transport):
        assert server.publish("digits_v1", "1.0.0").code == 0
        client = OperatorClient(server.url, server.operator.token())
        try:
            yield World(server, transport, release_publisher(server.operator, client),
                        itertools.count(1))
        finally:
            client.close()


@dataclass
class Victim:
    agent: Agent
    lab: AttackLab


@pytest.fixture
def victim(world: World) -> Iterator[Victim]:
    """A fresh device serving a committed digits 1.0.0, inside an attack-lab session."""
    from edgeota.agent.config import AgentConfig

    device_id = f"unit-{next(world.ids)}"
    config = AgentConfig.load(world.server.enroll(device_id, "rpi4") / "agent.toml")
    device = SimulatedDevice(config, SETTINGS, hardware="rpi4",
                             limits=LIMITS)
    try:
        device.start()
        assert device.agent.session.wait_ready(20)
        assert world.server.cli("deploy", "digits@1.0.0", "--devices", device_id).code == 0
        assert device.agent.run_cycle().states == {"digits": "probation"}
        assert device.agent.check_probation(force=True) == {"digits": "committed"}
        lab = AttackLab(world.server.ctx, world.transport, [device], publish=world.publish)
        with lab.session():
            yield Victim(device.agent, lab)
    finally:
        device.close()


@dataclass(frozen=True)
class OnDisk:
    """What the device runs, byte for byte."""

    journal: bytes
    release_floor: bytes
    served: dict[str, str]
    model: bytes
    model_folders: tuple[str, ...]

    @classmethod
    def of(cls, agent: Agent) -> OnDisk:
        state = agent.config.state_dir
        model = agent.host.model("digits")
        path = model.model_path
        del model
        return cls(
            journal=(state / "journal-digits.json").read_bytes(),
            release_floor=(state / "release-floor").read_bytes(),
            served={n: agent.host.current_version(n) for n in agent.host.models()},
            model=path.read_bytes(),
            model_folders=tuple(sorted(p.name for p in (state / "models" / "digits").iterdir())),
        )


def assert_untouched(before: OnDisk, agent: Agent) -> None:
    """Refused in ``check``: everything, the journal included, is byte-for-byte the same."""
    assert OnDisk.of(agent) == before


def assert_install_refused(before: OnDisk, agent: Agent, reason: str) -> None:
    """Refused in ``install``: the same model, floor and folders; the journal idle on the
    same known-good model, its history ending with the refused attempt."""
    after = OnDisk.of(agent)
    assert (after.release_floor, after.served, after.model, after.model_folders) == (
        before.release_floor, before.served, before.model, before.model_folders)
    old = JournalRecord.from_json(before.journal)
    new = JournalRecord.from_json(after.journal)
    assert (new.state, new.target, new.previous) == (State.IDLE, None, old.previous)
    assert old.previous is not None and old.previous.version == "1.0.0"
    assert [s for s, _ in new.history[-3:]] == [
        State.DOWNLOADING, State.FAILED, State.IDLE], reason


def refused_in_check(agent: Agent, reason: str) -> None:
    assert agent.run_cycle() == CycleOutcome({"*": "failed"}, {"*": reason})


def refused_in_install(agent: Agent, reason: str) -> None:
    # A transfer held up (slow retrieval) is retried sooner, with backoff; a refused
    # release is not: it waits for the next poll or assignment.
    transient = reason in ("bundle_too_slow", "bundle_unavailable")
    assert agent.run_cycle() == CycleOutcome({"digits": "failed"}, {"digits": reason}, transient)


def decided(agent: Agent):
    (decision,) = agent.updates.check(agent.release_floor())
    return decision


def downloads(agent: Agent) -> list[Path]:
    folder = agent.config.state_dir / "downloads"
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# -- malicious server ----------------------------------------------------------------


def test_arbitrary_software_is_refused_by_its_hash(victim: Victim) -> None:
    """The bytes served for a signed target are the attacker's (same length).

    Also: tests/test_update_cycle.py::test_tampered_bundle_is_refused_and_nothing_is_installed
    (UpdateClient over HTTP, one flipped byte)."""
    agent = victim.agent
    before = OnDisk.of(agent)
    with ArbitrarySoftware().staged(victim.lab):
        refused_in_install(agent, "bundle_mismatch")
        with pytest.raises(BundleMismatchError) as caught:
            agent.updates.install(decided(agent))
        assert isinstance(caught.value, tuf_errors.LengthOrHashMismatchError)
    assert_install_refused(before, agent, "bundle_mismatch")
    assert not any(p.name.endswith(".partial") for p in downloads(agent))  # thrown away


def test_rollback_below_the_release_counter_floor_is_refused(victim: Victim) -> None:
    """A signed release with a lower counter, assigned with the director key.

    Also: tests/test_uptane.py (decide, pure) and
    tests/test_update_cycle.py::test_release_counter_floor_is_enforced_on_the_device."""
    agent = victim.agent
    before = OnDisk.of(agent)
    assert agent.release_floor() == 1
    with Rollback().staged(victim.lab):
        refused_in_check(agent, "below_floor")
        with pytest.raises(UptaneRefusal) as caught:
            agent.updates.check(agent.release_floor())
        assert caught.value.reason is RefusalReason.BELOW_FLOOR
    assert_untouched(before, agent)


def test_wrong_hardware_is_refused(victim: Victim) -> None:
    """A release signed for other hardware; the director target claims the device's own.

    Also: tests/test_uptane.py (decide, pure)."""
    agent = victim.agent
    before = OnDisk.of(agent)
    with WrongHardware().staged(victim.lab):
        refused_in_check(agent, "hardware_not_in_release")
        with pytest.raises(UptaneRefusal) as caught:
            agent.updates.check(agent.release_floor())
        assert caught.value.reason is RefusalReason.HARDWARE_NOT_IN_RELEASE
    assert_untouched(before, agent)


def test_a_director_target_for_another_device_is_refused(victim: Victim) -> None:
    """In the victim's own director metadata, signed with the director key, a target whose
    custom names another device: an Uptane director target binds one device.

    Also: tests/test_uptane.py (decide, pure)."""
    import dataclasses

    from edgeota.protocol.targets_custom import DirectorTargetCustom

    agent, lab = victim.agent, victim.lab
    before = OnDisk.of(agent)
    with lab.honest_director():
        release = lab.release("next")
        target = lab.director_target(agent.config.device_id, release.target_path,
                                     release.length, release.sha256, release.release_counter,
                                     lab.content_key(release))
        custom = DirectorTargetCustom.from_custom(target.custom, target.path)
        target.unrecognized_fields["custom"] = dataclasses.replace(
            custom, device_id="pi-someone-else").to_custom()
        # A compromised server signs with the online key what its director code refuses.
        device_id = agent.config.device_id
        current = lab.ctx.director.current_targets(device_id).signed.targets
        forged = {p: t for p, t in current.items() if not p.startswith("models/digits/")}
        forged[target.path] = target
        lab.sign_director_targets_unchecked(device_id, forged)
        refused_in_check(agent, "wrong_device")
        with pytest.raises(UptaneRefusal) as caught:
            agent.updates.check(agent.release_floor())
        assert caught.value.reason is RefusalReason.WRONG_DEVICE
    assert_untouched(before, agent)


def test_a_key_wrapped_for_another_device_is_refused_before_downloading(victim: Victim) -> None:
    """Also: tests/test_update_cycle.py::test_a_key_wrapped_for_another_device_does_not_open
    (a thief copying the victim's wrap, UpdateClient level)."""
    agent = victim.agent
    before = OnDisk.of(agent)
    with AnotherDevicesKey().staged(victim.lab):
        refused_in_install(agent, "key_unwrap_failed")
        with pytest.raises(KeyUnwrapError):
            agent.updates.install(decided(agent))
    assert_install_refused(before, agent, "key_unwrap_failed")
    assert downloads(agent) == []  # the key is checked first: not a byte was fetched


def test_a_compromised_director_key_cannot_install_an_unsigned_model(victim: Victim) -> None:
    """The director signs a target (stored, key wrapped to the device) the image
    repository never signed. Also: tests/test_uptane.py (decide, pure)."""
    agent = victim.agent
    before = OnDisk.of(agent)
    with UnsignedModel().staged(victim.lab):
        refused_in_check(agent, "not_in_image_repository")
        with pytest.raises(UptaneRefusal) as caught:
            agent.updates.check(agent.release_floor())
        assert caught.value.reason is RefusalReason.NOT_IN_IMAGE_REPOSITORY
    assert_untouched(before, agent)


# -- man-in-the-middle on the broker -----------------------------------------------------


def test_freeze_is_refused_once_the_frozen_metadata_expires(victim: Victim) -> None:
    """The MITM keeps serving the timestamps it recorded; two days later they have
    expired, while the honest repository at that same moment would be accepted.

    Also: tests/test_agent_runner.py::test_expired_metadata_is_refused_and_changes_nothing
    (a server whose clock is behind, over HTTP)."""
    agent = victim.agent
    lab = victim.lab
    device_id = agent.config.device_id
    store = lab.ctx.store
    frozen = {
        "image/metadata/timestamp.json": store.read_metadata("image", "timestamp"),
        f"director/{device_id}/metadata/timestamp.json":
            store.read_metadata(f"director/{device_id}", "timestamp"),
    }
    ahead = timedelta(days=2)
    lab.ctx.image.refresh(now=lab.ctx.clock() + ahead)
    lab.ctx.director.refresh_all(now=lab.ctx.clock() + ahead)
    before = OnDisk.of(agent)
    with device_clock_ahead([agent.updates], ahead):
        with lab.mitm() as mitm:
            for path, data in frozen.items():
                mitm.substitute(path, data)
            refused_in_check(agent, "expired_metadata")
            with pytest.raises(tuf_errors.ExpiredMetadataError):
                agent.updates.check(agent.release_floor())
        assert_untouched(before, agent)
        # Control: the honest repository, at the same moment, is fine.
        (decision,) = agent.updates.check(agent.release_floor())
        assert decision.image.version == "1.0.0"


def test_mix_and_match_of_director_metadata_is_refused(victim: Victim) -> None:
    """New timestamp and snapshot, targets of the previous snapshot."""
    agent = victim.agent
    before = OnDisk.of(agent)
    with MixAndMatch().staged(victim.lab):
        refused_in_check(agent, "metadata_rollback")
        with pytest.raises(tuf_errors.BadVersionNumberError):
            agent.updates.check(agent.release_floor())
    assert_untouched(before, agent)


def test_replayed_director_metadata_is_refused(victim: Victim) -> None:
    """The director metadata of the enrolment (version 1, no model) replayed.

    Also: tests/test_update_cycle.py::test_replayed_director_metadata_is_refused
    (the server's own pointer rewound, UpdateClient over HTTP)."""
    agent = victim.agent
    before = OnDisk.of(agent)
    with ReplayedDirectorMetadata().staged(victim.lab):
        refused_in_check(agent, "metadata_rollback")
        with pytest.raises(tuf_errors.BadVersionNumberError):
            agent.updates.check(agent.release_floor())
    assert_untouched(before, agent)


def test_endless_data_is_cut_at_the_signed_length(victim: Victim) -> None:
    """The bundle answer claims 2**40 bytes: refused at its first frame.

    Also: tests/test_mqtt_fetch.py::test_an_endless_response_is_cut_and_cancelled (fetcher)."""
    agent = victim.agent
    before = OnDisk.of(agent)
    with EndlessData().staged(victim.lab):
        refused_in_install(agent, "bundle_too_large")
        with pytest.raises(BundleTooLargeError) as caught:
            agent.updates.install(decided(agent))
        assert isinstance(caught.value, tuf_errors.DownloadLengthMismatchError)
    assert_install_refused(before, agent, "bundle_too_large")
    assert all(p.stat().st_size == 0 for p in downloads(agent))  # not a junk byte kept


def test_slow_retrieval_is_cut_by_the_minimum_rate(victim: Victim) -> None:
    """The honest bundle, a few bytes per frame, each frame well inside the frame
    timeout: only the minimum average rate ends it, within its bound.

    Also: tests/test_mqtt_fetch.py::test_a_silent_server_times_out (a server that
    stops sending, fetcher level)."""
    agent = victim.agent
    before = OnDisk.of(agent)
    # grace / (1 - rate/min_rate) with the trickle at an eighth of the floor,
    # plus one frame interval, plus slack.
    bound = LIMITS.grace * 8 / 7 + LIMITS.frame_timeout / 4 + 2.0
    with SlowRetrieval().staged(victim.lab):
        started = time.monotonic()
        refused_in_install(agent, "bundle_too_slow")
        assert time.monotonic() - started < bound
        started = time.monotonic()
        with pytest.raises(BundleTooSlowError):
            agent.updates.install(decided(agent))
        assert time.monotonic() - started < bound
    assert_install_refused(before, agent, "bundle_too_slow")


def test_slow_retrieval_of_metadata_is_cut_too(victim: Victim) -> None:
    """The director timestamp trickled: ngclient's fetch ends with SlowRetrievalError and
    the cycle reports the repository unreachable."""
    agent = victim.agent
    lab = victim.lab
    device_id = agent.config.device_id
    path = f"director/{device_id}/metadata/timestamp.json"
    data = lab.ctx.store.read_metadata(f"director/{device_id}", "timestamp")
    before = OnDisk.of(agent)
    with lab.mitm() as mitm:
        mitm.trickle(path, data, piece=8, interval=LIMITS.frame_timeout / 4)
        started = time.monotonic()
        assert agent.run_cycle() == CycleOutcome({"*": "unreachable"},
                                                 {"*": "repository_unreachable"}, transient=True)
        assert time.monotonic() - started < LIMITS.grace * 8 / 7 + LIMITS.frame_timeout + 2
        with pytest.raises(tuf_errors.SlowRetrievalError):
            agent.updates.check(agent.release_floor())
    assert_untouched(before, agent)


def test_slow_retrieval_over_http_is_cut_by_the_minimum_rate() -> None:
    """The HTTP transport faces the same trickle: one byte every tenth of a second, well
    inside the read timeout. Fetcher level: the real server never trickles."""
    from edgeota.runtime.http_fetcher import HttpFetcher, HttpFetcherConfig

    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)  # the request
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            give_up = time.monotonic() + 15  # a client that never hangs up fails, not hangs
            while not stop.wait(0.1) and time.monotonic() < give_up:
                try:
                    conn.sendall(b"x")
                except OSError:
                    return  # the client hung up

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    config = HttpFetcherConfig(read_timeout=1.0, min_rate=1024.0, grace=0.5)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/repo/image/metadata/timestamp.json"
    started = time.monotonic()
    try:
        with pytest.raises(tuf_errors.SlowRetrievalError):
            for _chunk in HttpFetcher(config).fetch(url):
                pass
        assert time.monotonic() - started < config.grace * 2 + config.read_timeout + 1
    finally:
        stop.set()
        listener.close()
        thread.join(5)
