"""The image repository against an unmodified ``tuf.ngclient.Updater``, with no network.

The fetcher below serves the store folder the way the HTTP and MQTT front
ends do (through ``RepoStore.file_for_request``), so these tests also pin the
URL layout a standard TUF client expects. Attack tests assert the exact error
type ngclient raises, because "some RepositoryError" would also pass for an
unrelated bug.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from repo_support import BASE, Clock, StoreFetcher
from securesystemslib.signer import Signer
from tuf.api.exceptions import (
    BadVersionNumberError,
    ExpiredMetadataError,
    LengthOrHashMismatchError,
    RepositoryError,
    UnsignedMetadataError,
)
from tuf.api.metadata import Metadata, MetaFile, Snapshot, TargetFile, Targets, Timestamp
from tuf.ngclient import Updater

from edgeota.protocol.manifest import TensorSpec
from edgeota.protocol.targets_custom import ImageTargetCustom, target_path_for
from edgeota.server.home import HomeOptions
from edgeota.server.keystore import KeyAlgorithm, generate_file_key, load_signer
from edgeota.server.repo.image import (
    DEFAULT_BIN_BITS,
    BinContentError,
    ExpiryPolicy,
    ImageRepository,
    SignatureMergeError,
    StaleMetadataError,
    TargetExistsError,
    UnsignedBinError,
    UnsignedRootError,
    UntrustedSignerError,
    add_target_to_bin,
    bin_for,
    merge_signatures,
    sign,
)
from edgeota.server.repo.storage import (
    RepoFileNotFoundError,
    RepoStore,
    VersionConflictError,
)


@dataclass
class Keys:
    root: list[Signer]
    release: list[Signer]
    snapshot: Signer  # ECDSA P-256, as a KMS would hold it
    timestamp: Signer
    spare: list[Signer]  # for rotations


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    folder = tmp_path_factory.mktemp("keys")

    def make(name: str, algorithm: KeyAlgorithm = KeyAlgorithm.ED25519) -> Signer:
        role_key = generate_file_key(folder, name, algorithm)
        return load_signer(role_key.uri, role_key.public_key)

    return Keys(
        root=[make(f"root{i}") for i in range(3)],
        release=[make(f"release{i}") for i in range(3)],
        snapshot=make("snapshot", KeyAlgorithm.ECDSA_P256),
        timestamp=make("timestamp"),
        spare=[make("spare0", KeyAlgorithm.ECDSA_P256), make("spare1"), make("spare2"),
               make("spare3")],
    )


@dataclass
class Env:
    store: RepoStore
    repo: ImageRepository
    keys: Keys
    clock: Clock
    tmp: Path
    release_signers: list[Signer]


def make_env(
    tmp_path: Path,
    keys: Keys,
    *,
    bin_bits: int = 4,
    release_threshold: int = 1,
    release_count: int = 1,
    clock: Clock | None = None,
) -> Env:
    store = RepoStore(tmp_path / "blobs")
    clock = clock or Clock()
    release = keys.release[:release_count]
    repo = ImageRepository.initialise(
        store,
        root_signers=keys.root[:1],
        root_threshold=1,
        release_signers=release,
        release_threshold=release_threshold,
        snapshot_signer=keys.snapshot,
        timestamp_signer=keys.timestamp,
        bin_bits=bin_bits,
        expiry=ExpiryPolicy(),
        clock=clock,
    )
    return Env(store, repo, keys, clock, tmp_path, release)


@pytest.fixture
def env(tmp_path: Path, keys: Keys) -> Env:
    return make_env(tmp_path, keys)


def new_client(env: Env, name: str = "client") -> Updater:
    """A fresh Updater; the same ``name`` reuses the same local cache, like a device does."""
    folder = env.tmp / name
    (folder / "metadata").mkdir(parents=True, exist_ok=True)
    return Updater(
        metadata_dir=str(folder / "metadata"),
        metadata_base_url=f"{BASE}image/metadata/",
        target_dir=str(folder / "targets"),
        target_base_url=f"{BASE}image/targets/",
        fetcher=StoreFetcher(env.store),
        bootstrap=env.repo.root_bytes(1),
    )


@dataclass
class Release:
    path: str
    target: TargetFile
    data: bytes


def upload(env: Env, name: str, version: str = "1.0.0", size: int = 2048) -> TargetFile:
    """Store a random bundle and return its TargetFile with the image custom attached."""
    data = os.urandom(size)
    source = env.tmp / f"{name}-{version}.eotb"
    source.write_bytes(data)
    path = target_path_for(name, version)
    stored = env.store.put_target(path, source)
    custom = ImageTargetCustom(
        name=name,
        version=version,
        hardware=("rpi4",),
        release_counter=1,
        plaintext_sha256=hashlib.sha256(b"plain" + data).hexdigest(),
        plaintext_size=size,
        inputs=(TensorSpec("input", "FP32", (None, 64)),),
        outputs=(TensorSpec("label", "INT64", (None,)),),
    ).to_custom()
    return TargetFile(stored.length, stored.hashes, path, {"custom": custom})


def prepare(env: Env, target: TargetFile, signers: list[Signer] | None = None) -> bytes:
    """What the operator's machine does: add the target to the current bin and sign it."""
    role = bin_for(env.repo.current("targets"), target.path)
    new = add_target_to_bin(
        env.repo.current(role), target.path, target,
        expires=env.clock() + timedelta(days=365),
    )
    for signer in env.release_signers if signers is None else signers:
        sign(new, signer)
    return new.to_bytes()


