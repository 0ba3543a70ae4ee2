"""The director repository against an unmodified ``tuf.ngclient.Updater``, per device, no network.

Each device's client uses its own metadata URL (``director/{device}/metadata/``)
and the shared director root as bootstrap, as the agent does.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from repo_support import BASE, Clock, StoreFetcher
from securesystemslib.signer import Signer
from tuf.api.exceptions import BadVersionNumberError, UnsignedMetadataError
from tuf.api.metadata import Metadata, MetaFile, TargetFile, Timestamp
from tuf.ngclient import Updater

from edgeota.protocol.identity import InvalidDeviceIdError
from edgeota.protocol.targets_custom import DirectorTargetCustom, target_path_for
from edgeota.server.keystore import KeyAlgorithm, generate_file_key, load_signer
from edgeota.server.repo.director import AssignmentError, DirectorRepository, UnknownDeviceError
from edgeota.server.repo.image import ExpiryPolicy, UnsignedRootError, UntrustedSignerError
from edgeota.server.repo.storage import RepoStore


@dataclass
class Keys:
    root: list[Signer]
    online: Signer  # ECDSA P-256, as a KMS would hold it
    rogue: Signer
    spare: Signer


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    folder = tmp_path_factory.mktemp("director-keys")

    def make(name: str, algorithm: KeyAlgorithm = KeyAlgorithm.ED25519) -> Signer:
        role_key = generate_file_key(folder, name, algorithm)
        return load_signer(role_key.uri, role_key.public_key)

    return Keys(
        root=[make("root0"), make("root1")],
        online=make("director", KeyAlgorithm.ECDSA_P256),
        rogue=make("rogue", KeyAlgorithm.ECDSA_P256),
        spare=make("director2"),
    )


@dataclass
class Env:
    store: RepoStore
    director: DirectorRepository
    keys: Keys
    clock: Clock
    tmp: Path


@pytest.fixture
def env(tmp_path: Path, keys: Keys) -> Env:
    store = RepoStore(tmp_path / "blobs")
    clock = Clock()
    director = DirectorRepository.initialise(
        store,
        root_signers=keys.root,
        root_threshold=2,
        online_public_key=keys.online.public_key,
        online_signer=keys.online,
        expiry=ExpiryPolicy(),
        clock=clock,
    )
    return Env(store, director, keys, clock, tmp_path)


def device_client(env: Env, device: str, cache: str | None = None) -> Updater:
    folder = env.tmp / "clients" / (cache or device)
    folder.mkdir(parents=True, exist_ok=True)
    return Updater(
        metadata_dir=str(folder),
        metadata_base_url=f"{BASE}director/{device}/metadata/",
        fetcher=StoreFetcher(env.store),
        bootstrap=env.director.root_bytes(1),
    )


def bundle_target(device: str, name: str = "digits", version: str = "1.0.0",
                  counter: int = 1) -> TargetFile:
    """A director target: the image target's path, length and hashes plus the director custom."""
    custom = DirectorTargetCustom(
        device_id=device, hardware_id="rpi4", release_counter=counter,
        wrapped_key=b"wrapped-for-" + device.encode(),
    ).to_custom()
    return TargetFile(4096, {"sha256": "ab" * 32}, target_path_for(name, version),
                      {"custom": custom})


def assign_one(env: Env, device: str, target: TargetFile) -> int:
    return env.director.assign(device, {target.path: target})


def cached_targets(env: Env, device: str) -> dict[str, TargetFile]:
    """The targets the device's client verified and cached."""
    md = Metadata.from_file(str(env.tmp / "clients" / device / "targets.json"))
    return md.signed.targets


