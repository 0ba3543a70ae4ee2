"""The image repository: which bundles exist and are valid, as the release managers signed them.

Roles and who holds their keys (DESIGN.md, "Trust model"):

* ``root`` -- offline, k-of-n root keys;
* ``targets`` -- the release keys, k-of-n, **never held by the server**. It
  holds no targets itself; it delegates every path to 2**bit_length succinct
  hash bins (TAP 15, ``bins-00`` .. ``bins-3f`` by default) signed with the
  same release keys and threshold, so a device fetches one small bin, not a
  list of every model ever released;
* ``snapshot`` and ``timestamp`` -- online, held by the server.

The split of work follows from that: the operator's machine builds and signs a
new bin version with the pure functions here (:func:`bin_for`,
:func:`add_target_to_bin`, :func:`sign`, :func:`merge_signatures` for "two
people must sign"), the server checks it (:meth:`ImageRepository.check_bin_update`)
and publishes it with new snapshot and timestamp versions
(:meth:`ImageRepository.publish_bin`). The server's own keys can therefore
freeze or replay the repository at worst, never add a target a device accepts.

Consistent snapshots are on: every metadata version is an immutable file and
target files are stored under their hash (see :mod:`.storage`), so replicas
sharing the blob store need no coordination beyond the store's lock.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from securesystemslib.signer import Key, Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    SuccinctRoles,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError

from edgeota.server.repo.storage import (
    BIN_PREFIX,
    IMAGE,
    RepoError,
    RepoFileNotFoundError,
    RepoStore,
    TargetConflictError,
    validate_target_path,
)

__all__ = [
    "ONLINE_ROLES",
    "AlreadyInitialisedError",
    "BinCheck",
    "BinContentError",
    "ExpiryPolicy",
    "ImageRepository",
    "NotInitialisedError",
    "SignatureMergeError",
    "SignatureThresholdError",
    "SigningError",
    "StaleMetadataError",
    "TargetExistsError",
    "UnsignedBinError",
    "UnsignedRootError",
    "UntrustedSignerError",
    "add_target_to_bin",
    "bin_for",
    "merge_signatures",
    "next_version",
    "sign",
    "sign_root",
    "utc_now",
]

logger = logging.getLogger(__name__)

ONLINE_ROLES = ("snapshot", "timestamp")
# 2**14 bins keep snapshot.json near 0.5 MB, a quarter of ngclient's 2 MB limit.
_MAX_BIN_BITS = 14
# Every device loads and verifies snapshot.json, which lists every bin (~30 bytes
# each), twice per update (its cached copy and the new one); it fetches one bin,
# which holds releases/bins targets. 64 bins keep both small up to a few thousand
# releases: a 2 KB snapshot instead of 8 KB with 256, checked by ngclient in 0.27
# instead of 0.82 ms (measured). A repository's bin count is fixed at init.
DEFAULT_BIN_BITS = 6
_HASH_ALGORITHMS = ["sha256"]

# Metadata's own type variable is constrained to the four roles, not bound to
# Signed, so a function generic over "any role's metadata" must say the same.
_S = TypeVar("_S", Root, Timestamp, Snapshot, Targets)


# -- errors ------------------------------------------------------------------


class SignatureThresholdError(RepoError):
    """Metadata without the threshold of valid signatures its delegator requires."""


class UnsignedBinError(SignatureThresholdError):
    """A bin update not (or not fully) signed by the release keys, or with a broken signature."""


class UnsignedRootError(SignatureThresholdError):
    """A new root not signed by the thresholds of both the previous and the new root."""


class StaleMetadataError(RepoError):
    """A bin built from an older version than the current one: prepare it again from the current."""

    def __init__(self, role: str, got: int, expected: int) -> None:
        super().__init__(
            f"{role} v{got} is stale: the current version is v{expected - 1}, so the update "
            f"must be v{expected}; prepare it again from the current {role}"
        )
        self.role = role
        self.got = got
        self.expected = expected


class BinContentError(RepoError):
    """A bin update whose content is not a pure addition of servable targets in that bin."""


class TargetExistsError(RepoError):
    """A target path that is already released with other content: target paths are immutable."""


class SignatureMergeError(RepoError):
    """Signatures over different payloads cannot be merged: both must sign the same bytes."""


class SigningError(RepoError):
    """A signer failed to produce a signature (KMS/HSM unavailable, wrong PIN, ...)."""


class UntrustedSignerError(RepoError):
    """A signer whose key the current root does not assign to the role it is asked to sign."""


class NotInitialisedError(RepoError):
    """The store holds no such repository yet (``edgeota init`` creates it)."""


class AlreadyInitialisedError(RepoError):
    """The store already holds that repository; initialising again would fork its history."""


# -- time --------------------------------------------------------------------


def utc_now() -> datetime:
    """The default clock: the current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