def release(env: Env, name: str, version: str = "1.0.0") -> Release:
    target = upload(env, name, version)
    env.repo.publish_bin(prepare(env, target))
    data = env.store.check_target(target).read_bytes()
    return Release(target.path, target, data)


def names_in_one_bin(env: Env, count: int) -> list[str]:
    """Model names whose 1.0.0 target paths share one bin."""
    targets = env.repo.current("targets")
    by_bin: dict[str, list[str]] = {}
    for i in range(1000):
        name = f"model{i}"
        group = by_bin.setdefault(bin_for(targets, target_path_for(name, "1.0.0")), [])
        group.append(name)
        if len(group) == count:
            return group
    raise AssertionError("no bin with enough names")


# -- publishing and downloading -------------------------------------------------


def test_publish_release_and_download(env: Env) -> None:
    rel = release(env, "digits")

    client = new_client(env)
    client.refresh()
    info = client.get_targetinfo(rel.path)
    assert info is not None
    assert info.custom == rel.target.custom
    assert ImageTargetCustom.from_custom(info.custom).name == "digits"
    downloaded = client.download_target(info)
    assert Path(downloaded).read_bytes() == rel.data

    blobs = env.store.root
    sha = rel.target.hashes["sha256"]
    role = bin_for(env.repo.current("targets"), rel.path)
    assert (blobs / "image/targets/models/digits" / f"{sha}.1.0.0.eotb").is_file()
    for name in ("1.root.json", "1.targets.json", f"2.{role}.json", "2.snapshot.json",
                 "2.timestamp.json", "timestamp.json"):
        assert (blobs / "image/metadata" / name).is_file(), name
    # The bins are signed by the release keys only: the server process never had them.
    timestamp = env.repo.current("timestamp")
    assert timestamp.signed.version == 2
    assert set(timestamp.signatures) == {env.keys.timestamp.public_key.keyid}


def test_default_64_bins(tmp_path: Path, keys: Keys) -> None:
    assert HomeOptions().bin_bits == DEFAULT_BIN_BITS == 6
    repo = ImageRepository.initialise(
        RepoStore(tmp_path / "blobs"), root_signers=keys.root[:1], root_threshold=1,
        release_signers=keys.release[:1], release_threshold=1, snapshot_signer=keys.snapshot,
        timestamp_signer=keys.timestamp, expiry=ExpiryPolicy(), clock=Clock())
    snapshot = repo.current("snapshot").signed
    assert len(snapshot.meta) == 65  # targets.json + bins-00 .. bins-3f
    assert {"bins-00.json", "bins-3f.json"} <= set(snapshot.meta)


