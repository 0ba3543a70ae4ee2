"""Request and response bodies of the ``/api/v1`` API (pydantic).

Parsed at the boundary: FastAPI answers 422 with the field and the reason for
anything malformed, so services only ever see typed, bounded values. The
schemas are the HTTP layer's own: request bodies become the services' request
types (``to_request``), and the services' views become responses through
``model_validate(view)`` (``from_attributes``); services never import this module.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from edgeota.server.services.devices import (
    MAX_TAG_VALUE,
    MAX_TAGS,
    TAG_KEY_PATTERN,
    TAG_VALUE_PATTERN,
)
from edgeota.server.services.types import (
    DeploymentRequest,
    EnrolmentRequest,
    ReleaseSubmission,
    RolloutPolicy,
)

_ID = r"^[a-z0-9-]{1,64}$"
_NAME = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_SHA256 = r"^[0-9a-f]{64}$"
# Tag keys and values, as server.services.devices documents and checks them.
TagKey = Annotated[str, StringConstraints(pattern=TAG_KEY_PATTERN, min_length=1, max_length=64)]
TagValue = Annotated[str, StringConstraints(pattern=TAG_VALUE_PATTERN, max_length=MAX_TAG_VALUE)]


class Strict(BaseModel):
    """A request body: unknown fields are refused, and so are NaN and infinities."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class View(BaseModel):
    """A response body, read from a service's view dataclass."""

    model_config = ConfigDict(from_attributes=True)


class EnrollRequest(Strict):
    device_id: str = Field(pattern=_ID)
    hardware: str = Field(pattern=_NAME)
    tags: dict[TagKey, TagValue] = Field(default_factory=dict, max_length=MAX_TAGS)
    identity: dict[str, Any]
    tls_public_key_pem: str = Field(max_length=4096)

    def to_request(self) -> EnrolmentRequest:
        return EnrolmentRequest(device_id=self.device_id, hardware=self.hardware,
                                identity=self.identity, tls_public_key_pem=self.tls_public_key_pem,
                                tags=dict(self.tags))


class EnrollResponse(View):
    device_id: str
    token: str
    certificate_pem: str
    ca_pem: str
    image_root: str
    director_root: str
    repository_url: str
    mqtt_url: str | None = None


class DeviceOut(View):
    id: str
    hardware: str
    tags: dict[str, str]
    enrolled_at: datetime
    last_seen: datetime | None
    online: bool
    reported_state: dict[str, Any] | None
    assigned: dict[str, str] = Field(default_factory=dict)  # model name -> version


class ReleaseSubmit(Strict):
    name: str = Field(pattern=_NAME)
    version: str = Field(max_length=128)
    target_path: str = Field(max_length=256)
    bundle_sha256: str = Field(pattern=_SHA256)
    bin_metadata: dict[str, Any]
    wrapped_content_key: str = Field(max_length=8192)  # base64, wrapped to the server's key
    allow_breaking: bool = False

    def to_request(self) -> ReleaseSubmission:
        return ReleaseSubmission(**self.model_dump())


class ReleaseSignature(Strict):
    bin_metadata: dict[str, Any]


class ReleaseOut(View):
    id: int
    name: str
    version: str
    status: str
    target_path: str
    release_counter: int
    length: int
    sha256: str
    bin_role: str
    bin_version: int
    signatures: int | None = None
    threshold: int | None = None
    created_at: datetime
    created_by: str
    published_at: datetime | None
    manifest: dict[str, Any] | None = None
    pending_metadata: dict[str, Any] | None = None


class RolloutOptions(Strict):
    """How a deployment advances, pauses and rolls back (every field bounded)."""

    soak_seconds: float = Field(default=0.0, ge=0, le=30 * 24 * 3600)
    min_success_ratio: float = Field(default=0.95, ge=0, le=1)
    max_failure_ratio: float = Field(default=0.05, ge=0, le=1)
    # Model-aware gates: the new release's p95 latency / error rate on a
    # hardware class, against the same devices on their previous release.
    latency_factor: float | None = Field(default=2.0, gt=1, le=1000)
    error_rate_factor: float | None = Field(default=2.0, gt=1, le=1000)
    gate_min_inferences: int = Field(default=20, ge=1, le=10_000_000)
    auto_rollback: bool = False

    def to_policy(self) -> RolloutPolicy:
        return RolloutPolicy(**self.model_dump())


class DeployRequest(Strict):
    name: str = Field(pattern=_NAME)
    version: str = Field(max_length=128)
    devices: list[str] = Field(default_factory=list, max_length=100_000)
    tags: dict[TagKey, TagValue] = Field(default_factory=dict, max_length=16)
    # Cumulative percentages of the selected devices, strictly increasing, ending at 100.
    phases: list[int] = Field(default_factory=lambda: [100], min_length=1, max_length=20)
    options: RolloutOptions = Field(default_factory=RolloutOptions)

    def to_request(self) -> DeploymentRequest:
        return DeploymentRequest(name=self.name, version=self.version,
                                 devices=tuple(self.devices), tags=dict(self.tags),
                                 phases=tuple(self.phases), options=self.options.to_policy())


class DeployResponse(View):
    deployment_id: int
    release: str
    target_path: str
    assigned: list[str]  # devices of the first phase, assigned now
    scheduled: dict[str, int] = Field(default_factory=dict)  # device -> phase index
    skipped: dict[str, str]
    superseded: list[int]
    phases: list[int] = Field(default_factory=lambda: [100])
    # Devices of the first phase whose director metadata could not be signed or written:
    # they wait, and the rollout engine tries them again (device -> reason).
    failed: dict[str, str] = Field(default_factory=dict)


class AssignmentOut(View):
    device_id: str
    hardware: str
    phase: int
    state: str
    detail: str | None
    previous_version: str | None
    assigned_at: datetime | None
    finished_at: datetime | None


class PhaseOut(View):
    index: int
    percent: int
    started: bool
    counts: dict[str, int]
    devices: list[AssignmentOut]


class DeploymentEventOut(View):
    at: datetime
    kind: str
    actor: str
    detail: dict[str, Any]


class DeploymentOut(View):
    id: int
    release: str
    model_name: str
    selector: dict[str, Any]
    status: str
    status_reason: str | None
    phases: list[int]
    current_phase: int
    phase_started_at: datetime | None
    options: dict[str, Any]
    created_at: datetime
    created_by: str
    finished_at: datetime | None
    superseded_by: int | None
    counts: dict[str, int]
    phase_detail: list[PhaseOut] = Field(default_factory=list)
    events: list[DeploymentEventOut] = Field(default_factory=list)


class RolloutActionOut(View):
    deployment_id: int
    action: str
    status: str
    devices: list[str] = Field(default_factory=list)  # rolled back
    skipped: dict[str, str] = Field(default_factory=dict)  # device -> why not


class TokenCreate(Strict):
    name: str = Field(min_length=1, max_length=128)
    role: str


class TokenOut(BaseModel):
    id: int
    name: str
    role: str
    token: str | None = None


class AuditOut(BaseModel):
    ok: bool
    entries: int
    first_bad_id: int | None
    reason: str
    head_hash: str | None = None


class FieldError(BaseModel):
    """One reason a request's fields were refused (never the input itself)."""

    type: str
    loc: list[str | int]
    msg: str


class ErrorOut(BaseModel):
    """Every error body: a sentence (or, for 422 ``invalid_body``, the fields) and a code."""

    detail: str | list[FieldError]
    code: str  # an ErrorCode value: clients decide on this, never on ``detail``
