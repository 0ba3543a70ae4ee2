"""One verified update check and install, the core of the agent's update cycle.

Each check creates fresh ``tuf.ngclient.Updater`` objects for both
repositories, but over *persistent* metadata folders: a fresh cache would
accept an older (still unexpired) timestamp, so keeping the cache is what
protects a device from replayed metadata. The install unwraps
the content key with the device's own key (a key wrapped for another device is
refused before a byte is downloaded), downloads the bundle (length and hash
checked against signed metadata), opens it into a new version folder (digests
from signed metadata checked in the same pass) and runs the validation gate.
Nothing here swaps a live model: that is the model host's job.

The install is three steps, one per journal state, so the agent saves each
state before its work starts and a restart continues from the step it names:
:meth:`UpdateClient.download` (``downloading``: resumable over MQTT),
:meth:`UpdateClient.open` (``verifying``: unwrap, decrypt, authenticate and
unpack the downloaded bundle -- never fetched again) and
:meth:`UpdateClient.validate` (``validating``: the gate, on a session kept for
the swap). :meth:`UpdateClient.install` runs the three in a row for callers
that keep no journal.

Every transfer is bounded (:class:`TransferLimits`): a repository that stops
sending fails after ``frame_timeout``, and one that trickles (slow retrieval)
fails once its average rate stays below ``min_rate`` past a grace period, so an
attacker between device and server can delay an update cycle, never hold it.
Whatever goes wrong while installing is raised as an :class:`InstallError`
that is also the ngclient error it stands for: the agent reports it as a
failed update and goes back to idle, instead of ending the cycle half-way.

A full disk is an install failure too (:class:`DiskFullError`), never a crash:
before downloading, the free space of the state folder is checked against
what the install needs (the rest of the bundle, the unpacked model from the
signed ``plaintext_size``, and a margin for the journal and metadata), and a
``ENOSPC`` while writing anyway (another process filled the card) removes what
this attempt wrote. The served model is not touched either way, and the agent
tries again in a later cycle.
"""

from __future__ import annotations

import errno
import logging
import shutil
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar
from urllib.parse import quote

from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.ngclient import FetcherInterface, Updater

from edgeota.agent.config import AgentConfig
from edgeota.agent.mqtt_fetcher import MQTT_REPOSITORY_URL, MqttFetcher
from edgeota.agent.mqtt_session import DeviceConnection
from edgeota.agent.repository import open_updater
from edgeota.agent.resumable import DownloadStats, ResumableDownload
from edgeota.agent.uptane import DeviceFacts, InstallDecision, decide
from edgeota.protocol.bundle import OpenedBundle, open_bundle
from edgeota.protocol.errors import EdgeotaError, ManifestError
from edgeota.protocol.fetch import MAX_OFFSET, ChunkFrame
from edgeota.protocol.identity import DeviceIdentity
from edgeota.protocol.keywrap import unwrap_content_key
from edgeota.protocol.reasons import Reason
from edgeota.runtime.http_fetcher import HttpFetcher, HttpFetcherConfig
from edgeota.runtime.validation import (
    DEFAULT_SETTINGS,
    SessionSettings,
    ValidationReport,
    load_validated,
)

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = [
    "FREE_SPACE_MARGIN",
    "BundleMismatchError",
    "BundleMissingError",
    "BundleTooLargeError",
    "BundleTooSlowError",
    "BundleUnavailableError",
    "DiskFullError",
    "InstallError",
    "InstallMetadataError",
    "InstalledModel",
    "TargetChangedError",
    "TransferLimits",
    "UpdateClient",
]

logger = logging.getLogger(__name__)


class InstallError(EdgeotaError):
    """Installing a decided target failed before anything was unpacked; nothing changed.

    Each subclass is also the ngclient error it stands for (callers that handle
    ngclient's errors keep working) and an ``EdgeotaError``, which the agent
    reports as a failed update by its :attr:`reason`, a code of the wire's
    enumeration (:class:`~edgeota.protocol.reasons.Reason`).
    """

    reason: ClassVar[Reason] = Reason.INTERNAL_ERROR