def test_256_bins_and_twenty_targets(tmp_path: Path, keys: Keys) -> None:
    env = make_env(tmp_path, keys, bin_bits=8)
    snapshot = env.repo.current("snapshot").signed
    assert len(snapshot.meta) == 257  # targets.json + bins-00 .. bins-ff
    assert {"bins-00.json", "bins-ff.json"} <= set(snapshot.meta)
    # versions only: the snapshot stays small however many releases exist
    assert all(m.length is None and m.hashes is None for m in snapshot.meta.values())

    releases = [release(env, f"model{i}") for i in range(20)]
    targets = env.repo.current("targets")
    assert len({bin_for(targets, r.path) for r in releases}) > 10

    client = new_client(env)
    for rel in releases:
        info = client.get_targetinfo(rel.path)
        assert info is not None and info.custom == rel.target.custom
        assert Path(client.download_target(info)).read_bytes() == rel.data
    assert env.repo.current("timestamp").signed.version == 21


def test_put_target_is_idempotent_and_content_addressed(env: Env) -> None:
    source = env.tmp / "blob"
    source.write_bytes(b"x" * 1000)
    first = env.store.put_target("models/a/1.0.0.eotb", source)
    again = env.store.put_target("models/a/1.0.0.eotb", source)
    assert first == again
    assert first.length == 1000
    assert first.hashes == {"sha256": hashlib.sha256(b"x" * 1000).hexdigest()}
    with pytest.raises(ValueError):
        env.store.put_target("models/../x.eotb", source)


# -- attacks ngclient must refuse -----------------------------------------------


def test_tampered_target_file_is_refused(env: Env) -> None:
    rel = release(env, "digits")
    stored = env.store.check_target(rel.target)
    data = bytearray(stored.read_bytes())
    data[100] ^= 0x01
    stored.write_bytes(bytes(data))

    client = new_client(env)
    info = client.get_targetinfo(rel.path)
    assert info is not None
    with pytest.raises(LengthOrHashMismatchError):
        client.download_target(info)


def test_replayed_older_timestamp_is_refused(env: Env) -> None:
    release(env, "digits")
    release(env, "speech")
    new_client(env).refresh()  # the device now trusts timestamp v3

    metadata = env.store.root / "image/metadata"
    shutil.copyfile(metadata / "2.timestamp.json", metadata / "timestamp.json")
    with pytest.raises(BadVersionNumberError) as caught:
        new_client(env).refresh()
    assert type(caught.value) is BadVersionNumberError  # not EqualVersionNumberError
    assert "New timestamp version 2 must be >= 3" in str(caught.value)


def test_expired_timestamp_is_refused(tmp_path: Path, keys: Keys) -> None:
    # The repository's clock is two days behind: everything it signs with a
    # one-day timestamp expiry is already expired for the device.
    env = make_env(tmp_path, keys, clock=Clock(datetime.now(UTC) - timedelta(days=2)))
    with pytest.raises(ExpiredMetadataError, match=r"timestamp\.json is expired"):
        new_client(env).refresh()


def _forge_snapshot(env: Env, mutate: object) -> None:
    """Write snapshot + timestamp signed with the REAL online keys around ``mutate``."""
    current = env.repo.current("snapshot")
    snapshot = Metadata(
        Snapshot(
            version=current.signed.version + 1,
            expires=current.signed.expires,
            meta=dict(current.signed.meta),
        )
    )
    mutate(snapshot.signed)  # type: ignore[operator]
    snapshot.sign(env.keys.snapshot)
    data = snapshot.to_bytes()
    env.store.write_metadata("image", "snapshot", snapshot.signed.version, data)
    version = env.store.latest_version("image", "timestamp") + 1  # type: ignore[operator]
    timestamp = Metadata(
        Timestamp(
            version=version,
            expires=env.clock() + timedelta(days=1),
            snapshot_meta=MetaFile.from_data(snapshot.signed.version, data, ["sha256"]),
        )
    )
    timestamp.sign(env.keys.timestamp)
    env.store.write_metadata("image", "timestamp", version, timestamp.to_bytes())


