"""Enrolment and fleet views of devices.

Tags are an operator's labels (``site=lab``) that deployments select by and
the dashboard shows. They come from whoever holds an operator token, so they
are bounded like any other input: at most :data:`MAX_TAGS`, each key matching
:data:`TAG_KEY_PATTERN` (a letter or digit, then letters, digits, ``_ . -``;
at most 64), each value at most :data:`MAX_TAG_VALUE` characters and free of
control characters (:data:`TAG_VALUE_PATTERN`). Values are shown escaped,
never trusted as markup.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from cryptography.hazmat.primitives.serialization import load_pem_public_key
from sqlalchemy import select
from sqlalchemy.orm import Session

from edgeota.protocol.errors import ProtocolError
from edgeota.protocol.identity import DevicePublicIdentity
from edgeota.server import audit
from edgeota.server.context import ServerContext
from edgeota.server.db.models import Assignment, AssignmentState, Device, Release
from edgeota.server.fleet_ca import FleetCAError, certificate_pem
from edgeota.server.services.errors import ConflictError, InvalidRequestError, NotFoundError
from edgeota.server.services.types import DeviceView, Enrolment, EnrolmentRequest
from edgeota.server.tokens import Role, issue_token

__all__ = [
    "MAX_TAGS",
    "MAX_TAG_VALUE",
    "TAG_KEY_PATTERN",
    "TAG_VALUE_PATTERN",
    "check_tags",
    "device_view",
    "enroll_device",
    "get_device",
    "list_devices",
]

MAX_TAGS = 32
MAX_TAG_VALUE = 128  # characters
TAG_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
TAG_VALUE_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]{0,128}$"
_TAG_KEY = re.compile(TAG_KEY_PATTERN)
_TAG_VALUE = re.compile(TAG_VALUE_PATTERN)


def check_tags(tags: Mapping[str, str], limit: int = MAX_TAGS) -> dict[str, str]:
    """``tags`` as a plain dict if every key and value is within bounds.

    Raises:
        InvalidRequestError: too many tags, or one whose key or value breaks the pattern.
    """
    if len(tags) > limit:
        raise InvalidRequestError(f"at most {limit} tags, not {len(tags)}")
    for key, value in tags.items():
        if not isinstance(key, str) or _TAG_KEY.fullmatch(key) is None:
            raise InvalidRequestError(
                f"tag key {str(key)[:80]!r} does not match {TAG_KEY_PATTERN}")
        if not isinstance(value, str) or _TAG_VALUE.fullmatch(value) is None:
            raise InvalidRequestError(
                f"tag {key}: the value must be at most {MAX_TAG_VALUE} characters without "
                "control characters")
    return dict(tags)


def enroll_device(
    ctx: ServerContext, session: Session, actor: str, request: EnrolmentRequest
) -> Enrolment:
    """Register a device, issue its broker certificate and API token, open its director repo.

    The private keys never reach the server: the operator's CLI generated
    them and sends only the public identity and the TLS public key.
    """
    tags = check_tags(request.tags)
    try:
        identity = DevicePublicIdentity.from_dict(request.identity)
    except ProtocolError as e:
        raise InvalidRequestError(f"device identity: {e}") from e
    if identity.device_id != request.device_id:
        raise InvalidRequestError(
            f"identity is for {identity.device_id!r}, the request enrols {request.device_id!r}"
        )
    if session.get(Device, request.device_id) is not None:
        raise ConflictError(f"device {request.device_id} is already enrolled")
    try:
        tls_key = load_pem_public_key(request.tls_public_key_pem.encode("ascii"))
        certificate = ctx.ca.issue_device_certificate(request.device_id, tls_key)  # type: ignore[arg-type]
    except (ValueError, TypeError, FleetCAError) as e:
        raise InvalidRequestError(f"TLS public key: {e}") from e
    stored_identity = DevicePublicIdentity(
        device_id=identity.device_id,
        kem_public_key=identity.kem_public_key,
        report_public_key=identity.report_public_key,
        tls_public_key_pem=request.tls_public_key_pem,
    )
    cert_pem = certificate_pem(certificate).decode("ascii")
    session.add(
        Device(
            id=request.device_id,
            hardware=request.hardware,
            tags=tags,
            identity=stored_identity.to_dict(),
            tls_cert_pem=cert_pem,
        )
    )
    session.flush()
    _, token = issue_token(
        session, name=f"device:{request.device_id}", role=Role.DEVICE,
        device_id=request.device_id,
    )
    ctx.director.ensure_device(request.device_id)
    audit.append(
        session,
        actor=actor,
        action="device.enroll",
        subject=request.device_id,
        detail={"hardware": request.hardware, "tags": tags},
    )
    return Enrolment(
        device_id=request.device_id,
        token=token,
        certificate_pem=cert_pem,
        ca_pem=ctx.ca.certificate_pem().decode("ascii"),
        image_root=ctx.image.root_bytes().decode("utf-8"),
        director_root=ctx.director.root_bytes().decode("utf-8"),
        repository_url=ctx.config.public_url + "/repo",
        mqtt_url=ctx.config.mqtt_device_url,
    )


def _current_assignments(session: Session, device_ids: list[str]) -> dict[str, dict[str, str]]:
    """device id -> {model name: version} of its live (not superseded) assignments."""
    rows = session.execute(
        select(Assignment.device_id, Assignment.model_name, Release.version, Assignment.id)
        .join(Release, Release.id == Assignment.release_id)
        .where(Assignment.device_id.in_(device_ids))
        .where(Assignment.state != AssignmentState.SUPERSEDED)
        .order_by(Assignment.id)
    ).all()
    result: dict[str, dict[str, str]] = {}
    for device_id, model_name, version, _ in rows:
        result.setdefault(device_id, {})[model_name] = version
    return result


def device_view(device: Device, assigned: dict[str, str]) -> DeviceView:
    return DeviceView(
        id=device.id,
        hardware=device.hardware,
        tags=device.tags,
        enrolled_at=device.enrolled_at,
        last_seen=device.last_seen,
        online=device.online,
        reported_state=device.reported_state,
        assigned=assigned,
    )


def list_devices(session: Session) -> list[DeviceView]:
    devices = list(session.scalars(select(Device).order_by(Device.id)))
    assigned = _current_assignments(session, [d.id for d in devices])
    return [device_view(d, assigned.get(d.id, {})) for d in devices]


def get_device(session: Session, device_id: str) -> DeviceView:
    device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"no device {device_id!r}")
    return device_view(device, _current_assignments(session, [device_id]).get(device_id, {}))
