"""The director repository: what each device should run now, signed online per device.

Uptane's director is a TUF repository whose targets differ per device. Here
every device has its own targets, snapshot and timestamp under
``director/devices/{device}/metadata/``, all three signed by ONE online
director key, and all devices share one root (offline root keys) that assigns
that key to the three roles. A device's director target names a bundle with the
same path, length and hashes as the image repository, plus the director's
``custom`` (device id, hardware id, release counter, wrapped content key).

A stolen director key lets an attacker choose among bundles the release
managers signed -- the agent installs only what both repositories agree on --
but not add a bundle, which is why this key may live on the server.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

from securesystemslib.signer import Key, Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp

from edgeota.protocol.errors import ProtocolError
from edgeota.protocol.identity import validate_device_id
from edgeota.protocol.targets_custom import DirectorTargetCustom
from edgeota.server.repo.image import (
    AlreadyInitialisedError,
    ExpiryPolicy,
    NotInitialisedError,
    UntrustedSignerError,
    _rotate_root,
    _utc,
    next_version,
    sign,
    sign_root,
    utc_now,
)
from edgeota.server.repo.storage import (
    DIRECTOR,
    RepoError,
    RepoFileNotFoundError,
    RepoStore,
    validate_target_path,
)

__all__ = [
    "DIRECTOR_ROLES",
    "AssignmentError",
    "DirectorRepository",
    "UnknownDeviceError",
]

logger = logging.getLogger(__name__)

DIRECTOR_ROLES = ("targets", "snapshot", "timestamp")
_HASH_ALGORITHMS = ["sha256"]


class AssignmentError(RepoError):
    """A target set that cannot be assigned to that device (wrong path, custom or device id)."""


class UnknownDeviceError(RepoError):
    """A device that has no director metadata yet (see ``ensure_device``)."""


def _device_repo(device_id: str) -> str:
    return f"{DIRECTOR}/{validate_device_id(device_id)}"


class DirectorRepository:
    """The server's director: holds the online director signer; all state is in the store."""

    def __init__(
        self,
        store: RepoStore,
        *,
        online_signer: Signer,
        expiry: ExpiryPolicy | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._store = store
        self._signer = online_signer
        self._expiry = expiry or ExpiryPolicy()
        # Read at every signing: public, so a server whose clock is set (tests, the
        # simulator) moves its repositories with it (ServerContext.set_clock).
        self.clock = clock
        # (version, parsed root): root files never change once written, so a
        # parsed version stays valid; which version is current is listed anew
        # on every use (another replica may have rotated it).
        self._root_cache: tuple[int, Metadata[Root]] | None = None
        self._trusted_signer(self._root().signed)

    @classmethod
    def initialise(
        cls,
        store: RepoStore,
        *,
        root_signers: Sequence[Signer],
        root_threshold: int,
        online_public_key: Key,
        online_signer: Signer,
        expiry: ExpiryPolicy | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> DirectorRepository:
        """Write the shared director root v1 (on the operator's machine).

        Raises:
            AlreadyInitialisedError: the store already holds a director root.
            ValueError: impossible threshold, or the signer is not ``online_public_key``.
            UnsignedRootError: the root signers do not meet the threshold.
        """
        expiry = expiry or ExpiryPolicy()
        keyids = [s.public_key.keyid for s in root_signers]
        if len(set(keyids)) != len(keyids) or not 1 <= root_threshold <= len(keyids):
            raise ValueError(
                f"root threshold {root_threshold} must be between 1 and the "
                f"{len(set(keyids))} distinct root keys"
            )
        if online_signer.public_key.keyid != online_public_key.keyid:
            raise ValueError("online_signer does not hold online_public_key")
        if store.latest_version(DIRECTOR, "root") is not None:
            raise AlreadyInitialisedError(f"{store.root} already holds a director root")
        now = _utc(clock())
        root = Root(version=1, expires=now + expiry.root, consistent_snapshot=True)
        for signer in root_signers:
            root.add_key(signer.public_key, "root")
        root.roles["root"].threshold = root_threshold
        for role in DIRECTOR_ROLES:
            root.add_key(online_public_key, role)
        root_md = Metadata(root)
        sign_root(root_md, None, root_signers)
        with store.lock(DIRECTOR):
            store.write_metadata(DIRECTOR, "root", 1, root_md.to_bytes())
        return cls(store, online_signer=online_signer, expiry=expiry, clock=clock)

    # -- reading -----------------------------------------------------------

    def root_bytes(self, version: int | None = None) -> bytes:
        """The shared director root as stored (the agent's bootstrap root for the director)."""
        return self._store.read_metadata(DIRECTOR, "root", version)

    def _root(self) -> Metadata[Root]:
        """The current shared root: one listing of the small root folder, parsed once per version.

        Writers call this inside the device lock, so a root rotated by another
        replica is seen (see ``rotate_online_key``); only the parsing is cached.
        Callers must not modify the returned object.
        """
        version = self._store.latest_version(DIRECTOR, "root")
        if version is None:
            raise NotInitialisedError(
                f"{self._store.root} holds no director repository (run edgeota init)"
            )
        cached = self._root_cache
        if cached is not None and cached[0] == version:
            return cached[1]
        try:
            root: Metadata[Root] = Metadata.from_bytes(
                self._store.read_metadata(DIRECTOR, "root", version))
        except RepoFileNotFoundError as e:
            raise NotInitialisedError(
                f"{self._store.root} holds no director repository (run edgeota init)"
            ) from e
        self._root_cache = (version, root)
        return root

    def current_targets(self, device_id: str) -> Metadata[Targets]:
        """The device's current director targets metadata.

        Raises:
            UnknownDeviceError: the device has no director metadata.
        """
        repo = _device_repo(device_id)
        try:
            return Metadata.from_bytes(self._store.read_metadata(repo, "targets"))
        except RepoFileNotFoundError as e:
            raise UnknownDeviceError(f"device {device_id!r} has no director metadata") from e

    def _now(self) -> datetime:
        return _utc(self.clock())

    def _trusted_signer(self, root: Root) -> Signer:
        for role in DIRECTOR_ROLES:
            if self._signer.public_key.keyid not in root.roles[role].keyids:
                raise UntrustedSignerError(
                    f"the director signer's key {self._signer.public_key.keyid[:16]}... is not "
                    f"the {role} key of director root v{root.version}"
                )
        return self._signer

    # -- devices -------------------------------------------------------------

    def ensure_device(self, device_id: str) -> bool:
        """Create the device's targets, snapshot and timestamp v1 (no targets) if missing.

        Idempotent, and completes a device whose creation was interrupted.
        Returns True if anything was written.
        """
        repo = _device_repo(device_id)
        with self._store.lock(repo):
            _, wrote = self._ensure(repo, self._now(),
                                    [self._trusted_signer(self._root().signed)])
            return wrote

    def _ensure(self, repo: str, now: datetime,
                signers: Sequence[Signer]) -> tuple[dict[str, int], bool]:
        """Complete the device's metadata if anything is missing.

        Returns the highest stored version of each role and whether anything
        was written. One folder listing when nothing is missing (the usual
        case); the versions are what the caller's next writes build on.
        """
        versions = self._store.latest_versions(repo)
        wrote = False
        if "targets" not in versions:
            targets = Metadata(Targets(version=1, expires=now + self._expiry.director_targets))
            self._sign_write(repo, targets, signers)
            versions["targets"] = 1
            wrote = True
        snapshot_bytes = None
        if "snapshot" not in versions:
            snapshot_bytes = self._write_snapshot(repo, now, signers, versions)
            wrote = True
        if wrote or "timestamp" not in versions:
            self._write_timestamp(repo, now, signers, versions, snapshot_bytes)
            wrote = True
        return versions, wrote

    def assign(self, device_id: str, targets: Mapping[str, TargetFile],
               current: Metadata[Targets] | None = None) -> int:
        """Make ``targets`` exactly the device's director targets; return the targets version.

        Each ``TargetFile`` carries the director ``custom`` for this device.
        An assignment equal to the current one writes nothing. ``current`` is
        the device's targets metadata as the caller last read it: used (not
        read and parsed again) if it is still the newest stored version.

        Safe to call for different devices from several threads at once: each
        device's files are its own, written under its own lock.

        Raises:
            AssignmentError: a key that is not its target's path, an
                unservable path, a custom that does not parse or names another device.
        """
        wanted = self._checked(device_id, targets)  # before anything is written
        return self._assign(device_id, lambda _current: wanted, current, check=False)

    def assign_with(
        self,
        device_id: str,
        change: Callable[[Mapping[str, TargetFile]], Mapping[str, TargetFile]],
        current: Metadata[Targets] | None = None,
    ) -> int:
        """Like :meth:`assign`, with the new targets computed from the current ones.

        ``change`` gets the device's current targets, read under the device
        lock, and returns the complete new set: a read-modify-write that cannot
        lose a concurrent change to another model's target. If the device has
        no director metadata yet it is created first (as ``ensure_device``).

        Raises:
            AssignmentError: as :meth:`assign`, for what ``change`` returns.
        """
        return self._assign(device_id, change, current, check=True)

    def _assign(
        self,
        device_id: str,
        change: Callable[[Mapping[str, TargetFile]], Mapping[str, TargetFile]],
        current: Metadata[Targets] | None,
        *,
        check: bool,
    ) -> int:
        repo = _device_repo(device_id)
        with self._store.lock(repo):
            now = self._now()
            signers = [self._trusted_signer(self._root().signed)]
            versions, _ = self._ensure(repo, now, signers)
            if current is None or current.signed.version != versions["targets"]:
                current = Metadata.from_bytes(
                    self._store.read_metadata(repo, "targets", versions["targets"]))
            changed = change(current.signed.targets)
            wanted = self._checked(device_id, changed) if check else dict(changed)
            if current.signed.targets == wanted:
                return current.signed.version
            new = next_version(current, expires=now + self._expiry.director_targets)
            new.signed.targets = wanted
            for signer in signers:
                sign(new, signer)
            versions["targets"] = new.signed.version
            snapshot_version, snapshot_bytes = self._new_snapshot(repo, now, signers, versions)
            versions["snapshot"] = snapshot_version
            timestamp_version, timestamp_bytes = self._new_timestamp(
                repo, now, signers, versions, snapshot_bytes)
            # One set: the three files, one folder sync, then the timestamp pointer.
            self._store.write_metadata_set(repo, [
                ("targets", new.signed.version, new.to_bytes()),
                ("snapshot", snapshot_version, snapshot_bytes),
                ("timestamp", timestamp_version, timestamp_bytes),
            ])
            logger.info("assigned %d targets to %s (targets v%d)", len(wanted), device_id,
                        new.signed.version,
                        extra={"device_id": device_id, "targets_version": new.signed.version})
            return new.signed.version

    @staticmethod
    def _checked(device_id: str, targets: Mapping[str, TargetFile]) -> dict[str, TargetFile]:
        """A private copy of ``targets`` after checking each belongs to ``device_id``."""
        wanted = {path: copy.deepcopy(target) for path, target in targets.items()}
        for path, target in wanted.items():
            if target.path != path:
                raise AssignmentError(f"target {target.path!r} is filed under {path!r}")
            try:
                validate_target_path(path)
                custom = DirectorTargetCustom.from_custom(target.custom, f"director target {path}")
            except (ValueError, ProtocolError) as e:
                raise AssignmentError(f"{device_id}: {e}") from e
            if custom.device_id != device_id:
                raise AssignmentError(
                    f"target {path} carries the custom of device {custom.device_id!r}, "
                    f"not {device_id!r}"
                )
        return wanted

    def refresh(self, device_id: str, now: datetime | None = None) -> list[str]:
        """Re-sign the device's roles that are within the margin of expiry; return them.

        Raises:
            UnknownDeviceError: the device has no director metadata.
        """
        repo = _device_repo(device_id)
        if self._store.latest_version(repo, "targets") is None:
            # Checked before locking: the lock would create the device's folder.
            raise UnknownDeviceError(f"device {device_id!r} has no director metadata")
        with self._store.lock(repo):
            now = _utc(now) if now is not None else self._now()
            return self._refresh(repo, now, [self._trusted_signer(self._root().signed)])

    def _refresh(
        self, repo: str, now: datetime, signers: Sequence[Signer], force: bool = False
    ) -> list[str]:
        versions = self._store.latest_versions(repo)
        try:
            targets: Metadata[Targets] = Metadata.from_bytes(
                self._store.read_metadata(repo, "targets", versions["targets"]))
            snapshot: Metadata[Snapshot] = Metadata.from_bytes(
                self._store.read_metadata(repo, "snapshot", versions["snapshot"]))
            timestamp: Metadata[Timestamp] = Metadata.from_bytes(
                self._store.read_metadata(repo, "timestamp"))
        except (KeyError, RepoFileNotFoundError) as e:
            raise UnknownDeviceError(f"{repo} has no complete director metadata") from e
        due = self._expiry.due
        policy = self._expiry
        resigned: list[str] = []
        if force or due(targets.signed.expires, policy.director_targets, now):
            new = next_version(targets, expires=now + policy.director_targets)
            self._sign_write(repo, new, signers)
            versions["targets"] = new.signed.version
            resigned.append("targets")
        snapshot_bytes = None
        if resigned or due(snapshot.signed.expires, policy.director_snapshot, now):
            snapshot_bytes = self._write_snapshot(repo, now, signers, versions)
            resigned.append("snapshot")
        if resigned or due(timestamp.signed.expires, policy.director_timestamp, now):
            self._write_timestamp(repo, now, signers, versions, snapshot_bytes)
            resigned.append("timestamp")
        return resigned

    def refresh_all(self, now: datetime | None = None) -> int:
        """Refresh every device; return how many had anything re-signed."""
        count = 0
        for device_id in self._store.devices():
            try:
                if self.refresh(device_id, now):
                    count += 1
            except UnknownDeviceError:
                logger.warning("skipping %s: incomplete director metadata", device_id)
        return count

    def rotate_online_key(
        self, new_public_key: Key, new_signer: Signer, root_signers: Sequence[Signer]
    ) -> int:
        """Replace the director's online key in a new shared root; return its version.

        Every device's targets, snapshot and timestamp are first re-signed
        (new versions) with the old and the new key, then the new root is
        written: a device that refreshes at any moment finds metadata its root
        trusts. From then on this object signs with ``new_signer``.

        Raises:
            ValueError: ``new_signer`` does not hold ``new_public_key``.
            UnsignedRootError: ``root_signers`` do not meet the root threshold.
        """
        if new_signer.public_key.keyid != new_public_key.keyid:
            raise ValueError("new_signer does not hold new_public_key")
        with self._store.lock(DIRECTOR):
            now = self._now()
            old_root = self._root()
            new_root = next_version(old_root, expires=now + self._expiry.root)
            for role in DIRECTOR_ROLES:
                for keyid in list(new_root.signed.roles[role].keyids):
                    new_root.signed.revoke_key(keyid, role)
                new_root.signed.add_key(new_public_key, role)
            sign_root(new_root, old_root.signed, root_signers)
            both = [self._trusted_signer(old_root.signed), new_signer]
            for device_id in self._store.devices():
                repo = _device_repo(device_id)
                with self._store.lock(repo):
                    self._ensure(repo, now, both)
                    self._refresh(repo, now, both, force=True)
            self._store.write_metadata(DIRECTOR, "root", new_root.signed.version,
                                       new_root.to_bytes())
            self._signer = new_signer
            # A replica may have signed a device with the old key alone between
            # the first pass and the new root; every writer holds the device
            # lock from reading root to writing, so this pass sees its result.
            for device_id in self._store.devices():
                repo = _device_repo(device_id)
                with self._store.lock(repo):
                    if not self._trusted_by(new_root.signed, repo):
                        self._ensure(repo, now, [new_signer])
                        self._refresh(repo, now, [new_signer], force=True)
            logger.info("rotated the director key in root v%d", new_root.signed.version)
            return new_root.signed.version

    def _trusted_by(self, root: Root, repo: str) -> bool:
        """Whether the device's current targets, snapshot and timestamp verify under ``root``."""
        for role in DIRECTOR_ROLES:
            try:
                md = Metadata.from_bytes(self._store.read_metadata(repo, role))
                root.verify_delegate(role, md.signed_bytes, md.signatures)
            except (RepoFileNotFoundError, UnsignedMetadataError):
                return False
        return True

    def rotate_root(
        self,
        new_root_keys: Sequence[Key],
        new_signers: Sequence[Signer],
        old_signers: Sequence[Signer],
        threshold: int,
    ) -> int:
        """Replace the director root keys (signed by the old and new thresholds)."""
        with self._store.lock(DIRECTOR):
            return _rotate_root(
                self._store, DIRECTOR, self._root(), new_root_keys, new_signers, old_signers,
                threshold, self._now() + self._expiry.root,
            )

    # -- writing (caller holds the device lock) ---------------------------------

    def _sign_write(self, repo: str, md: Metadata[Targets], signers: Sequence[Signer]) -> None:
        for signer in signers:
            sign(md, signer)
        self._store.write_metadata(repo, "targets", md.signed.version, md.to_bytes())

    def _new_snapshot(self, repo: str, now: datetime, signers: Sequence[Signer],
                      versions: dict[str, int]) -> tuple[int, bytes]:
        """The next snapshot, naming ``versions["targets"]``, signed: (version, bytes)."""
        targets_version = versions.get("targets")
        if targets_version is None:
            raise UnknownDeviceError(f"{repo} has no targets")
        version = versions.get("snapshot", 0) + 1
        snapshot = Metadata(
            Snapshot(
                version=version,
                expires=now + self._expiry.director_snapshot,
                meta={"targets.json": MetaFile(targets_version)},
            )
        )
        for signer in signers:
            sign(snapshot, signer)
        return version, snapshot.to_bytes()

    def _new_timestamp(self, repo: str, now: datetime, signers: Sequence[Signer],
                       versions: dict[str, int], snapshot_bytes: bytes | None) -> tuple[int, bytes]:
        """The next timestamp, naming ``versions["snapshot"]``, signed: (version, bytes).

        ``snapshot_bytes`` is that snapshot if the caller has it (None: read it).
        """
        snapshot_version = versions.get("snapshot")
        if snapshot_version is None:
            raise UnknownDeviceError(f"{repo} has no snapshot")
        if snapshot_bytes is None:
            snapshot_bytes = self._store.read_metadata(repo, "snapshot", snapshot_version)
        version = versions.get("timestamp", 0) + 1
        timestamp = Metadata(
            Timestamp(
                version=version,
                expires=now + self._expiry.director_timestamp,
                snapshot_meta=MetaFile.from_data(snapshot_version, snapshot_bytes,
                                                 _HASH_ALGORITHMS),
            )
        )
        for signer in signers:
            sign(timestamp, signer)
        return version, timestamp.to_bytes()

    def _write_snapshot(self, repo: str, now: datetime, signers: Sequence[Signer],
                        versions: dict[str, int]) -> bytes:
        """Write the next snapshot, naming ``versions["targets"]``; return its bytes.

        ``versions`` holds the highest stored version of each role, as listed
        under the device lock and updated by the caller's writes since; it is
        updated with the new snapshot version.
        """
        version, data = self._new_snapshot(repo, now, signers, versions)
        self._store.write_metadata(repo, "snapshot", version, data)
        versions["snapshot"] = version
        return data

    def _write_timestamp(self, repo: str, now: datetime, signers: Sequence[Signer],
                         versions: dict[str, int], snapshot_bytes: bytes | None) -> None:
        """Write the next timestamp, naming the highest stored snapshot (never an older one)."""
        version, data = self._new_timestamp(repo, now, signers, versions, snapshot_bytes)
        self._store.write_metadata(repo, "timestamp", version, data)
        versions["timestamp"] = version
