"""A phase's director work on the thread pool: every device valid, told once, failures isolated.

The deploy runs through the service function on a real home (keys, SQLite and,
when available, PostgreSQL, both repositories); each device's director
metadata is then refreshed by an unmodified ``tuf.ngclient.Updater`` from the
shared root, and its wrapped content key is unwrapped with the device's own
key, as the agent does.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from repo_support import BASE, StoreFetcher
from securesystemslib.signer import Signer
from sqlalchemy import select
from tuf.api.metadata import Metadata, Root, TargetFile, Targets
from tuf.ngclient import Updater

from edgeota.protocol.identity import SERVER_IDENTITY, DevicePublicIdentity
from edgeota.protocol.keywrap import KemPrivateKey, unwrap_content_key, wrap_content_key
from edgeota.protocol.targets_custom import DirectorTargetCustom
from edgeota.server.config import load_server_config
from edgeota.server.context import ServerContext
from edgeota.server.db.models import (
    Assignment,
    AssignmentState,
    DeploymentEvent,
    Device,
    Release,
    ReleaseStatus,
)
from edgeota.server.home import HomeOptions, init_home
from edgeota.server.repo import director as director_module
from edgeota.server.repo.image import SigningError
from edgeota.server.services import deployments, rollouts
from edgeota.server.services.types import DeploymentRequest, DeployResult

DEVICES = 40
BARRIER_TIMEOUT = 10.0  # seconds two director threads wait for each other
CONTENT_KEY = secrets.token_bytes(32)


@dataclass
class Told:
    """``ctx.notify``: which device was told, on which thread.

    The first two calls wait for each other: that only completes if two
    devices' director work runs at the same time (a serial loop breaks the
    barrier after its timeout, and the notification is then missing).
    """

    devices: list[str] = field(default_factory=list)
    threads: set[str] = field(default_factory=set)
    barrier: threading.Barrier = field(
        default_factory=lambda: threading.Barrier(2, timeout=BARRIER_TIMEOUT))
    lock: threading.Lock = field(default_factory=threading.Lock)
    arrivals: int = 0

    def __call__(self, device_id: str) -> None:
        with self.lock:
            self.arrivals += 1
            first_two = self.arrivals <= 2
        if first_two:
            self.barrier.wait()
        with self.lock:
            self.devices.append(device_id)
            self.threads.add(threading.current_thread().name)


@dataclass
class Fleet:
    ctx: ServerContext
    keys: dict[str, KemPrivateKey]
    told: Told
    tmp: Path


@pytest.fixture
def fleet(tmp_path: Path, db_url: str) -> Iterator[Fleet]:
    init_home(tmp_path / "home", HomeOptions(bin_bits=4, database_url=db_url))
    ctx = ServerContext.open(load_server_config(tmp_path / "home"))
    told = Told()
    ctx.notify = told
    keys = {f"dev-{i:02d}": KemPrivateKey.generate() for i in range(DEVICES)}
    with ctx.sessions() as session, session.begin():
        for device_id, key in keys.items():
            identity = DevicePublicIdentity(device_id, key.public_key(), secrets.token_bytes(32))
            session.add(Device(id=device_id, hardware="rpi4", tags={"fleet": "lab"},
                               identity=identity.to_dict()))
        session.add(Release(
            name="digits", version="1.0.0", release_counter=1,
            target_path="models/digits/1.0.0.eotb", length=4096,
            sha256=hashlib.sha256(b"bundle").hexdigest(),
            plaintext_sha256=hashlib.sha256(b"plain").hexdigest(), plaintext_size=4000,
            manifest={"hardware": ["rpi4"]},
            wrapped_content_key=wrap_content_key(CONTENT_KEY, ctx.keywrap_key.public_key(),
                                                 SERVER_IDENTITY),
            bin_role="bins-0", bin_version=1, status=ReleaseStatus.PUBLISHED,
            created_by="test", published_at=datetime.now(UTC)))
    for device_id in keys:
        ctx.director.ensure_device(device_id)
    try:
        yield Fleet(ctx, keys, told, tmp_path)
    finally:
        ctx.close()


def deploy(fleet: Fleet) -> DeployResult:
    request = DeploymentRequest(name="digits", version="1.0.0", tags={"fleet": "lab"})
    with fleet.ctx.sessions() as session, session.begin():
        return deployments.deploy(fleet.ctx, session, "test", request)


def check_device(fleet: Fleet, device_id: str) -> None:
    """The device's director metadata as the agent sees it: signed, current, its own key."""
    ctx = fleet.ctx
    root = Metadata[Root].from_bytes(ctx.director.root_bytes())
    repo = f"director/{device_id}"
    for role in ("targets", "snapshot", "timestamp"):
        md = Metadata.from_bytes(ctx.store.read_metadata(repo, role))
        root.signed.verify_delegate(role, md.signed_bytes, md.signatures)
    cache = fleet.tmp / "clients" / device_id
    cache.mkdir(parents=True)
    updater = Updater(metadata_dir=str(cache),
                      metadata_base_url=f"{BASE}director/{device_id}/metadata/",
                      fetcher=StoreFetcher(ctx.store), bootstrap=ctx.director.root_bytes(1))
    updater.refresh()
    target = updater.get_targetinfo("models/digits/1.0.0.eotb")
    assert target is not None
    custom = DirectorTargetCustom.from_custom(target.custom, "director target")
    assert custom.device_id == device_id
    assert unwrap_content_key(custom.wrapped_key, fleet.keys[device_id], device_id) == CONTENT_KEY