class BundleMismatchError(InstallError, tuf_exceptions.LengthOrHashMismatchError):
    """The bundle's bytes are not the ones both repositories signed."""

    reason = Reason.BUNDLE_MISMATCH


class BundleTooLargeError(InstallError, tuf_exceptions.DownloadLengthMismatchError):
    """The server offered more bytes than the signed length (endless data)."""

    reason = Reason.BUNDLE_TOO_LARGE


class BundleTooSlowError(InstallError, tuf_exceptions.DownloadError):
    """The transfer stalled or stayed below the minimum rate (slow retrieval).

    Not a ``SlowRetrievalError``: the resumable download retries those, and a
    trickle must end the attempt, not start another one.
    """

    reason = Reason.BUNDLE_TOO_SLOW


class BundleUnavailableError(InstallError, tuf_exceptions.DownloadError):
    """The bundle could not be fetched (network, broker, server refusal)."""

    reason = Reason.BUNDLE_UNAVAILABLE


class InstallMetadataError(InstallError, tuf_exceptions.RepositoryError):
    """The image repository's metadata was refused while installing."""

    reason = Reason.INSTALL_METADATA_REFUSED


class TargetChangedError(InstallError):
    """The image repository no longer lists the decided target as it was checked."""

    reason = Reason.TARGET_CHANGED


class BundleMissingError(InstallError):
    """The downloaded bundle a restarted install wanted to open again is gone.

    The journal said the download had finished, but the file is not there (or
    not whole): the card lost it, or someone removed it. Nothing is trusted,
    nothing changed; the next cycle downloads it again.
    """

    reason = Reason.BUNDLE_MISSING


class DiskFullError(InstallError):
    """The state folder has no room for this install; what the attempt wrote was removed.

    Raised before the download when the free space is short, or when a write
    failed with ``ENOSPC``/``EDQUOT`` anyway. Not an ngclient error: the disk
    is the device's, not the repository's. Reported as ``failed(disk_full)``
    and retried in a later cycle (space may be freed meanwhile).
    """

    reason = Reason.DISK_FULL


# Room kept free beyond the bundle and the unpacked model: the journal, progress
# records, TUF metadata and the report sequence must still be writable after the
# install, or a full card would stop the agent from saying what happened.
FREE_SPACE_MARGIN = 1024 * 1024
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def _free_bytes(folder: Path) -> int:
    """Bytes available to this process in ``folder``'s file system."""
    return shutil.disk_usage(folder).free


# First match wins: the specific ngclient errors before their bases.
_INSTALL_ERRORS: tuple[tuple[type[Exception], type[InstallError]], ...] = (
    (tuf_exceptions.LengthOrHashMismatchError, BundleMismatchError),
    (tuf_exceptions.DownloadLengthMismatchError, BundleTooLargeError),
    (tuf_exceptions.SlowRetrievalError, BundleTooSlowError),
    (tuf_exceptions.DownloadError, BundleUnavailableError),
    (tuf_exceptions.RepositoryError, InstallMetadataError),
)


def _install_error(error: Exception) -> InstallError:
    for tuf_type, ours in _INSTALL_ERRORS:
        if isinstance(error, tuf_type):
            return ours(str(error))
    raise TypeError(f"not an ngclient error: {error!r}")  # pragma: no cover


@dataclass(frozen=True)
class TransferLimits:
    """Bounds of every repository transfer, over MQTT or HTTP; every wait is bounded.

    A transfer fails when no frame (HTTP: no byte) arrives for ``frame_timeout`` seconds, or
    once ``elapsed > grace + received / min_rate``: a trickle slower than
    ``min_rate`` is cut after at most ``grace / (1 - rate / min_rate)``
    seconds, whatever the file's size. Over MQTT a bundle cut this way resumes
    from its last durable window in the next cycle, so a slow honest link still
    finishes (over HTTP it starts again); metadata files are small enough to
    need no resume.
    """

    frame_timeout: float = 30.0  # seconds without a frame
    min_rate: float = 1024.0  # bytes per second, averaged since the transfer began
    grace: float = 120.0  # seconds before the rate counts
    max_retries: int = 5  # interrupted bundle transfers resumed within one install

    def __post_init__(self) -> None:
        if self.frame_timeout <= 0 or self.min_rate <= 0 or self.grace < 0:
            raise ValueError("frame_timeout and min_rate must be positive, grace not negative")
        if self.max_retries < 0:
            raise ValueError("max_retries must not be negative")

    def http_fetcher(self, token: str | None = None) -> HttpFetcher:
        """ngclient's HTTP fetcher bounded by these limits (``token``: the device's bearer)."""
        return HttpFetcher(HttpFetcherConfig(
            token=token, read_timeout=self.frame_timeout, min_rate=self.min_rate,
            grace=self.grace))