def test_snapshot_that_drops_a_bin_is_refused(env: Env) -> None:
    rel = release(env, "digits")
    role = bin_for(env.repo.current("targets"), rel.path)
    new_client(env, "seen").refresh()  # this device has the honest snapshot cached

    _forge_snapshot(env, lambda snapshot: snapshot.meta.pop(f"{role}.json"))

    # A device that knew the bin: rollback protection in update_snapshot.
    with pytest.raises(RepositoryError) as caught:
        new_client(env, "seen").refresh()
    assert type(caught.value) is RepositoryError
    assert f"New snapshot is missing info for '{role}.json'" in str(caught.value)

    # A new device: the delegation points at a bin the snapshot does not list.
    fresh = new_client(env, "fresh")
    fresh.refresh()
    with pytest.raises(RepositoryError) as caught:
        fresh.get_targetinfo(rel.path)
    assert type(caught.value) is RepositoryError
    assert f"Role {role} was delegated but is not part of snapshot" in str(caught.value)


def test_online_keys_cannot_add_an_image_target(env: Env) -> None:
    """The server's own keys in an attacker's hands cannot make a target ngclient accepts."""
    evil = upload(env, "evil")
    role = bin_for(env.repo.current("targets"), evil.path)
    forged = add_target_to_bin(
        env.repo.current(role), evil.path, evil, expires=env.clock() + timedelta(days=30)
    )
    sign(forged, env.keys.snapshot)
    sign(forged, env.keys.timestamp)

    with pytest.raises(UnsignedBinError, match="no valid release signature"):
        env.repo.check_bin_update(forged.to_bytes())
    with pytest.raises(UnsignedBinError):
        env.repo.publish_bin(forged.to_bytes())

    # The attacker bypasses the server and writes the store directly, with
    # snapshot and timestamp signed by the real online keys.
    env.store.write_metadata("image", role, forged.signed.version, forged.to_bytes())
    forged_meta = {f"{role}.json": MetaFile(forged.signed.version)}
    _forge_snapshot(env, lambda snapshot: snapshot.meta.update(forged_meta))
    client = new_client(env)
    client.refresh()  # snapshot and timestamp are genuinely signed
    with pytest.raises(UnsignedMetadataError, match=f"{role} was signed by 0/1 keys"):
        client.get_targetinfo(evil.path)


# -- k-of-n release signing ---------------------------------------------------------


def test_two_of_three_release_managers(tmp_path: Path, keys: Keys) -> None:
    env = make_env(tmp_path, keys, release_threshold=2, release_count=3)
    first, second, _third = env.release_signers
    target = upload(env, "digits")
    role = bin_for(env.repo.current("targets"), target.path)

    one = prepare(env, target, [first])
    check = env.repo.check_bin_update(one)
    assert (check.role, check.version, check.threshold) == (role, 2, 2)
    assert check.valid_keyids == {first.public_key.keyid}
    assert not check.complete and check.missing_signatures == 1
    assert set(check.added_targets) == {target.path}

    before = env.store.latest_versions("image")
    with pytest.raises(UnsignedBinError, match="1 of the 2 release signatures"):
        env.repo.publish_bin(one)
    assert env.store.latest_versions("image") == before
    assert new_client(env, "early").get_targetinfo(target.path) is None

    # The second release manager signs the same prepared file on their machine.
    theirs = Metadata.from_bytes(one)
    theirs.signatures.clear()
    sign(theirs, second)
    merged = merge_signatures(one, theirs.to_bytes())
    check = env.repo.check_bin_update(merged)
    assert check.complete and check.valid_keyids == {
        first.public_key.keyid, second.public_key.keyid
    }
    env.repo.publish_bin(merged)
    info = new_client(env, "late").get_targetinfo(target.path)
    assert info is not None and info.custom == target.custom

    other = Metadata.from_bytes(one)
    other.signed.version += 1
    with pytest.raises(SignatureMergeError):
        merge_signatures(one, other.to_bytes())