def _utc(moment: datetime) -> datetime:
    # TUF writes expiry as UTC "Z" times; a naive datetime could be anything.
    if moment.tzinfo is None:
        raise ValueError(f"clock returned a naive datetime {moment!r}: use timezone-aware UTC")
    return moment.astimezone(UTC)


@dataclass(frozen=True)
class ExpiryPolicy:
    """How long each role's metadata stays valid, and when the server re-signs it.

    Online metadata is re-signed by :meth:`ImageRepository.refresh` (and the
    director's) once less than ``refresh_margin`` of its period is left, so a
    device whose clock runs a little fast, or that refreshes just before a
    renewal, still finds valid metadata.
    """

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=365)
    bins: timedelta = timedelta(days=365)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)
    director_targets: timedelta = timedelta(days=30)
    director_snapshot: timedelta = timedelta(days=7)
    director_timestamp: timedelta = timedelta(days=1)
    refresh_margin: float = 0.5  # fraction of the period

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, timedelta) and value <= timedelta(0):
                raise ValueError(f"expiry {f.name} must be positive, got {value}")
        if not 0 < self.refresh_margin < 1:
            raise ValueError(f"refresh_margin must be in (0, 1), got {self.refresh_margin}")

    def due(self, expires: datetime, period: timedelta, now: datetime) -> bool:
        """True when metadata expiring at ``expires`` has less than the margin of ``period``."""
        return expires - _utc(now) < period * self.refresh_margin


# -- pure functions for the operator's machine ---------------------------------


def next_version(md: Metadata[_S], *, expires: datetime) -> Metadata[_S]:
    """A copy of ``md`` with version + 1, new expiry and no signatures, ready to edit and sign.

    ``md`` itself is never changed: callers keep the current version to diff against.
    """
    new: Metadata[_S] = copy.deepcopy(md)
    new.signed.version += 1
    new.signed.expires = _utc(expires)
    new.signatures.clear()
    return new


def bin_for(targets_md: Metadata[Targets], target_path: str) -> str:
    """The name of the hash bin responsible for ``target_path`` (e.g. ``bins-3a``).

    Raises:
        BinContentError: ``targets_md`` does not delegate to succinct hash bins.
    """
    return _succinct(targets_md.signed).get_role_for_target(target_path)


def add_target_to_bin(
    bin_md: Metadata[Targets], target_path: str, target: TargetFile, *, expires: datetime
) -> Metadata[Targets]:
    """The next version of ``bin_md`` with ``target`` added, unsigned.

    Adding a target that is already there with identical length, hashes and
    ``custom`` yields a plain new version (a re-sign); anything else at an
    existing path is refused, because devices may have installed what it named.

    Raises:
        ValueError: ``target.path`` is not ``target_path`` or the path is not servable.
        TargetExistsError: ``target_path`` is released with other content.
    """
    if target.path != target_path:
        raise ValueError(f"target.path {target.path!r} differs from target_path {target_path!r}")
    validate_target_path(target_path)
    existing = bin_md.signed.targets.get(target_path)
    if existing is not None and existing != target:
        raise TargetExistsError(
            f"{target_path} is already released with sha256 "
            f"{existing.hashes.get('sha256')} ({existing.length} bytes); release a new version "
            "instead of replacing it"
        )
    new = next_version(bin_md, expires=expires)
    new.signed.targets[target_path] = copy.deepcopy(target)
    return new


def sign(md: Metadata[Any], signer: Signer) -> None:
    """Add ``signer``'s signature to ``md``, keeping the others (k-of-n signing).

    Raises:
        SigningError: the signer failed.
    """
    try:
        md.sign(signer, append=True)
    except UnsignedMetadataError as e:
        raise SigningError(f"signing {md.signed.type} v{md.signed.version} failed: {e}") from e


