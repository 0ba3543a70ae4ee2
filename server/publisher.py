"""Publishing a release from the operator's machine (what ``release publish`` runs).

The release key is used here and nowhere else: the CLI validates the model,
seals it with a fresh content key, fetches the current hash bin *through
ngclient* (so it signs on top of verified metadata, never on whatever a
server claims), adds the target, signs the new bin version and uploads the
bundle, the signed bin and the content key wrapped to the server's pinned
key-wrap key. The server then checks everything again.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import secrets
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from securesystemslib.signer import Signer
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.ngclient import Updater

from edgeota.protocol.bundle import generate_content_key, seal_bundle
from edgeota.protocol.errors import EdgeotaError
from edgeota.protocol.identity import SERVER_IDENTITY
from edgeota.protocol.keywrap import KemPublicKey, wrap_content_key
from edgeota.protocol.manifest import Manifest
from edgeota.protocol.stream import AeadSuite
from edgeota.protocol.targets_custom import ImageTargetCustom, target_path_for
from edgeota.runtime.http_fetcher import HttpFetcher
from edgeota.runtime.validation import check_compatible, validate_model
from edgeota.server.client import ApiError, OperatorClient
from edgeota.server.config import KeyRef, OperatorConfig
from edgeota.server.keystore import load_public_key, load_signer
from edgeota.server.manifest_builder import build_manifest, external_data_files
from edgeota.server.repo.image import add_target_to_bin, bin_for, sign
from edgeota.server.services.errors import ErrorCode

__all__ = ["PublishError", "PublishRequest", "publish_release", "sign_release"]

logger = logging.getLogger(__name__)

BIN_VALIDITY = timedelta(days=365)
_STALE_RETRIES = 3


class PublishError(EdgeotaError):
    """The release cannot be published as asked (a clash, a missing key, a refusal)."""


@dataclass(frozen=True)
class PublishRequest:
    model: Path
    name: str
    version: str
    hardware: tuple[str, ...]
    vectors: Path | None = None
    golden: Path | None = None
    min_accuracy: float | None = None
    latency_budget_ms: float | None = None
    release_counter: int | None = None
    bump_counter: bool = False
    allow_breaking: bool = False
    suite: AeadSuite = AeadSuite.CHACHA20_POLY1305
    key_index: int = 1


def _release_signer(config: OperatorConfig, index: int) -> Signer:
    if not 1 <= index <= len(config.release_keys):
        raise PublishError(
            f"release key {index} is not in {config.home / 'operator.toml'} "
            f"({len(config.release_keys)} configured)"
        )
    ref: KeyRef = config.release_keys[index - 1]
    return load_signer(ref.uri, load_public_key(ref.public_key))


def verified_bin(
    config: OperatorConfig, target_path: str, workdir: Path
) -> tuple[str, Metadata[Targets]]:
    """Refresh the image repository with ngclient and return the verified bin for a path."""
    if config.trusted_image_root is None:
        raise PublishError("operator.toml names no trusted_image_root to verify the repository")
    metadata_dir = workdir / f"tuf-{secrets.token_hex(4)}"
    metadata_dir.mkdir()
    updater = Updater(
        metadata_dir=str(metadata_dir),
        metadata_base_url=f"{config.server_url}/repo/image/metadata/",
        target_base_url=f"{config.server_url}/repo/image/targets/",
        fetcher=HttpFetcher(),
        bootstrap=config.trusted_image_root.read_bytes(),
    )
    updater.refresh()
    if updater.get_targetinfo(target_path) is not None:
        raise PublishError(f"{target_path} is already in the image repository")
    targets = Metadata[Targets].from_bytes((metadata_dir / "targets.json").read_bytes())
    role = bin_for(targets, target_path)
    return role, Metadata[Targets].from_bytes((metadata_dir / f"{role}.json").read_bytes())


def _keywrap_key(config: OperatorConfig, client: OperatorClient) -> KemPublicKey:
    served = KemPublicKey.from_dict(client.get("/api/v1/keywrap-key"))
    if config.keywrap_public is not None:
        pinned = KemPublicKey.from_dict(json.loads(config.keywrap_public.read_text()))
        if pinned != served:
            raise PublishError(
                "the server's key-wrap key differs from the one pinned in operator.toml: "
                "refusing to hand it the content key"
            )
        return pinned
    return served


def _previous(client: OperatorClient, name: str, version: str) -> dict[str, Any] | None:
    releases = client.get("/api/v1/releases", name=name)
    for release in releases:
        if release["version"] == version:
            raise PublishError(
                f"{name} {version} already exists (release {release['id']}, "
                f"{release['status']}): versions are immutable"
            )
    published = [r for r in releases if r["status"] == "published"]
    if not published:
        return None
    latest = max(published, key=lambda r: (r["published_at"] or "", r["id"]))
    view: dict[str, Any] = client.get(f"/api/v1/releases/{latest['id']}")  # a JSON object
    return view


def publish_release(
    config: OperatorConfig,
    client: OperatorClient,
    request: PublishRequest,
    *,
    progress: Callable[[str], None] | None = None,
    byte_progress: Callable[[int], None] | None = None,
    clock: Callable[[], datetime] | None = None,
) -> dict[str, Any]:
    """Validate, seal, sign and upload one release; returns the server's answer."""
    say = progress or (lambda _message: None)
    now = (clock or (lambda: datetime.now(UTC)))()
    signer = _release_signer(config, request.key_index)
    say("building the manifest")
    manifest = build_manifest(
        request.model,
        name=request.name,
        version=request.version,
        hardware=request.hardware,
        vectors=request.vectors,
        golden=request.golden,
        min_accuracy=request.min_accuracy,
        latency_budget_ms=request.latency_budget_ms,
    )
    say("validating the model in onnxruntime")
    # The latency budget is a device property; devices enforce it themselves.
    validate_model(request.model, dataclasses.replace(manifest, latency_budget_ms=None),
                   latency_runs=1)
    previous = _previous(client, request.name, request.version)
    if previous is not None and not request.allow_breaking:
        check_compatible(Manifest.from_dict(previous["manifest"]), manifest)
    counter = request.release_counter
    if counter is None:
        base = previous["release_counter"] if previous is not None else 0
        counter = base + 1 if request.bump_counter or previous is None else base
    target_path = target_path_for(request.name, request.version)
    with tempfile.TemporaryDirectory(prefix="edgeota-publish-") as scratch:
        work = Path(scratch)
        say(f"sealing the bundle ({request.suite.value})")
        content_key = generate_content_key()
        payload = {"model.onnx": request.model, **external_data_files(request.model)}
        bundle = seal_bundle(manifest, payload, work / "bundle.eotb",
                             content_key, suite=request.suite, progress=byte_progress)
        custom = ImageTargetCustom(
            name=manifest.name,
            version=manifest.version,
            hardware=manifest.hardware,
            release_counter=counter,
            plaintext_sha256=bundle.plaintext_sha256,
            plaintext_size=bundle.plaintext_size,
            inputs=manifest.inputs,
            outputs=manifest.outputs,
        )
        target = TargetFile(
            length=bundle.sealed_size,
            hashes={"sha256": bundle.sealed_sha256},
            path=target_path,
            unrecognized_fields={"custom": custom.to_custom()},
        )
        wrapped = wrap_content_key(content_key, _keywrap_key(config, client), SERVER_IDENTITY)
        say("uploading the bundle")
        client.upload_blob(bundle.path)
        for attempt in range(1, _STALE_RETRIES + 1):
            say("signing the hash bin")
            role, current_bin = verified_bin(config, target_path, work)
            new_bin = add_target_to_bin(current_bin, target_path, target,
                                        expires=now + BIN_VALIDITY)
            sign(new_bin, signer)
            body = {
                "name": request.name,
                "version": request.version,
                "target_path": target_path,
                "bundle_sha256": bundle.sealed_sha256,
                "bin_metadata": new_bin.to_dict(),
                "wrapped_content_key": base64.b64encode(wrapped).decode("ascii"),
                "allow_breaking": request.allow_breaking,
            }
            try:
                say(f"submitting {role} version {new_bin.signed.version}")
                created: dict[str, Any] = client.post("/api/v1/releases", body)  # a JSON object
            except ApiError as e:
                # Another release landed in the same bin first: re-sign on top of it.
                if e.code is not ErrorCode.STALE_BIN or attempt == _STALE_RETRIES:
                    raise
                logger.info("bin %s moved on; re-signing (attempt %d)", role, attempt + 1)
            else:
                return created
    raise AssertionError("unreachable")  # pragma: no cover