def test_stale_bin_version_must_be_prepared_again(env: Env) -> None:
    name_a, name_b = names_in_one_bin(env, 2)
    target_a, target_b = upload(env, name_a), upload(env, name_b)
    # Both operators start from the same current bin (v1).
    prepared_a, prepared_b = prepare(env, target_a), prepare(env, target_b)

    env.repo.publish_bin(prepared_a)
    with pytest.raises(StaleMetadataError) as caught:
        env.repo.publish_bin(prepared_b)
    assert (caught.value.got, caught.value.expected) == (2, 3)

    env.repo.publish_bin(prepare(env, target_b))  # re-prepared from v2
    client = new_client(env)
    assert client.get_targetinfo(target_a.path) is not None
    assert client.get_targetinfo(target_b.path) is not None


def test_bins_may_only_add_servable_targets_in_themselves(env: Env) -> None:
    rel = release(env, "digits")
    role = bin_for(env.repo.current("targets"), rel.path)
    current = env.repo.current(role)
    expires = env.clock() + timedelta(days=365)

    removed = add_target_to_bin(current, rel.path, rel.target, expires=expires)
    del removed.signed.targets[rel.path]
    sign(removed, env.release_signers[0])
    with pytest.raises(BinContentError, match="removes released target"):
        env.repo.check_bin_update(removed.to_bytes(), role=role)

    changed = add_target_to_bin(current, rel.path, rel.target, expires=expires)
    changed.signed.targets[rel.path].length += 1
    sign(changed, env.release_signers[0])
    with pytest.raises(BinContentError, match="changes released target"):
        env.repo.check_bin_update(changed.to_bytes())

    other_name = next(
        f"m{i}" for i in range(1000)
        if bin_for(env.repo.current("targets"), target_path_for(f"m{i}", "1.0.0")) != role
    )
    other = upload(env, other_name)
    misplaced = add_target_to_bin(current, other.path, other, expires=expires)
    sign(misplaced, env.release_signers[0])
    with pytest.raises(BinContentError, match="do not belong in"):
        env.repo.check_bin_update(misplaced.to_bytes(), role=role)

    different = TargetFile(rel.target.length, {"sha256": "0" * 64}, rel.path)
    with pytest.raises(TargetExistsError):
        add_target_to_bin(current, rel.path, different, expires=expires)

    # Signed and well-formed, but the bundle was never uploaded.
    missing = TargetFile(10, {"sha256": "ab" * 32}, target_path_for(names_in_one_bin(env, 1)[0],
                                                                    "9.9.9"))
    with pytest.raises(BinContentError, match="has not been uploaded"):
        env.repo.publish_bin(prepare(env, missing))
    with pytest.raises(BinContentError, match="not TUF metadata"):
        env.repo.check_bin_update(b"{not json")


def test_version_files_are_never_overwritten(env: Env) -> None:
    snapshot = env.store.read_metadata("image", "snapshot", 1)
    with pytest.raises(VersionConflictError):
        env.store.write_metadata("image", "snapshot", 1, snapshot)
    pointer = env.store.read_metadata("image", "timestamp")
    old = env.store.read_metadata("image", "timestamp", 1)
    release(env, "digits")  # timestamp v2 is current now
    current = env.store.read_metadata("image", "timestamp")
    assert current != pointer
    with pytest.raises(VersionConflictError):
        env.store.write_metadata("image", "timestamp", 1, old)
    assert env.store.read_metadata("image", "timestamp") == current


def test_bin_stored_but_never_snapshotted_is_published_by_refresh(env: Env) -> None:
    """A crash between a bin and its snapshot leaves a valid bin nobody sees; refresh heals."""
    target = upload(env, "digits")
    prepared = Metadata.from_bytes(prepare(env, target))
    role = bin_for(env.repo.current("targets"), target.path)
    env.store.write_metadata("image", role, prepared.signed.version, prepared.to_bytes())
    assert new_client(env, "before").get_targetinfo(target.path) is None

    assert env.repo.refresh() == ["snapshot", "timestamp"]
    assert new_client(env, "after").get_targetinfo(target.path) is not None