def assignment_states(fleet: Fleet) -> dict[str, tuple[AssignmentState, str | None]]:
    with fleet.ctx.sessions() as session:
        return {a.device_id: (a.state, a.detail) for a in session.scalars(select(Assignment))}


def test_a_phase_is_assigned_in_parallel_and_every_device_verifies(fleet: Fleet) -> None:
    response = deploy(fleet)

    assert sorted(response.assigned) == sorted(fleet.keys)
    assert sorted(fleet.told.devices) == sorted(fleet.keys)  # each device told exactly once
    assert 2 <= len(fleet.told.threads) <= deployments.MAX_DIRECTOR_WORKERS
    assert all(name.startswith("director") for name in fleet.told.threads)
    assert set(assignment_states(fleet).values()) == {(AssignmentState.PENDING, None)}
    for device_id in fleet.keys:
        check_device(fleet, device_id)


def signing_fails_for(device_id: str, message: str) -> Callable[[Metadata, Signer], None]:
    """``director.sign`` refusing the targets of one device (a KMS outage for its calls)."""
    original = director_module.sign

    def failing_sign(md: Metadata, signer: Signer) -> None:
        if isinstance(md.signed, Targets) and any(
                DirectorTargetCustom.from_custom(t.custom, "test").device_id == device_id
                for t in md.signed.targets.values()):
            raise SigningError(message)
        original(md, signer)

    return failing_sign