def sign_release(
    config: OperatorConfig,
    client: OperatorClient,
    release_id: int,
    *,
    key_index: int,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Add this release manager's signature to a pending release, after checking it."""
    say = progress or (lambda _message: None)
    signer = _release_signer(config, key_index)
    release = client.get(f"/api/v1/releases/{release_id}")
    if release["status"] != "pending" or release.get("pending_metadata") is None:
        raise PublishError(f"release {release_id} is {release['status']}, not pending")
    pending = Metadata[Targets].from_dict(release["pending_metadata"])
    say("checking the pending bin against the verified repository")
    with tempfile.TemporaryDirectory(prefix="edgeota-sign-") as scratch:
        role, current = verified_bin(config, release["target_path"], Path(scratch))
    if pending.signed.version != current.signed.version + 1:
        raise PublishError(
            f"pending {role} is version {pending.signed.version}, the repository is at "
            f"{current.signed.version}: the release must be published again"
        )
    added = set(pending.signed.targets) - set(current.signed.targets)
    removed = set(current.signed.targets) - set(pending.signed.targets)
    if added != {release["target_path"]} or removed:
        raise PublishError(f"pending {role} does not only add {release['target_path']}")
    target = pending.signed.targets[release["target_path"]]
    if target.length != release["length"] or target.hashes.get("sha256") != release["sha256"]:
        raise PublishError("pending target does not match the uploaded bundle")
    ImageTargetCustom.from_custom(target.custom)
    if signer.public_key.keyid in pending.signatures:
        raise PublishError(f"release {release_id} already carries this key's signature")
    sign(pending, signer)
    signed: dict[str, Any] = client.post(f"/api/v1/releases/{release_id}/signatures",
                                         {"bin_metadata": pending.to_dict()})  # a JSON object
    return signed
