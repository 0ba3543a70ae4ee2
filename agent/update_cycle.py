"""One verified update check and install, the core of the agent's update cycle.

Each check creates fresh ``tuf.ngclient.Updater`` objects for both
repositories, but over *persistent* metadata folders: a fresh cache would
accept an older (still unexpired) timestamp, so keeping the cache is what
protects a device from replayed metadata. The install downloads the bundle
through ngclient (length and hash checked against signed metadata), unwraps
the content key with the device's own key, opens the bundle into a new
version folder (digests from signed metadata checked in the same pass) and
runs the validation gate. Nothing here swaps a live model: that is the model
host's job once the journal and hot swap land.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.ngclient import FetcherInterface, Updater

from edgeota.agent.config import AgentConfig
from edgeota.agent.http_fetcher import HttpFetcher, HttpFetcherConfig
from edgeota.agent.mqtt_fetcher import (
    MQTT_REPOSITORY_URL,
    DeviceConnection,
    DownloadStats,
    MqttFetcher,
    ResumableDownload,
)
from edgeota.agent.mqtt_loop import SharedNetworkLoop
from edgeota.agent.uptane import DeviceFacts, InstallDecision, decide
from edgeota.agent.validation import ValidationReport, validate_model
from edgeota.protocol.bundle import OpenedBundle, open_bundle
from edgeota.protocol.errors import ManifestError
from edgeota.protocol.fetch import MqttTls
from edgeota.protocol.identity import DeviceIdentity
from edgeota.protocol.keywrap import unwrap_content_key

__all__ = ["InstalledModel", "UpdateClient"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstalledModel:
    """A verified, decrypted and validated model in its own version folder."""

    decision: InstallDecision
    bundle: OpenedBundle
    report: ValidationReport

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
        transport: str = "http",
        network: SharedNetworkLoop | None = None,  # MQTT: share this loop, no thread of our own
    ) -> None:
        self._config = config
        self._identity = identity or DeviceIdentity.load(config.identity_dir)
        if self._identity.device_id != config.device_id:
            raise ManifestError(
                f"identity in {config.identity_dir} is for {self._identity.device_id!r}, "
                f"agent.toml says {config.device_id!r}"
            )
        self._token = config.token()
        self._connection = None
        self.download_stats = DownloadStats()  # resumable (MQTT) downloads only
        self._base = config.repository_url
        if fetcher_factory is None and transport == "mqtt":
            fetcher_factory, self._connection = self._mqtt_fetchers(config, network)
            self._base = MQTT_REPOSITORY_URL
        self._fetcher_factory = fetcher_factory or (
            lambda token: HttpFetcher(HttpFetcherConfig(token=token))
        )
        self._tuf_dir = config.state_dir / "tuf"
        self._downloads = config.state_dir / "downloads"
        self._models = config.state_dir / "models"

    def _updater(self, name: str, metadata_url: str, bootstrap: Path,
                 target_url: str | None, token: str | None) -> Updater:
        folder = self._tuf_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        cached_root = folder / "root.json"
        return Updater(
            metadata_dir=str(folder),
            metadata_base_url=metadata_url,
            target_dir=str(self._downloads),
            target_base_url=target_url,
            fetcher=self._fetcher_factory(token),
            # Once a root is cached, trust the cache (it may be newer than the
            # enrolment root): re-bootstrapping would reset what we learned.
            bootstrap=None if cached_root.exists() else bootstrap.read_bytes(),
        )

    @staticmethod
    def _mqtt_fetchers(
        config: AgentConfig, network: SharedNetworkLoop | None = None,
    ) -> tuple[Callable[[str | None], FetcherInterface], DeviceConnection]:
        """One TLS connection with the device certificate; a fetcher per Updater over it."""
        if not config.mqtt_url:
            raise ManifestError("agent.toml names no [mqtt] url for the MQTT transport")
        parts = urlsplit(config.mqtt_url)
        if parts.scheme != "mqtts" or not parts.hostname:
            raise ManifestError(f"MQTT url {config.mqtt_url!r} must be mqtts://HOST:PORT")
        connection = DeviceConnection(
            config.device_id, host=parts.hostname, port=parts.port or 8883,
            tls=MqttTls(ca_file=config.ca_cert, cert_file=config.tls_cert,
                        key_file=config.tls_key),
            network=network,
        )
        connection.start()
        return (lambda _token: MqttFetcher(connection)), connection

    @property
    def connection(self) -> DeviceConnection | None:
        """The device's MQTT connection when the transport is MQTT (for reports)."""
        return self._connection

    def close(self) -> None:
        """Close the MQTT connection, if this client opened one."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None

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
        director = self._director()
        director.refresh()
        image = self._image()
        image.refresh()
        facts = DeviceFacts(self._config.device_id, self._config.hardware, release_floor)
        targets = _verified_targets(self._tuf_dir / "director" / "targets.json")
        decisions = []
        for path in sorted(targets):
            decisions.append(decide(path, targets[path], image.get_targetinfo(path), facts))
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
        resumable = ResumableDownload(self._connection, self._downloads / "resumable",
                                      stats=self.download_stats)
        return resumable.download(
            f"{MQTT_REPOSITORY_URL}/image/targets/"
            f"{_hash_prefixed(decision.target_path, decision.sha256)}",
            length=decision.length, sha256=decision.sha256)

    def install(self, decision: InstallDecision) -> InstalledModel:
        """Download, verify, decrypt, unpack and validate one decided target."""
        image = self._image()
        image.refresh()
        info = image.get_targetinfo(decision.target_path)
        if info is None or info.hashes.get("sha256") != decision.sha256:
            raise ManifestError(f"{decision.target_path} changed since it was checked")
        bundle_path = self._download(image, info, decision)
        content_key = unwrap_content_key(
            decision.director.wrapped_key, self._identity.kem_private_key, self._config.device_id
        )
        version_folder = f"{decision.image.version}-{decision.sha256[:12]}"
        dest = self._models / decision.image.name / version_folder
        if dest.exists():
            shutil.rmtree(dest)  # a folder from an earlier attempt is never trusted
        dest.parent.mkdir(parents=True, exist_ok=True)
        opened = open_bundle(
            bundle_path,
            content_key,
            dest,
            expected_sealed_sha256=decision.sha256,
            expected_plaintext_sha256=decision.image.plaintext_sha256,
        )
        try:
            manifest = opened.manifest
            if (manifest.name, manifest.version) != (decision.image.name, decision.image.version):
                raise ManifestError(
                    f"bundle holds {manifest.name} {manifest.version}, signed metadata says "
                    f"{decision.image.name} {decision.image.version}"
                )
            report = validate_model(opened.model_path, manifest)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        bundle_path.unlink(missing_ok=True)
        return InstalledModel(decision, opened, report)


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