def merge_signatures(a: bytes, b: bytes) -> bytes:
    """Combine the signatures of two copies of the same metadata (two release managers).

    ``a``'s signatures win where both carry one for the same key (ECDSA
    signatures of one key over one payload differ but are equally valid).

    Raises:
        SignatureMergeError: the two do not sign the same payload, or do not parse.
    """
    first, second = _parse(a, "first metadata", SignatureMergeError), _parse(
        b, "second metadata", SignatureMergeError
    )
    if first.signed_bytes != second.signed_bytes:
        raise SignatureMergeError(
            f"cannot merge signatures of {first.signed.type} v{first.signed.version} and "
            f"{second.signed.type} v{second.signed.version}: the signed contents differ; "
            "both signers must sign the same prepared file"
        )
    for keyid, signature in second.signatures.items():
        first.signatures.setdefault(keyid, signature)
    return first.to_bytes()


def _parse(data: bytes, what: str, error: type[RepoError]) -> Metadata[Any]:
    try:
        return Metadata.from_bytes(data)
    except DeserializationError as e:
        raise error(f"{what} is not TUF metadata: {e}") from e


def _succinct(targets: Targets) -> SuccinctRoles:
    if targets.delegations is None or targets.delegations.succinct_roles is None:
        raise BinContentError("targets metadata does not delegate to succinct hash bins")
    return targets.delegations.succinct_roles


def _sign_all(md: Metadata[Any], signers: Iterable[Signer]) -> None:
    for signer in signers:
        sign(md, signer)


def _check_thresholds(signers: Sequence[Signer], threshold: int, what: str) -> None:
    keyids = [s.public_key.keyid for s in signers]
    if len(set(keyids)) != len(keyids):
        raise ValueError(f"{what} keys must be distinct")
    if not 1 <= threshold <= len(keyids):
        raise ValueError(f"{what} threshold {threshold} must be between 1 and {len(keyids)}")


def sign_root(new_root: Metadata[Root], previous: Root | None, signers: Iterable[Signer]) -> None:
    """Sign ``new_root`` and check it meets the thresholds of ``previous`` and of itself.

    TUF clients accept root N+1 only when both root N's and root N+1's
    thresholds sign it; checking here means a root that no client would
    accept is never written.

    Raises:
        UnsignedRootError: a threshold is not met.
    """
    _sign_all(new_root, signers)
    result = new_root.signed.get_root_verification_result(
        previous, new_root.signed_bytes, new_root.signatures
    )
    if not result:
        prior = previous.version if previous is not None else new_root.signed.version
        raise UnsignedRootError(
            f"root v{new_root.signed.version} has {len(result.first.signed)}/"
            f"{result.first.threshold} signatures of root v{prior}'s keys and "
            f"{len(result.second.signed)}/{result.second.threshold} of its own keys"
        )


def _require_trusted(root: Root, role: str, signer: Signer) -> None:
    if signer.public_key.keyid not in root.roles[role].keyids:
        raise UntrustedSignerError(
            f"the {role} signer's key {signer.public_key.keyid[:16]}... is not the {role} key of "
            f"root v{root.version}: the key was rotated or the server is misconfigured"
        )


def _same_key(public_key: Key, signer: Signer) -> None:
    if signer.public_key.keyid != public_key.keyid:
        raise ValueError(
            f"the new signer's key {signer.public_key.keyid[:16]}... is not the new public key "
            f"{public_key.keyid[:16]}..."
        )


# -- the server side -----------------------------------------------------------


@dataclass(frozen=True)
class BinCheck:
    """What a proposed bin version would change, and whether enough release managers signed it."""

    role: str
    version: int
    valid_keyids: frozenset[str]
    threshold: int
    complete: bool
    added_targets: dict[str, TargetFile]

    @property
    def missing_signatures(self) -> int:
        return max(0, self.threshold - len(self.valid_keyids))


