"""Accepting releases: the server's second check before anything reaches a repository.

The operator's CLI already validated and signed the release. The server does
not take its word for it: it verifies the release signatures against the image
root's delegation, opens the bundle with the content key (wrapped to the
server), checks that the bundle, the signed target and the manifest agree,
re-validates the model in onnxruntime, and checks compatibility with the
model's previous release. Only then does the target enter the image
repository. A refused release leaves no trace in the repositories; the
refusal itself is recorded in the audit log.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgeota.protocol.bundle import open_bundle
from edgeota.protocol.errors import ProtocolError
from edgeota.protocol.identity import SERVER_IDENTITY
from edgeota.protocol.keywrap import unwrap_content_key
from edgeota.protocol.manifest import Manifest
from edgeota.protocol.targets_custom import ImageTargetCustom, target_path_for
from edgeota.runtime.validation import (
    IncompatibleSignatureError,
    ValidationError,
    check_compatible,
    validate_model,
)
from edgeota.server import audit
from edgeota.server.context import ServerContext
from edgeota.server.db.models import Release, ReleaseStatus
from edgeota.server.db.session import lock
from edgeota.server.repo.image import BinCheck, StaleMetadataError, merge_signatures
from edgeota.server.repo.storage import RepoError, UploadArea, UploadQuotaError
from edgeota.server.services.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    QuotaExceededError,
    ReleaseRefusedError,
    StaleBinError,
)
from edgeota.server.services.types import ReleaseSubmission, ReleaseView

__all__ = [
    "add_signature",
    "get_release",
    "latest_published",
    "list_releases",
    "make_room_for_upload",
    "release_view",
    "submit_release",
    "sweep_uploads",
    "upload_area",
]

logger = logging.getLogger(__name__)


def upload_area(ctx: ServerContext) -> UploadArea:
    """The uploads folder with the quota and age limit of ``[uploads]``."""
    limits = ctx.config.uploads
    return UploadArea(ctx.uploads_dir, limits.quota_bytes, limits.stale_hours * 3600)


def _pending_uploads(session: Session) -> set[str]:
    return set(session.scalars(
        select(Release.sha256).where(Release.status == ReleaseStatus.PENDING)))


def sweep_uploads(ctx: ServerContext) -> list[str]:
    """Remove uploads (and leftovers of crashed ones) no pending release needs, once stale."""
    with ctx.sessions() as session, session.begin():
        keep = _pending_uploads(session)
    removed = upload_area(ctx).sweep(keep)
    if removed:
        logger.info("removed %d stale uploads", len(removed))
    return removed


def make_room_for_upload(ctx: ServerContext, declared: int) -> UploadArea:
    """Sweep stale uploads, then refuse an upload of ``declared`` bytes the quota cannot hold.

    Raises:
        QuotaExceededError: the uploads folder has no room for it.
    """
    sweep_uploads(ctx)
    area = upload_area(ctx)
    try:
        area.check_room(declared)
    except UploadQuotaError as e:
        raise QuotaExceededError(str(e)) from e
    return area


def _discard_refused_upload(ctx: ServerContext, session: Session, sha256: str) -> None:
    """A refused bundle is never needed again, unless a pending release holds the same bytes."""
    if sha256 not in _pending_uploads(session):
        upload_area(ctx).remove(sha256)


def _upload_path(ctx: ServerContext, sha256: str) -> Path:
    path = ctx.uploads_dir / sha256
    if not path.is_file():
        raise InvalidRequestError(f"no uploaded bundle with sha256 {sha256}: upload it first")
    return path


def latest_published(session: Session, name: str) -> Release | None:
    return session.scalars(
        select(Release)
        .where(Release.name == name, Release.status == ReleaseStatus.PUBLISHED)
        .order_by(Release.published_at.desc(), Release.id.desc())
        .limit(1)
    ).first()


def _decode_bin(bin_metadata: dict[str, Any]) -> bytes:
    return json.dumps(bin_metadata, separators=(",", ":"), sort_keys=True).encode("utf-8")


def _check_and_open(
    ctx: ServerContext,
    session: Session,
    request: ReleaseSubmission,
    upload: Path,
    bin_bytes: bytes,
) -> tuple[BinCheck, ImageTargetCustom, Manifest, bytes]:
    """Every check that needs no write; returns (bin check, custom, manifest, wrapped key)."""
    try:
        check = ctx.image.check_bin_update(bin_bytes)
    except StaleMetadataError as e:
        raise StaleBinError(f"{e}; re-run `edgeota release publish` to re-sign") from e
    except RepoError as e:
        raise ReleaseRefusedError(f"release metadata refused: {e}") from e
    expected_path = target_path_for(request.name, request.version)
    if request.target_path != expected_path:
        raise ReleaseRefusedError(f"target path must be {expected_path!r}")
    if set(check.added_targets) != {expected_path}:
        raise ReleaseRefusedError(
            f"the signed bin must add exactly {expected_path!r}, it adds "
            f"{sorted(check.added_targets)}"
        )
    target = check.added_targets[expected_path]
    size = upload.stat().st_size
    if target.length != size or target.hashes.get("sha256") != request.bundle_sha256:
        raise ReleaseRefusedError(
            "the signed target's length/sha256 do not match the uploaded bundle"
        )
    try:
        custom = ImageTargetCustom.from_custom(target.custom)
    except ProtocolError as e:
        raise ReleaseRefusedError(str(e)) from e
    if (custom.name, custom.version) != (request.name, request.version):
        raise ReleaseRefusedError("the signed target names another model or version")
    try:
        wrapped = base64.b64decode(request.wrapped_content_key, validate=True)
        content_key = unwrap_content_key(wrapped, ctx.keywrap_key, SERVER_IDENTITY)
    except (binascii.Error, ValueError, ProtocolError) as e:
        raise ReleaseRefusedError(f"content key: {e}") from e
    with tempfile.TemporaryDirectory(dir=ctx.uploads_dir) as scratch:
        try:
            opened = open_bundle(
                upload,
                content_key,
                Path(scratch) / "bundle",
                expected_sealed_sha256=request.bundle_sha256,
                expected_plaintext_sha256=custom.plaintext_sha256,
            )
        except ProtocolError as e:
            raise ReleaseRefusedError(f"bundle does not open: {e}") from e
        manifest = opened.manifest
        mismatches = [
            name
            for name, ours, theirs in (
                ("name", manifest.name, custom.name),
                ("version", manifest.version, custom.version),
                ("hardware", manifest.hardware, custom.hardware),
                ("inputs", manifest.inputs, custom.inputs),
                ("outputs", manifest.outputs, custom.outputs),
            )
            if ours != theirs
        ]
        if mismatches:
            raise ReleaseRefusedError(
                f"manifest and signed target disagree on {', '.join(mismatches)}"
            )
        # Latency depends on the device's hardware, not the server's: devices
        # enforce the budget in their own validation gate.
        server_view = dataclasses.replace(manifest, latency_budget_ms=None)
        try:
            validate_model(opened.model_path, server_view, latency_runs=1)
        except ValidationError as e:
            raise ReleaseRefusedError(f"model fails validation ({e.reason}): {e}") from e
    previous = latest_published(session, request.name)
    if previous is not None and not request.allow_breaking:
        try:
            check_compatible(Manifest.from_dict(previous.manifest), manifest)
        except IncompatibleSignatureError as e:
            raise ReleaseRefusedError(
                f"incompatible with {previous.name} {previous.version}: {e} "
                "(publish with --allow-breaking if intended)"
            ) from e
    return check, custom, manifest, wrapped


def _publish(ctx: ServerContext, release: Release, upload: Path, bin_bytes: bytes) -> None:
    # Every check passed before this point; the target file is content-addressed,
    # so it is never removed again (another release may share its bytes).
    ctx.store.put_target(release.target_path, upload)
    ctx.image.publish_bin(bin_bytes)
    release.status = ReleaseStatus.PUBLISHED
    release.published_at = ctx.clock()
    release.pending_metadata = None
    upload.unlink(missing_ok=True)


def submit_release(
    ctx: ServerContext, session: Session, actor: str, request: ReleaseSubmission
) -> ReleaseView:
    started = time.perf_counter()
    lock(session, "image")
    duplicate = session.scalars(
        select(Release).where(Release.name == request.name, Release.version == request.version)
    ).first()
    if duplicate is not None:
        raise ConflictError(
            f"{request.name} {request.version} already exists (release {duplicate.id}, "
            f"{duplicate.status}): versions are immutable"
        )
    upload = _upload_path(ctx, request.bundle_sha256)
    bin_bytes = _decode_bin(request.bin_metadata)
    try:
        check, custom, manifest, wrapped = _check_and_open(ctx, session, request, upload,
                                                           bin_bytes)
    except ReleaseRefusedError:
        # Refused for good (a stale bin is not: the publisher re-signs and submits again).
        _discard_refused_upload(ctx, session, request.bundle_sha256)
        raise
    release = Release(
        name=request.name,
        version=request.version,
        release_counter=custom.release_counter,
        target_path=request.target_path,
        length=upload.stat().st_size,
        sha256=request.bundle_sha256,
        plaintext_sha256=custom.plaintext_sha256,
        plaintext_size=custom.plaintext_size,
        manifest=manifest.to_dict(),
        wrapped_content_key=wrapped,
        bin_role=check.role,
        bin_version=check.version,
        status=ReleaseStatus.PENDING,
        created_by=actor,
        created_at=ctx.clock(),
    )
    session.add(release)
    if check.complete:
        _publish(ctx, release, upload, bin_bytes)
    else:
        release.pending_metadata = bin_bytes
    session.flush()
    audit.append(
        session,
        actor=actor,
        action="release.publish" if check.complete else "release.pending",
        subject=f"{release.name}@{release.version}",
        detail={
            "release_id": release.id,
            "target_path": release.target_path,
            "sha256": release.sha256,
            "release_counter": release.release_counter,
            "signatures": len(check.valid_keyids),
            "threshold": check.threshold,
            "allow_breaking": request.allow_breaking,
        },
    )
    ctx.metrics.publish_seconds.observe(time.perf_counter() - started)
    return release_view(release, signatures=len(check.valid_keyids), threshold=check.threshold)


def add_signature(
    ctx: ServerContext, session: Session, actor: str, release_id: int,
    bin_metadata: dict[str, Any],
) -> ReleaseView:
    """Merge another release manager's signature into a pending release (k-of-n)."""
    lock(session, "image")
    release = session.get(Release, release_id)
    if release is None:
        raise NotFoundError(f"no release {release_id}")
    if release.status != ReleaseStatus.PENDING or release.pending_metadata is None:
        raise ConflictError(f"release {release_id} is {release.status}, not pending")
    try:
        merged = merge_signatures(release.pending_metadata, _decode_bin(bin_metadata))
        check = ctx.image.check_bin_update(merged)
    except StaleMetadataError as e:
        raise StaleBinError(
            f"signature refused: {e} (the bin moved on: publish the release again)") from e
    except RepoError as e:
        raise ConflictError(
            f"signature refused: {e} (if the bin moved on, publish the release again)"
        ) from e
    upload = _upload_path(ctx, release.sha256)
    if check.complete:
        _publish(ctx, release, upload, merged)
    else:
        release.pending_metadata = merged
    audit.append(
        session,
        actor=actor,
        action="release.sign",
        subject=f"{release.name}@{release.version}",
        detail={"release_id": release.id, "signatures": len(check.valid_keyids),
                "threshold": check.threshold, "published": check.complete},
    )
    return release_view(release, signatures=len(check.valid_keyids), threshold=check.threshold)


def release_view(
    release: Release,
    *,
    signatures: int | None = None,
    threshold: int | None = None,
    detail: bool = False,
) -> ReleaseView:
    return ReleaseView(
        id=release.id,
        name=release.name,
        version=release.version,
        status=str(release.status),
        target_path=release.target_path,
        release_counter=release.release_counter,
        length=release.length,
        sha256=release.sha256,
        bin_role=release.bin_role,
        bin_version=release.bin_version,
        signatures=signatures,
        threshold=threshold,
        created_at=release.created_at,
        created_by=release.created_by,
        published_at=release.published_at,
        manifest=release.manifest if detail else None,
        pending_metadata=(
            json.loads(release.pending_metadata)
            if detail and release.pending_metadata is not None else None
        ),
    )


def list_releases(session: Session, name: str | None = None) -> list[ReleaseView]:
    query = select(Release).order_by(Release.id)
    if name is not None:
        query = query.where(Release.name == name)
    return [release_view(r) for r in session.scalars(query)]


def get_release(session: Session, release_id: int) -> ReleaseView:
    release = session.get(Release, release_id)
    if release is None:
        raise NotFoundError(f"no release {release_id}")
    return release_view(release, detail=True)