def test_replicas_publishing_at_once_lose_nothing(env: Env, keys: Keys) -> None:
    """Replicas share the store; the store lock orders their snapshot/timestamp writes."""
    replicas = [env.repo] + [
        ImageRepository(env.store, snapshot_signer=keys.snapshot,
                        timestamp_signer=keys.timestamp, clock=env.clock)
        for _ in range(2)
    ]
    targets = env.repo.current("targets")
    names: dict[str, str] = {}
    for i in range(1000):
        names.setdefault(bin_for(targets, target_path_for(f"m{i}", "1.0.0")), f"m{i}")
    prepared = [prepare(env, upload(env, name)) for name in list(names.values())[:12]]

    with ThreadPoolExecutor(max_workers=6) as pool:
        versions = list(pool.map(
            lambda job: replicas[job[0] % 3].publish_bin(job[1]), enumerate(prepared)
        ))
    assert sorted(versions) == list(range(2, 14))
    client = new_client(env)
    for name in list(names.values())[:12]:
        assert client.get_targetinfo(target_path_for(name, "1.0.0")) is not None


# -- expiry and key rotation --------------------------------------------------------


def test_refresh_resigns_near_expiry(tmp_path: Path, keys: Keys) -> None:
    start = datetime.now(UTC) - timedelta(days=2)
    env = make_env(tmp_path, keys, clock=Clock(start))
    with pytest.raises(ExpiredMetadataError):
        new_client(env, "expired").refresh()

    env.clock.now = datetime.now(UTC)
    assert env.repo.refresh() == ["timestamp"]  # snapshot: 5 of 7 days left, above the margin
    assert env.repo.refresh() == []
    new_client(env, "renewed").refresh()

    # Later, the snapshot too is within half its period of expiry.
    env.clock.now = datetime.now(UTC) + timedelta(days=2)
    assert env.repo.refresh() == ["snapshot", "timestamp"]
    client = new_client(env, "renewed")
    client.refresh()
    rel = release(env, "digits")
    assert new_client(env, "renewed").get_targetinfo(rel.path) is not None


def test_ngclient_follows_online_key_rotation(env: Env, keys: Keys) -> None:
    before = release(env, "digits")
    new_client(env, "device").refresh()  # cached metadata signed with the old keys

    new_snapshot, new_timestamp = keys.spare[0], keys.spare[1]
    root_v2 = env.repo.rotate_online_key(
        "snapshot", new_snapshot.public_key, new_snapshot, keys.root[:1]
    )
    assert root_v2 == 2
    # Written before root v2: verifiable under both roots, so no device sees a gap.
    snapshot = env.repo.current("snapshot")
    for version in (1, 2):
        root = Metadata.from_bytes(env.repo.root_bytes(version)).signed
        root.verify_delegate("snapshot", snapshot.signed_bytes, snapshot.signatures)

    assert env.repo.rotate_online_key(
        "timestamp", new_timestamp.public_key, new_timestamp, keys.root[:1]
    ) == 3
    after = release(env, "speech")

    for name in ("device", "fresh"):
        client = new_client(env, name)
        assert client.get_targetinfo(before.path) is not None
        assert client.get_targetinfo(after.path) is not None
    timestamp = env.repo.current("timestamp")
    assert set(timestamp.signatures) == {new_timestamp.public_key.keyid}

    # A replica still configured with the old key refuses to start.
    with pytest.raises(UntrustedSignerError):
        ImageRepository(env.store, snapshot_signer=keys.snapshot, timestamp_signer=new_timestamp)


def test_ngclient_follows_root_rotation(env: Env, keys: Keys) -> None:
    rel = release(env, "digits")
    new_root = keys.spare[2:4]
    with pytest.raises(UnsignedRootError):
        env.repo.rotate_root([k.public_key for k in new_root], new_root[:1], keys.root[:1], 2)
    assert env.store.latest_version("image", "root") == 1

    version = env.repo.rotate_root([k.public_key for k in new_root], new_root, keys.root[:1], 2)
    assert version == 2
    client = new_client(env)
    assert client.get_targetinfo(rel.path) is not None
    trusted = Metadata.from_file(str(env.tmp / "client/metadata/root.json"))
    assert trusted.signed.version == 2
    assert set(trusted.signed.roles["root"].keyids) == {k.public_key.keyid for k in new_root}

    # The old root key alone can no longer sign a root.
    with pytest.raises(UnsignedRootError):
        env.repo.rotate_root([keys.root[0].public_key], keys.root[:1], keys.root[:1], 1)