class _RateGuard:
    """Raises ``error`` once a transfer's average rate is below the floor past the grace."""

    def __init__(self, limits: TransferLimits, what: str,
                 error: type[Exception], clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = limits
        self._what = what
        self._error = error
        self._clock = clock
        self._started = clock()

    def check(self, received: int) -> None:
        elapsed = self._clock() - self._started
        if elapsed > self._limits.grace + received / self._limits.min_rate:
            raise self._error(
                f"{self._what}: {received} bytes in {elapsed:.1f}s, below "
                f"{self._limits.min_rate:g} B/s after the {self._limits.grace:g}s grace")


class _BoundedMqttFetcher(MqttFetcher):
    """ngclient's MQTT fetcher with the minimum average rate of :class:`TransferLimits`."""

    def __init__(self, connection: DeviceConnection, limits: TransferLimits) -> None:
        super().__init__(connection, timeout=limits.frame_timeout)
        self._limits = limits

    def stream(self, path: str, *, offset: int = 0,
               max_length: int = MAX_OFFSET) -> Generator[ChunkFrame, None, None]:
        guard = _RateGuard(self._limits, path, tuf_exceptions.SlowRetrievalError)
        frames = super().stream(path, offset=offset, max_length=max_length)
        received = 0
        try:
            for frame in frames:
                received += len(frame.payload)
                guard.check(received)
                yield frame
        finally:
            frames.close()  # cancels the request if it did not finish


@dataclass(frozen=True)
class InstalledModel:
    """A verified, decrypted and validated model in its own version folder."""

    decision: InstallDecision
    bundle: OpenedBundle
    report: ValidationReport
    #: The session the gate validated, for the swap to serve (not loaded twice).
    session: ort.InferenceSession | None = field(default=None, repr=False, compare=False)

    @property
    def model_path(self) -> Path:
        return self.bundle.model_path


class UpdateClient:
    """Verified checks and installs for one device, per its ``agent.toml``."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        identity: DeviceIdentity | None = None,
        fetcher_factory: Callable[[str | None], FetcherInterface] | None = None,
        connection: DeviceConnection | None = None,  # MQTT: the device's session (not owned)
        limits: TransferLimits | None = None,
        disk_free: Callable[[Path], int] | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._config = config
        # Read at the start of every transfer, so the simulator may tighten them.
        self.limits = limits or TransferLimits()
        # Read at every install / check, so the simulator may swap them too: the free
        # bytes of a folder's file system, and the clock metadata expiry is judged
        # by (None: ngclient's, the system clock).
        self.disk_free: Callable[[Path], int] = disk_free or _free_bytes
        self.clock = clock
        # Called with (offset, length) as a resumable download makes progress.
        self.on_download_progress: Callable[[int, int], None] | None = None
        self._identity = identity or DeviceIdentity.load(config.identity_dir)
        if self._identity.device_id != config.device_id:
            raise ManifestError(
                f"identity in {config.identity_dir} is for {self._identity.device_id!r}, "
                f"agent.toml says {config.device_id!r}"
            )
        self._token = config.token()
        self._connection = connection
        # The image repository as the last check() verified it, with its decisions.
        self._checked: tuple[Updater, list[InstallDecision]] | None = None
        self.download_stats = DownloadStats()  # resumable (MQTT) downloads only
        self._base = config.repository_url
        if fetcher_factory is None and connection is not None:
            # A fetcher per Updater over the one session, bounded by the limits of the
            # moment (read when the Updater is made).
            fetcher_factory = lambda _token: _BoundedMqttFetcher(connection, self.limits)  # noqa: E731
            self._base = MQTT_REPOSITORY_URL
        self._fetcher_factory = fetcher_factory or (
            lambda token: self.limits.http_fetcher(token))
        self._tuf_dir = config.state_dir / "tuf"
        self._downloads = config.state_dir / "downloads"
        self._models = config.state_dir / "models"

    def _updater(self, name: str, metadata_url: str, bootstrap: Path,
                 target_url: str | None, token: str | None) -> Updater:
        return open_updater(
            self._tuf_dir / name, metadata_url, bootstrap=bootstrap.read_bytes,
            fetcher=self._fetcher_factory(token), target_dir=self._downloads,
            target_url=target_url,
            reference_time=None if self.clock is None else self.clock())

    @property
    def connection(self) -> DeviceConnection | None:
        """The MQTT session the fetchers use (the agent's; ``None`` over HTTP)."""
        return self._connection

    def _image(self) -> Updater:
        self._downloads.mkdir(parents=True, exist_ok=True)
        return self._updater("image", f"{self._base}/image/metadata/", self._config.image_root,
                             f"{self._base}/image/targets/", None)

    def _director(self) -> Updater:
        return self._updater("director",
                             f"{self._base}/director/{self._config.device_id}/metadata/",
                             self._config.director_root, None, self._token)

    def check(self, release_floor: int = 0) -> list[InstallDecision]:
        """Refresh both repositories and return what this device should run, verified.

        Raises ``UptaneRefusal`` when the director asks for anything the image
        repository does not back, and ngclient's errors for bad metadata.
        """
        self._checked = None
        director = self._director()
        director.refresh()
        image = self._image()
        image.refresh()
        facts = DeviceFacts(self._config.device_id, self._config.hardware, release_floor)
        targets = _verified_targets(self._tuf_dir / "director" / "targets.json")
        decisions = []
        for path in sorted(targets):
            decisions.append(decide(path, targets[path], image.get_targetinfo(path), facts))
        # install() of these decisions goes on from this verified image metadata rather
        # than refreshing it again: one round trip less per update, and the bundle is
        # checked against exactly the metadata the decision was made on.
        self._checked = (image, list(decisions))
        return decisions

    def _download(self, image: Updater, info: TargetFile, decision: InstallDecision) -> Path:
        """The verified bundle file: resumable over MQTT, through ngclient over HTTP.

        Over MQTT a download interrupted by a disconnect or a restart of the
        agent continues from its last durable window (partial files keyed by
        the signed sha256, checked again at the end); ngclient's own download
        would start over.
        """
        cached = image.find_cached_target(info)
        if cached:
            return Path(cached)
        if self._connection is None:
            return Path(image.download_target(info))
        limits = self.limits
        folder = self._downloads / "resumable"
        guard = _RateGuard(limits, decision.target_path, BundleTooSlowError)
        stats = self.download_stats
        fetched_before = stats.bytes_fetched  # the rate is of bytes received in this call

        def on_progress(offset: int, length: int) -> None:
            guard.check(stats.bytes_fetched - fetched_before)
            if self.on_download_progress is not None:
                self.on_download_progress(offset, length)

        resumable = ResumableDownload(
            self._connection, folder, timeout=limits.frame_timeout,
            max_retries=limits.max_retries, stats=stats, on_progress=on_progress)
        return resumable.download(
            f"{MQTT_REPOSITORY_URL}/image/targets/"
            f"{_hash_prefixed(decision.target_path, decision.sha256)}",
            length=decision.length, sha256=decision.sha256)

    def download(self, decision: InstallDecision) -> Path:
        """The ``downloading`` step: fetch the decided bundle, verified; return its file.

        The content key is unwrapped first, so nothing is downloaded for a key
        this device cannot open. Over MQTT a download cut by a disconnect or a
        restart continues from its last durable window (partial files keyed by
        the signed sha256); over HTTP ngclient fetches it whole. Either way the
        file on return has the signed length and sha256.

        Raises:
            KeyUnwrapError: the content key is not wrapped for this device.
            InstallError: the metadata or the transfer was refused;
                :class:`DiskFullError` when the state folder has no room (checked
                before downloading; an ``ENOSPC`` later removes what was written).
            TargetChangedError: the target changed since it was checked.
        """
        self._content_key(decision)
        try:
            image = self._image_for(decision)
            info = image.get_targetinfo(decision.target_path)
            if info is None or info.hashes.get("sha256") != decision.sha256:
                raise TargetChangedError(
                    f"{decision.target_path} changed since it was checked")
            self._require_space(decision)
            return self._download(image, info, decision)
        except InstallError:
            raise
        except (tuf_exceptions.RepositoryError, tuf_exceptions.DownloadError) as e:
            raise _install_error(e) from e
        except OSError as e:
            if e.errno not in _DISK_FULL_ERRNOS:
                raise
            self._discard_download(decision)
            raise DiskFullError(f"disk full while downloading {decision.target_path}: "
                                f"{e}") from e

    def open(self, decision: InstallDecision, bundle_path: Path | None = None) -> OpenedBundle:
        """The ``verifying`` step: decrypt, authenticate and unpack the downloaded bundle.

        ``bundle_path`` is what :meth:`download` returned in this process; after
        a restart it is ``None`` and the finished download is found on disk
        (never fetched again). Either way its bytes are not hashed a second
        time: a change on disk since the download cannot pass the AEAD tags
        under this release's key nor the signed plaintext sha256, which this
        pass checks. The version folder is new: one left by an earlier attempt
        is never trusted.

        Raises:
            BundleMissingError: no finished download of this target is on disk.
            KeyUnwrapError, BundleError, ManifestError: see ``open_bundle``.
            DiskFullError: ``ENOSPC`` while unpacking (what was written is removed).
        """
        content_key = self._content_key(decision)
        if bundle_path is None:
            bundle_path = self.downloaded(decision)
            if bundle_path is None:
                raise BundleMissingError(
                    f"the finished download of {decision.target_path} is not on disk")
        dest = self.model_folder(decision)
        if dest.exists():
            shutil.rmtree(dest)  # a folder from an earlier attempt is never trusted
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            opened = open_bundle(  # removes its half-unpacked folder on any failure
                bundle_path,
                content_key,
                dest,
                expected_plaintext_sha256=decision.image.plaintext_sha256,
            )
        except OSError as e:
            if e.errno not in _DISK_FULL_ERRNOS:
                raise
            shutil.rmtree(dest, ignore_errors=True)
            self._discard_download(decision)
            raise DiskFullError(f"disk full while unpacking {decision.target_path}: "
                                f"{e}") from e
        manifest = opened.manifest
        if (manifest.name, manifest.version) != (decision.image.name, decision.image.version):
            shutil.rmtree(dest, ignore_errors=True)
            raise ManifestError(
                f"bundle holds {manifest.name} {manifest.version}, signed metadata says "
                f"{decision.image.name} {decision.image.version}"
            )
        return opened

    def validate(self, decision: InstallDecision, opened: OpenedBundle, *,
                 session_settings: SessionSettings = DEFAULT_SETTINGS) -> InstalledModel:
        """The ``validating`` step: the gate, on a session loaded with ``session_settings``.

        Those are the settings the model will be served with, and the result
        carries that very session for the swap (the model is loaded once). On
        any failure the unpacked folder is removed.

        Raises:
            ValidationError: the model failed the gate (see ``load_validated``).
        """
        try:
            validated = load_validated(opened.model_path, opened.manifest,
                                       settings=session_settings)
        except BaseException:
            shutil.rmtree(opened.folder, ignore_errors=True)
            raise
        # The sealed bundle stays until the caller has swapped the model in
        # (forget_download): an agent that dies before then opens, so verifies,
        # the same bundle again on its next try instead of downloading it again.
        return InstalledModel(decision, opened, validated.report, validated.session)

    def install(self, decision: InstallDecision, *,
                session_settings: SessionSettings = DEFAULT_SETTINGS) -> InstalledModel:
        """:meth:`download`, :meth:`open` and :meth:`validate` in a row, with no journal.

        The agent runs the three steps itself, saving each journal state
        first; this is for callers that keep none (tests of the install path).
        """
        bundle_path = self.download(decision)
        opened = self.open(decision, bundle_path)
        return self.validate(decision, opened, session_settings=session_settings)

    def downloaded(self, decision: InstallDecision) -> Path | None:
        """The finished download of ``decision`` on disk (signed length), or ``None``."""
        for candidate in (self._downloads / "resumable" / decision.sha256,
                          self._downloads / quote(decision.target_path, "")):
            try:
                if candidate.stat().st_size == decision.length:
                    return candidate
            except FileNotFoundError:
                continue
        return None

    def model_folder(self, decision: InstallDecision) -> Path:
        """Where ``decision``'s model is unpacked: one folder per version and bundle."""
        return (self._models / decision.image.name
                / f"{decision.image.version}-{decision.sha256[:12]}")

    def _content_key(self, decision: InstallDecision) -> bytes:
        return unwrap_content_key(
            decision.director.wrapped_key, self._identity.kem_private_key, self._config.device_id
        )

    def _image_for(self, decision: InstallDecision) -> Updater:
        """The image repository as :meth:`check` verified it for ``decision``, or afresh."""
        checked = self._checked
        if checked is not None and any(d is decision for d in checked[1]):
            return checked[0]
        image = self._image()  # a decision from elsewhere: verify the image repository
        image.refresh()
        return image

    def forget_download(self, decision: InstallDecision) -> None:
        """Delete the downloaded bundle of ``decision`` (installed, or refused for good)."""
        self._discard_download(decision)

    def discard(self, target_path: str, sha256: str) -> None:
        """Delete every file an install of this target left: its download and its folder.

        For an update abandoned after a restart (the director assigns something
        else now), known only by the journal's note of it.
        """
        self._discard_files(target_path, sha256)
        for folder in self._models.glob(f"*/*-{sha256[:12]}"):
            shutil.rmtree(folder, ignore_errors=True)


    def _require_space(self, decision: InstallDecision) -> None:
        """Refuse, before a byte is written, an install the state folder cannot hold.

        Needed: what is left of the bundle (a resumed download counts only its
        missing bytes), the unpacked model (the signed ``plaintext_size``; the
        bundle is deleted only after unpacking, so both live at once) and
        :data:`FREE_SPACE_MARGIN`.
        """
        missing = decision.length
        # Only whether a complete download is there: _download verifies its hash (once).
        if (self._downloads / quote(decision.target_path, "")).is_file():
            missing = 0
        elif self._connection is not None:
            missing -= ResumableDownload(self._connection, self._downloads / "resumable") \
                .saved_offset(decision.sha256, decision.length)
        needed = missing + decision.image.plaintext_size + FREE_SPACE_MARGIN
        self._config.state_dir.mkdir(parents=True, exist_ok=True)
        free = self.disk_free(self._config.state_dir)
        if free < needed:
            logger.warning("not enough space to install %s", decision.target_path, extra={
                "device_id": self._config.device_id, "free_bytes": free,
                "needed_bytes": needed})
            raise DiskFullError(
                f"{decision.target_path} needs {needed} bytes in {self._config.state_dir}, "
                f"{free} are free")

    def _discard_download(self, decision: InstallDecision) -> None:
        """Delete every file this target's download left: on a full disk they only hurt."""
        self._discard_files(decision.target_path, decision.sha256)

    def _discard_files(self, target_path: str, sha256: str) -> None:
        resumable = self._downloads / "resumable"
        for leftover in (resumable / sha256, resumable / f"{sha256}.partial",
                         resumable / f"{sha256}.progress",  # before progress moved
                         self._downloads / quote(target_path, "")):
            leftover.unlink(missing_ok=True)


def _hash_prefixed(target_path: str, sha256: str) -> str:
    """The consistent-snapshot name ngclient would fetch: ``dir/{sha256}.{name}``."""
    folder, _, name = target_path.rpartition("/")
    return f"{folder}/{sha256}.{name}" if folder else f"{sha256}.{name}"


def _verified_targets(cached: Path) -> dict[str, TargetFile]:
    """The director's top-level targets, read from the cache ``refresh`` just verified.

    ngclient offers lookups by path only, but the device must learn *which*
    paths its director lists; ngclient persists only metadata it verified.
    """
    return dict(Metadata[Targets].from_bytes(cached.read_bytes()).signed.targets)