def test_device_sees_exactly_its_assignment(env: Env) -> None:
    env.director.ensure_device("dev-a")
    env.director.ensure_device("dev-b")
    target_a = bundle_target("dev-a")
    assert assign_one(env, "dev-a", target_a) == 2

    client_a = device_client(env, "dev-a")
    info = client_a.get_targetinfo(target_a.path)
    assert info is not None
    assert (info.length, info.hashes, info.custom) == (
        target_a.length, target_a.hashes, target_a.custom,
    )
    assert DirectorTargetCustom.from_custom(info.custom).device_id == "dev-a"
    assert set(cached_targets(env, "dev-a")) == {target_a.path}

    client_b = device_client(env, "dev-b")
    assert client_b.get_targetinfo(target_a.path) is None
    assert cached_targets(env, "dev-b") == {}
    device_b = env.store.root / "director/devices/dev-b/metadata"
    assert all(b"dev-a" not in f.read_bytes() for f in device_b.glob("*.json"))

    # Both devices are served the same shared root bytes.
    root_a = env.store.file_for_request("director/dev-a/metadata/1.root.json").read_bytes()
    root_b = env.store.file_for_request("director/dev-b/metadata/1.root.json").read_bytes()
    assert root_a == root_b == env.director.root_bytes(1)


def test_assignment_replaces_the_set_and_identical_is_a_no_op(env: Env) -> None:
    first = bundle_target("dev-a", version="1.0.0")
    second = bundle_target("dev-a", version="2.0.0", counter=2)
    version = assign_one(env, "dev-a", first)
    before = env.store.latest_versions("director/dev-a")
    assert assign_one(env, "dev-a", first) == version
    assert env.store.latest_versions("director/dev-a") == before

    assert assign_one(env, "dev-a", second) == version + 1
    client = device_client(env, "dev-a")
    assert client.get_targetinfo(first.path) is None
    assert client.get_targetinfo(second.path) is not None
    assert env.director.current_targets("dev-a").signed.targets == {second.path: second}

    assert env.director.assign("dev-a", {}) == version + 2
    assert env.director.current_targets("dev-a").signed.targets == {}


def test_assignment_checks_paths_custom_and_device(env: Env) -> None:
    target_b = bundle_target("dev-b")
    with pytest.raises(AssignmentError, match="carries the custom of device 'dev-b'"):
        assign_one(env, "dev-a", target_b)
    target = bundle_target("dev-a")
    with pytest.raises(AssignmentError, match="is filed under"):
        env.director.assign("dev-a", {"models/other/1.0.0.eotb": target})
    no_custom = TargetFile(1, {"sha256": "ab" * 32}, target.path)
    with pytest.raises(AssignmentError, match=r"no custom\.edgeota"):
        env.director.assign("dev-a", {target.path: no_custom})
    with pytest.raises(InvalidDeviceIdError):
        env.director.ensure_device("../image")
    with pytest.raises(UnknownDeviceError):
        env.director.current_targets("nobody")
    assert env.store.devices() == []


def test_metadata_signed_by_a_foreign_key_is_refused(env: Env, keys: Keys) -> None:
    assign_one(env, "dev-a", bundle_target("dev-a"))
    with pytest.raises(UntrustedSignerError):
        DirectorRepository(env.store, online_signer=keys.rogue)

    # An attacker with store access but not the director key signs a timestamp.
    version = env.store.latest_version("director/dev-a", "timestamp") + 1  # type: ignore[operator]
    snapshot_bytes = env.store.read_metadata("director/dev-a", "snapshot")
    snapshot_version = Metadata.from_bytes(snapshot_bytes).signed.version
    forged = Metadata(
        Timestamp(
            version=version,
            expires=env.clock() + timedelta(days=1),
            snapshot_meta=MetaFile.from_data(snapshot_version, snapshot_bytes, ["sha256"]),
        )
    )
    forged.sign(keys.rogue)
    env.store.write_metadata("director/dev-a", "timestamp", version, forged.to_bytes())
    with pytest.raises(UnsignedMetadataError, match="timestamp was signed by 0/1 keys"):
        device_client(env, "dev-a").refresh()