class ImageRepository:
    """The server's view of the image repository: it holds the online signers and nothing more.

    Every public method re-reads the store, so replicas sharing it stay
    consistent; writes happen under the store's lock.
    """

    def __init__(
        self,
        store: RepoStore,
        *,
        snapshot_signer: Signer,
        timestamp_signer: Signer,
        expiry: ExpiryPolicy | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._store = store
        self._expiry = expiry or ExpiryPolicy()
        # Read at every signing: public, so a server whose clock is set (tests, the
        # simulator) moves its repositories with it (ServerContext.set_clock).
        self.clock = clock
        self._signers: dict[str, Signer] = {
            "snapshot": snapshot_signer,
            "timestamp": timestamp_signer,
        }
        root = self._root().signed
        for role, signer in self._signers.items():
            _require_trusted(root, role, signer)

    @classmethod
    def initialise(
        cls,
        store: RepoStore,
        *,
        root_signers: Sequence[Signer],
        root_threshold: int,
        release_signers: Sequence[Signer],
        release_threshold: int,
        snapshot_signer: Signer,
        timestamp_signer: Signer,
        bin_bits: int = DEFAULT_BIN_BITS,
        expiry: ExpiryPolicy | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> ImageRepository:
        """Create version 1 of every role in an empty store (on the operator's machine).

        Every root and release key is named by its signer, and every signer
        signs: root and targets/bins v1 carry all signatures, not only a threshold.

        Raises:
            AlreadyInitialisedError: the store already holds image metadata.
            ValueError: impossible thresholds or bin size.
            UnsignedRootError, SigningError: a signer does not work.
        """
        expiry = expiry or ExpiryPolicy()
        _check_thresholds(root_signers, root_threshold, "root")
        _check_thresholds(release_signers, release_threshold, "release")
        if not 1 <= bin_bits <= _MAX_BIN_BITS:
            raise ValueError(f"bin_bits must be between 1 and {_MAX_BIN_BITS}, got {bin_bits}")
        if store.latest_versions(IMAGE):
            raise AlreadyInitialisedError(f"{store.root} already holds an image repository")
        now = _utc(clock())

        root = Root(version=1, expires=now + expiry.root, consistent_snapshot=True)
        for signer in root_signers:
            root.add_key(signer.public_key, "root")
        root.roles["root"].threshold = root_threshold
        for signer in release_signers:
            root.add_key(signer.public_key, "targets")
        root.roles["targets"].threshold = release_threshold
        root.add_key(snapshot_signer.public_key, "snapshot")
        root.add_key(timestamp_signer.public_key, "timestamp")
        root_md = Metadata(root)
        sign_root(root_md, None, root_signers)

        release_keys = {s.public_key.keyid: s.public_key for s in release_signers}
        succinct = SuccinctRoles(list(release_keys), release_threshold, bin_bits, BIN_PREFIX)
        targets_md = Metadata(
            Targets(
                version=1,
                expires=now + expiry.targets,
                delegations=Delegations(keys=release_keys, succinct_roles=succinct),
            )
        )
        _sign_all(targets_md, release_signers)
        _verify(root, "targets", targets_md)

        store.write_metadata(IMAGE, "root", 1, root_md.to_bytes())
        store.write_metadata(IMAGE, "targets", 1, targets_md.to_bytes())
        meta = {"targets.json": MetaFile(1)}
        for name in succinct.get_roles():
            bin_md = Metadata(Targets(version=1, expires=now + expiry.bins))
            _sign_all(bin_md, release_signers)
            _verify(targets_md.signed, name, bin_md)
            store.write_metadata(IMAGE, name, 1, bin_md.to_bytes())
            meta[f"{name}.json"] = MetaFile(1)

        repo = cls(
            store,
            snapshot_signer=snapshot_signer,
            timestamp_signer=timestamp_signer,
            expiry=expiry,
            clock=clock,
        )
        with store.lock(IMAGE):
            snapshot_md = Metadata(Snapshot(version=1, expires=now + expiry.snapshot, meta=meta))
            repo._write_snapshot_and_timestamp(snapshot_md, now)
        return repo

    # -- reading -----------------------------------------------------------

    def current(self, role: str) -> Metadata[Any]:
        """The current metadata of ``role``: the timestamp pointer, else the highest version."""
        return Metadata.from_bytes(self._store.read_metadata(IMAGE, role))

    def root_bytes(self, version: int | None = None) -> bytes:
        """Root metadata as stored (for embedding in agents as their bootstrap root)."""
        return self._store.read_metadata(IMAGE, "root", version)

    def _root(self) -> Metadata[Root]:
        try:
            return self.current("root")
        except RepoFileNotFoundError as e:
            raise NotInitialisedError(
                f"{self._store.root} holds no image repository (run edgeota init)"
            ) from e

    def _now(self) -> datetime:
        return _utc(self.clock())

    # -- bins from release managers -------------------------------------------

    def check_bin_update(self, bin_bytes: bytes, *, role: str | None = None) -> BinCheck:
        """Check a proposed bin version and report how far it is signed; writes nothing.

        ``role`` names the bin; it may be left out when the bin holds targets,
        which say which bin they belong to.

        Raises:
            BinContentError: not a bin, targets of another bin, removed or
                changed targets, unservable paths, already expired.
            UnsignedBinError: no valid release signature at all, or a broken one.
            StaleMetadataError: not exactly the current version + 1.
        """
        md = _parse(bin_bytes, "bin update", BinContentError)
        return self._check_bin(md, role, self._now())

    def publish_bin(self, bin_bytes: bytes, *, role: str | None = None) -> int:
        """Publish a fully signed bin version with new snapshot and timestamp versions.

        Every added target's file must already be in the store
        (:meth:`RepoStore.put_target`) with the length and sha256 the bin names.
        Returns the new timestamp version.

        Raises:
            UnsignedBinError: fewer valid release signatures than the threshold
                (nothing is written).
            BinContentError, StaleMetadataError: see :meth:`check_bin_update`;
                also a target file missing from the store.
        """
        md = _parse(bin_bytes, "bin update", BinContentError)
        with self._store.lock(IMAGE):
            now = self._now()
            check = self._check_bin(md, role, now)
            if not check.complete:
                raise UnsignedBinError(
                    f"{check.role} v{check.version} has {len(check.valid_keyids)} of the "
                    f"{check.threshold} release signatures it needs; merge more signatures first"
                )
            for target in check.added_targets.values():
                try:
                    self._store.check_target(target)
                except (RepoFileNotFoundError, TargetConflictError) as e:
                    raise BinContentError(f"{check.role} v{check.version}: {e}") from e
            self._store.write_metadata(IMAGE, check.role, check.version, md.to_bytes())
            logger.info("published %s v%d (%d new targets)", check.role, check.version,
                        len(check.added_targets))
            return self._new_snapshot_and_timestamp(now, {f"{check.role}.json": check.version})

    def _check_bin(self, md: Metadata[Any], role: str | None, now: datetime) -> BinCheck:
        new = md.signed
        if not isinstance(new, Targets):
            raise BinContentError(f"a bin update must be targets metadata, got {new.type}")
        targets = self.current("targets").signed
        succinct = _succinct(targets)
        owners = {succinct.get_role_for_target(path) for path in new.targets}
        if role is None:
            if len(owners) != 1:
                raise BinContentError(
                    "cannot tell which bin this is: name the bin"
                    if not owners else f"targets of several bins in one update: {sorted(owners)}"
                )
            role = owners.pop()
        elif not succinct.is_delegated_role(role):
            raise BinContentError(f"{role!r} is not a bin of this repository")
        misplaced = sorted(p for p in new.targets if succinct.get_role_for_target(p) != role)
        if misplaced:
            raise BinContentError(f"targets {misplaced} do not belong in {role}")
        if new.delegations is not None:
            raise BinContentError(f"{role} must not delegate further: bins are terminating")

        result = targets.get_verification_result(role, md.signed_bytes, md.signatures)
        broken = sorted(k for k in md.signatures if k in result.unsigned)
        if broken:
            raise UnsignedBinError(
                f"{role} v{new.version}: signatures by release keys {broken} do not verify; "
                "the file was changed after it was signed"
            )
        if not result.signed:
            raise UnsignedBinError(
                f"{role} v{new.version} carries no valid release signature "
                f"(0/{result.threshold}); only the release keys may sign bins"
            )

        current_version = self._store.latest_version(IMAGE, role)
        if current_version is None:
            raise NotInitialisedError(f"the store holds no {role}")
        if new.version != current_version + 1:
            raise StaleMetadataError(role, new.version, current_version + 1)
        current = self._targets_at(role, current_version)
        for path, old in current.targets.items():
            if path not in new.targets:
                raise BinContentError(f"{role} v{new.version} removes released target {path}")
            if new.targets[path] != old:
                raise BinContentError(f"{role} v{new.version} changes released target {path}")
        added = {p: t for p, t in new.targets.items() if p not in current.targets}
        for path in added:
            try:
                validate_target_path(path)
            except ValueError as e:
                raise BinContentError(f"{role} v{new.version}: {e}") from e
        if new.is_expired(now):
            raise BinContentError(f"{role} v{new.version} expired at {new.expires.isoformat()}")
        return BinCheck(
            role=role,
            version=new.version,
            valid_keyids=frozenset(result.signed),
            threshold=result.threshold,
            complete=result.verified,
            added_targets=added,
        )

    def _targets_at(self, role: str, version: int) -> Targets:
        md = Metadata[Targets].from_bytes(self._store.read_metadata(IMAGE, role, version))
        if not isinstance(md.signed, Targets):
            raise BinContentError(f"stored {version}.{role}.json is not targets metadata")
        return md.signed

    # -- online roles ---------------------------------------------------------

    def refresh(self, now: datetime | None = None) -> list[str]:
        """Re-sign snapshot and/or timestamp when they are within the margin of expiry.

        Also publishes a bin or targets version that was stored but never
        reached a snapshot (a crash between the two writes). Returns the roles
        re-signed, in the order written.
        """
        with self._store.lock(IMAGE):
            now = _utc(now) if now is not None else self._now()
            snapshot = self.current("snapshot")
            timestamp = self.current("timestamp")
            if self._unpublished(snapshot) or self._expiry.due(
                snapshot.signed.expires, self._expiry.snapshot, now
            ):
                self._new_snapshot_and_timestamp(now, {})
                return ["snapshot", "timestamp"]
            if self._expiry.due(timestamp.signed.expires, self._expiry.timestamp, now):
                self._write_timestamp(now, [self._trusted_signer("timestamp")])
                return ["timestamp"]
            return []

    def _trusted_signer(self, role: str) -> Signer:
        signer = self._signers[role]
        _require_trusted(self._root().signed, role, signer)
        return signer

    def _unpublished(self, snapshot: Metadata[Any]) -> dict[str, int]:
        """Targets-role versions stored after the snapshot and validly signed: crash leftovers."""
        meta = snapshot.signed.meta
        found: dict[str, int] = {}
        targets_md: Metadata[Targets] | None = None
        for role, version in self._store.latest_versions(IMAGE).items():
            name = f"{role}.json"
            if name not in meta or version <= meta[name].version:
                continue
            md = Metadata.from_bytes(self._store.read_metadata(IMAGE, role, version))
            if role == "targets":
                delegator: Root | Targets = self._root().signed
            else:
                targets_md = targets_md or self.current("targets")
                delegator = targets_md.signed
            if delegator.get_verification_result(role, md.signed_bytes, md.signatures):
                found[name] = version
            else:
                logger.warning("ignoring %d.%s.json: not signed by its delegator", version, role)
        return found

    def _new_snapshot_and_timestamp(
        self, now: datetime, changes: Mapping[str, int], snapshot_signers: Sequence[Signer] = ()
    ) -> int:
        """Write snapshot N+1 (with ``changes``) and a timestamp for it; caller holds the lock."""
        new = next_version(self.current("snapshot"), expires=now + self._expiry.snapshot)
        for name, version in {**self._unpublished(new), **changes}.items():
            new.signed.meta[name] = MetaFile(version)
        return self._write_snapshot_and_timestamp(new, now, snapshot_signers)

    def _write_snapshot_and_timestamp(
        self, snapshot: Metadata[Any], now: datetime, snapshot_signers: Sequence[Signer] = ()
    ) -> int:
        _sign_all(snapshot, snapshot_signers or [self._trusted_signer("snapshot")])
        data = snapshot.to_bytes()
        self._store.write_metadata(IMAGE, "snapshot", snapshot.signed.version, data)
        return self._write_timestamp(now, [self._trusted_signer("timestamp")])

    def _write_timestamp(self, now: datetime, signers: Sequence[Signer]) -> int:
        """Write the next timestamp for the highest stored snapshot; caller holds the lock.

        Pointing at the highest snapshot (not one passed in) means a slow
        writer can never publish a timestamp that rolls the snapshot back.
        """
        snapshot_version = self._store.latest_version(IMAGE, "snapshot")
        if snapshot_version is None:
            raise NotInitialisedError("the store holds no snapshot")
        snapshot_bytes = self._store.read_metadata(IMAGE, "snapshot", snapshot_version)
        version = (self._store.latest_version(IMAGE, "timestamp") or 0) + 1
        timestamp = Metadata(
            Timestamp(
                version=version,
                expires=now + self._expiry.timestamp,
                snapshot_meta=MetaFile.from_data(
                    snapshot_version, snapshot_bytes, _HASH_ALGORITHMS
                ),
            )
        )
        _sign_all(timestamp, signers)
        self._store.write_metadata(IMAGE, "timestamp", version, timestamp.to_bytes())
        return version

    # -- key rotation -----------------------------------------------------------

    def rotate_online_key(
        self,
        role: str,
        new_public_key: Key,
        new_signer: Signer,
        root_signers: Sequence[Signer],
    ) -> int:
        """Replace the key of ``role`` (snapshot or timestamp) in a new root version.

        Before the new root is written, ``role`` is re-signed (new version)
        with the old *and* the new key, so a client holding either root
        verifies it: there is no moment at which devices see metadata their
        root does not trust. From then on this object signs with ``new_signer``.
        Returns the new root version.

        Raises:
            ValueError: unknown role, or ``new_signer`` is not ``new_public_key``.
            UnsignedRootError: ``root_signers`` do not meet the root threshold.
        """
        if role not in ONLINE_ROLES:
            raise ValueError(f"online roles are {ONLINE_ROLES}, not {role!r}")
        _same_key(new_public_key, new_signer)
        with self._store.lock(IMAGE):
            now = self._now()
            old_root = self._root()
            new_root = next_version(old_root, expires=now + self._expiry.root)
            for keyid in list(new_root.signed.roles[role].keyids):
                new_root.signed.revoke_key(keyid, role)
            new_root.signed.add_key(new_public_key, role)
            sign_root(new_root, old_root.signed, root_signers)

            both = [self._trusted_signer(role), new_signer]
            if role == "snapshot":
                self._new_snapshot_and_timestamp(now, {}, snapshot_signers=both)
            else:
                self._write_timestamp(now, both)
            self._store.write_metadata(IMAGE, "root", new_root.signed.version,
                                       new_root.to_bytes())
            self._signers[role] = new_signer
            logger.info("rotated the %s key in root v%d", role, new_root.signed.version)
            return new_root.signed.version

    def rotate_root(
        self,
        new_root_keys: Sequence[Key],
        new_signers: Sequence[Signer],
        old_signers: Sequence[Signer],
        threshold: int,
    ) -> int:
        """Replace the root keys: the new root is signed by the old and the new thresholds.

        Returns the new root version.

        Raises:
            ValueError: impossible threshold or duplicate keys.
            UnsignedRootError: either threshold is not met (nothing is written).
        """
        with self._store.lock(IMAGE):
            return _rotate_root(
                self._store, IMAGE, self._root(), new_root_keys, new_signers, old_signers,
                threshold, self._now() + self._expiry.root,
            )


def _rotate_root(
    store: RepoStore,
    repo: str,
    old_root: Metadata[Root],
    new_root_keys: Sequence[Key],
    new_signers: Sequence[Signer],
    old_signers: Sequence[Signer],
    threshold: int,
    expires: datetime,
) -> int:
    keyids = [k.keyid for k in new_root_keys]
    if len(set(keyids)) != len(keyids) or not 1 <= threshold <= len(keyids):
        raise ValueError(
            f"root threshold {threshold} must be between 1 and the {len(set(keyids))} "
            "distinct new root keys"
        )
    new_root = next_version(old_root, expires=expires)
    for keyid in list(new_root.signed.roles["root"].keyids):
        new_root.signed.revoke_key(keyid, "root")
    for key in new_root_keys:
        new_root.signed.add_key(key, "root")
    new_root.signed.roles["root"].threshold = threshold
    sign_root(new_root, old_root.signed, [*old_signers, *new_signers])
    store.write_metadata(repo, "root", new_root.signed.version, new_root.to_bytes())
    logger.info("rotated the root keys of %s in root v%d", repo, new_root.signed.version)
    return new_root.signed.version


def _verify(delegator: Root | Targets, role: str, md: Metadata[Any]) -> None:
    try:
        delegator.verify_delegate(role, md.signed_bytes, md.signatures)
    except UnsignedMetadataError as e:
        raise SignatureThresholdError(f"{role}: {e}") from e