# -- request paths --------------------------------------------------------------------


def test_request_paths_cannot_escape_or_guess(env: Env) -> None:
    rel = release(env, "digits")
    store = env.store
    sha = rel.target.hashes["sha256"]
    assert store.metadata_file_for_request("image", "1.root.json").is_file()
    assert store.metadata_file_for_request("image", "timestamp.json").is_file()
    assert store.target_file_for_request(f"models/digits/{sha}.1.0.0.eotb").is_file()
    assert store.file_for_request("image/metadata/2.snapshot.json").is_file()

    bad_metadata = [
        ("image", "../image/metadata/1.root.json"),
        ("image", "..%2f1.root.json"),
        ("image", "%2e%2e/1.root.json"),
        ("image", "/etc/passwd"),
        ("image", str(store.root / "image/metadata/1.root.json")),
        ("image", "root.json"),          # ngclient never asks for an unversioned root
        ("image", "snapshot.json"),
        ("image", "01.root.json"),       # no aliases through leading zeros
        ("image", "1.evil.json"),
        ("image", "1.bins-zz.json"),
        ("image", "1.root.json\n"),
        ("image", ".lock"),
        ("image", "99.root.json"),       # well-formed, missing
        ("director", "1.root.json"),
        ("director/../image", "1.root.json"),
        ("director/Device", "1.root.json"),
        ("director/a/b", "1.root.json"),
        ("director/unknown-device", "1.root.json"),
        ("../image", "1.root.json"),
        ("director/" + "a" * 65, "1.root.json"),
    ]
    for repo, name in bad_metadata:
        with pytest.raises(RepoFileNotFoundError):
            store.metadata_file_for_request(repo, name)

    bad_targets = [
        f"models/digits/../digits/{sha}.1.0.0.eotb",
        f"/models/digits/{sha}.1.0.0.eotb",
        f"models/digits/%2e%2e/{sha}.1.0.0.eotb",
        f"models//digits/{sha}.1.0.0.eotb",
        "models/digits/1.0.0.eotb",      # not hash-prefixed
        f"models/digits/{sha}.",
        f"models/digits/{sha.upper()}.1.0.0.eotb",
        f"models/digits/.{sha}.1.0.0.eotb",
        "../../image/metadata/1.root.json",
        "",
    ]
    for path in bad_targets:
        with pytest.raises(RepoFileNotFoundError):
            store.target_file_for_request(path)

    for path in ["image/metadata/../metadata/1.root.json", "image/metadata", "director/x",
                 "image/../image/metadata/1.root.json", "etc/passwd",
                 "/image/metadata/1.root.json"]:
        with pytest.raises(RepoFileNotFoundError):
            store.file_for_request(path)

    # A symlink planted in the store must not lead out of it.
    outside = env.tmp / "secret.txt"
    outside.write_bytes(b"secret")
    link = store.root / f"image/targets/models/digits/{'0' * 64}.leak.eotb"
    link.symlink_to(outside)
    with pytest.raises(RepoFileNotFoundError):
        store.target_file_for_request(f"models/digits/{'0' * 64}.leak.eotb")


def test_unknown_role_or_repository_is_a_caller_error(env: Env) -> None:
    with pytest.raises(ValueError):
        env.store.write_metadata("image", "../root", 1, b"{}")
    with pytest.raises(ValueError):
        env.store.read_metadata("director", "targets")
    with pytest.raises(RepoFileNotFoundError):
        env.store.read_metadata("image", "root", 42)
    assert env.store.latest_version("image", "bins-0") == 1
    assert isinstance(env.repo.current("bins-0").signed, Targets)