def test_one_device_failing_leaves_the_others_assigned_and_is_retried(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = "dev-07"
    before = fleet.ctx.store.latest_versions(f"director/{broken}")
    original = director_module.sign
    monkeypatch.setattr(director_module, "sign",
                        signing_fails_for(broken, "injected: the KMS refused"))
    response = deploy(fleet)

    others = sorted(set(fleet.keys) - {broken})
    assert sorted(response.assigned) == others
    assert response.scheduled[broken] == 0
    assert set(response.failed) == {broken} and "the KMS refused" in response.failed[broken]
    assert sorted(fleet.told.devices) == others
    states = assignment_states(fleet)
    state, detail = states.pop(broken)
    assert state == AssignmentState.WAITING
    assert detail is not None
    assert "(signing_failed)" in detail
    assert "the KMS refused" in detail
    assert set(states.values()) == {(AssignmentState.PENDING, None)}
    assert fleet.ctx.store.latest_versions(f"director/{broken}") == before  # nothing written
    assert fleet.ctx.director.current_targets(broken).signed.targets == {}
    with fleet.ctx.sessions() as session:
        event = session.scalars(select(DeploymentEvent).where(
            DeploymentEvent.kind == "phase_started")).one()
        assert set(event.detail["failed"]) == {broken}
    for device_id in others[:3]:
        check_device(fleet, device_id)

    monkeypatch.setattr(director_module, "sign", original)
    assert rollouts.advance(fleet.ctx)  # the engine's next pass retries it
    assert fleet.told.devices.count(broken) == 1
    assert sorted(fleet.told.devices) == sorted(fleet.keys)
    assert assignment_states(fleet)[broken] == (AssignmentState.PENDING, None)
    check_device(fleet, broken)
    with fleet.ctx.sessions() as session:
        retried = session.scalars(select(DeploymentEvent).where(
            DeploymentEvent.kind == "retried")).one()
        assert retried.detail == {"devices": [broken], "failed": {}}


def test_a_device_that_keeps_failing_is_given_up_after_a_bounded_number_of_attempts(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = "dev-03"
    monkeypatch.setattr(director_module, "sign",
                        signing_fails_for(broken, "injected: this device's key is gone"))
    deploy(fleet)
    for _attempt in range(deployments.MAX_DIRECTOR_ATTEMPTS - 1):
        rollouts.advance(fleet.ctx)
        assert assignment_states(fleet)[broken][0] == AssignmentState.WAITING
    rollouts.advance(fleet.ctx)
    state, detail = assignment_states(fleet)[broken]
    assert state == AssignmentState.FAILED
    assert detail.startswith(f"gave up after {deployments.MAX_DIRECTOR_ATTEMPTS} attempts")
    assert "this device's key is gone" in detail
    with fleet.ctx.sessions() as session:
        events = session.scalars(select(DeploymentEvent.kind).where(
            DeploymentEvent.kind.in_(("phase_started", "retried")))).all()
    assert len(events) == deployments.MAX_DIRECTOR_ATTEMPTS
    rollouts.advance(fleet.ctx)  # no more attempts, no more history
    with fleet.ctx.sessions() as session:
        assert session.scalars(select(DeploymentEvent.kind).where(
            DeploymentEvent.kind == "retried")).all() == ["retried"] * (
                deployments.MAX_DIRECTOR_ATTEMPTS - 1)
    assert broken not in fleet.told.devices


def test_stale_targets_handed_to_assign_are_read_again(fleet: Fleet) -> None:
    """A caller's copy of the targets older than the stored one is not built on."""
    fleet.told.arrivals = 2  # one device only: no second notify would meet the barrier
    director = fleet.ctx.director
    stale = director.current_targets("dev-00")
    director.refresh("dev-00", datetime(2100, 1, 1, tzinfo=UTC))  # a new targets version
    fresh = director.current_targets("dev-00")
    assert fresh.signed.version == stale.signed.version + 1
    with fleet.ctx.sessions() as session:
        release = session.scalars(select(Release)).one()
    custom = DirectorTargetCustom(
        device_id="dev-00", hardware_id="rpi4", release_counter=release.release_counter,
        wrapped_key=wrap_content_key(CONTENT_KEY, fleet.keys["dev-00"].public_key(), "dev-00"))
    target = TargetFile(length=release.length, hashes={"sha256": release.sha256},
                        path=release.target_path,
                        unrecognized_fields={"custom": custom.to_custom()})
    seen: list[dict[str, TargetFile]] = []

    def change(current: Mapping[str, TargetFile]) -> dict[str, TargetFile]:
        seen.append(dict(current))
        return {**current, target.path: target}

    # What the deploy's pool does with the targets it read on the request thread.
    director.assign_with("dev-00", change, stale)
    assert seen == [fresh.signed.targets]
    assert director.current_targets("dev-00").signed.version == fresh.signed.version + 1


def test_a_rollback_runs_on_the_pool_and_skips_a_device_whose_metadata_failed(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    with fleet.ctx.sessions() as session, session.begin():
        first = session.scalars(select(Release)).one()
        session.add(Release(
            name="digits", version="1.1.0", release_counter=1,
            target_path="models/digits/1.1.0.eotb", length=4096,
            sha256=hashlib.sha256(b"bundle 1.1").hexdigest(),
            plaintext_sha256=hashlib.sha256(b"plain 1.1").hexdigest(), plaintext_size=4000,
            manifest={"hardware": ["rpi4"]}, wrapped_content_key=first.wrapped_content_key,
            bin_role="bins-0", bin_version=1, status=ReleaseStatus.PUBLISHED,
            created_by="test", published_at=datetime.now(UTC)))
    fleet.told.arrivals = 2  # the barrier has proved parallelism elsewhere
    deploy(fleet)
    with fleet.ctx.sessions() as session, session.begin():
        second = deployments.deploy(fleet.ctx, session, "test", DeploymentRequest(
            name="digits", version="1.1.0", tags={"fleet": "lab"}))
    broken = "dev-05"
    monkeypatch.setattr(director_module, "sign", signing_fails_for(broken, "injected: KMS"))
    with fleet.ctx.sessions() as session, session.begin():
        answer = rollouts.rollback(fleet.ctx, session, "test", second.deployment_id)
    assert broken not in answer.devices and len(answer.devices) == len(fleet.keys) - 1
    assert "could not be written" in answer.skipped[broken]
    assert "injected: KMS" in answer.skipped[broken]
    for device_id in answer.devices[:3]:
        targets = fleet.ctx.director.current_targets(device_id).signed.targets
        assert list(targets) == ["models/digits/1.0.0.eotb"]
    assert list(fleet.ctx.director.current_targets(broken).signed.targets) == [
        "models/digits/1.1.0.eotb"]  # unchanged: it still has what it had