def test_replayed_director_timestamp_is_refused(env: Env) -> None:
    assign_one(env, "dev-a", bundle_target("dev-a", version="1.0.0"))
    assign_one(env, "dev-a", bundle_target("dev-a", version="2.0.0", counter=2))
    device_client(env, "dev-a").refresh()  # timestamp v3

    folder = env.store.root / "director/devices/dev-a/metadata"
    shutil.copyfile(folder / "2.timestamp.json", folder / "timestamp.json")
    with pytest.raises(BadVersionNumberError) as caught:
        device_client(env, "dev-a").refresh()
    assert type(caught.value) is BadVersionNumberError
    assert "New timestamp version 2 must be >= 3" in str(caught.value)


def test_ngclient_follows_director_key_rotation(env: Env, keys: Keys) -> None:
    old = bundle_target("dev-a", version="1.0.0")
    assign_one(env, "dev-a", old)
    env.director.ensure_device("dev-b")
    device_client(env, "dev-a").refresh()  # cached metadata signed with the old key

    stale_replica = DirectorRepository(env.store, online_signer=keys.online, clock=env.clock)
    with pytest.raises(UnsignedRootError):
        env.director.rotate_online_key(keys.spare.public_key, keys.spare, keys.root[:1])
    assert env.director.rotate_online_key(keys.spare.public_key, keys.spare, keys.root) == 2

    new = bundle_target("dev-a", version="2.0.0", counter=2)
    assign_one(env, "dev-a", new)
    for cache in ("dev-a", "fresh-a"):
        client = device_client(env, "dev-a", cache)
        assert client.get_targetinfo(new.path) is not None
        assert client.get_targetinfo(old.path) is None
    assert device_client(env, "dev-b").get_targetinfo(new.path) is None
    timestamp = Metadata.from_bytes(env.store.read_metadata("director/dev-a", "timestamp"))
    assert set(timestamp.signatures) == {keys.spare.public_key.keyid}

    # A replica that still holds the old key refuses to sign instead of publishing junk.
    with pytest.raises(UntrustedSignerError):
        stale_replica.assign("dev-a", {old.path: old})


def test_rotation_repairs_a_device_signed_by_a_stale_replica(env: Env, keys: Keys) -> None:
    """A replica that signs with the old key just before the new root lands is repaired."""
    target = bundle_target("dev-a")
    assign_one(env, "dev-a", target)
    stale_replica = DirectorRepository(env.store, online_signer=keys.online, clock=env.clock)
    late = bundle_target("dev-a", version="3.0.0", counter=3)

    class RacingStore(RepoStore):
        def write_metadata(self, repo: str, role: str, version: int, data: bytes) -> None:
            if (repo, role) == ("director", "root"):
                # Root v1 is still current: the stale replica signs with the old key only.
                stale_replica.assign("dev-a", {late.path: late})
            super().write_metadata(repo, role, version, data)

    racing = DirectorRepository(RacingStore(env.store.root), online_signer=keys.online,
                                clock=env.clock)
    racing.rotate_online_key(keys.spare.public_key, keys.spare, keys.root)
    info = device_client(env, "dev-a").get_targetinfo(late.path)
    assert info is not None and info.custom == late.custom


def test_refresh_resigns_near_expiry(tmp_path: Path, keys: Keys) -> None:
    store = RepoStore(tmp_path / "blobs")
    clock = Clock(datetime.now(UTC) - timedelta(days=20))
    director = DirectorRepository.initialise(
        store, root_signers=keys.root, root_threshold=1,
        online_public_key=keys.online.public_key, online_signer=keys.online, clock=clock,
    )
    env = Env(store, director, keys, clock, tmp_path)
    for device in ("dev-a", "dev-b"):
        assign_one(env, device, bundle_target(device))

    clock.now = datetime.now(UTC)
    # 20 of 30 days gone: targets (and so snapshot and timestamp) are due.
    assert director.refresh("dev-a") == ["targets", "snapshot", "timestamp"]
    assert director.refresh("dev-a") == []
    assert director.refresh_all() == 1  # only dev-b was still due
    for device in ("dev-a", "dev-b"):
        assert device_client(env, device).get_targetinfo(target_path_for("digits", "1.0.0"))
