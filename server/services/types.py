"""What services take and give back: plain dataclasses, no HTTP in them.

The HTTP layer (``edgeota.server.api``) parses request bodies into its
pydantic schemas, bounded and typed at the boundary, converts them into the
requests here, and renders the views here back into its response schemas
(``Model.model_validate(view, from_attributes=True)``). Services therefore do
not depend on the layer above them: the rollout engine, the MQTT ingest, the
benchmarks and the tests call them with these types and no FastAPI in sight.

Field names match the JSON the API answers with, so the conversion is a copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import Any

__all__ = [
    "AssignmentView",
    "DeployResult",
    "DeploymentEventView",
    "DeploymentRequest",
    "DeploymentView",
    "DeviceView",
    "Enrolment",
    "EnrolmentRequest",
    "PhaseView",
    "ReleaseSubmission",
    "ReleaseView",
    "RolloutActionResult",
    "RolloutPolicy",
]


# -- devices ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnrolmentRequest:
    """A device to register: its id, hardware class, tags and public keys."""

    device_id: str
    hardware: str
    identity: Mapping[str, Any]  # DevicePublicIdentity.to_dict()
    tls_public_key_pem: str
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Enrolment:
    """What a freshly enrolled device needs, answered once (the token is not kept)."""

    device_id: str
    token: str
    certificate_pem: str
    ca_pem: str
    image_root: str
    director_root: str
    repository_url: str
    mqtt_url: str | None = None


@dataclass(frozen=True)
class DeviceView:
    id: str
    hardware: str
    tags: dict[str, str]
    enrolled_at: datetime
    last_seen: datetime | None
    online: bool
    reported_state: dict[str, Any] | None
    assigned: dict[str, str] = field(default_factory=dict)  # model name -> version


# -- releases -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseSubmission:
    """A signed release: the uploaded bundle's digest, the signed bin, the wrapped key."""

    name: str
    version: str
    target_path: str
    bundle_sha256: str
    bin_metadata: dict[str, Any]
    wrapped_content_key: str  # base64, wrapped to the server's key-wrap key
    allow_breaking: bool = False


@dataclass(frozen=True)
class ReleaseView:
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
    created_at: datetime
    created_by: str
    published_at: datetime | None
    signatures: int | None = None
    threshold: int | None = None
    manifest: dict[str, Any] | None = None
    pending_metadata: dict[str, Any] | None = None


# -- deployments and rollouts ---------------------------------------------------------------


@dataclass(frozen=True)
class RolloutPolicy:
    """How a deployment advances, pauses and rolls back.

    Stored with the deployment (:meth:`to_stored`) and read back by the engine
    on every pass (:meth:`from_stored`); the bounds are the API's to enforce.
    """

    soak_seconds: float = 0.0
    min_success_ratio: float = 0.95
    max_failure_ratio: float = 0.05
    # Model-aware gates: the new release's p95 latency / error rate on a hardware
    # class, against the same devices on their previous release (None: off).
    latency_factor: float | None = 2.0
    error_rate_factor: float | None = 2.0
    gate_min_inferences: int = 20
    auto_rollback: bool = False

    def to_stored(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_stored(cls, stored: Mapping[str, Any]) -> RolloutPolicy:
        """The policy in a deployment's ``options``, which also carries the engine's notes."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in stored.items() if k in names})


@dataclass(frozen=True)
class DeploymentRequest:
    """A release to roll out, to devices named by id or by tags, in cumulative phases."""

    name: str
    version: str
    devices: tuple[str, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)
    phases: tuple[int, ...] = (100,)  # cumulative percentages, ending at 100
    options: RolloutPolicy = field(default_factory=RolloutPolicy)


@dataclass(frozen=True)
class DeployResult:
    deployment_id: int
    release: str
    target_path: str
    assigned: list[str]  # devices of the first phase, assigned now
    skipped: dict[str, str]  # device -> why it is not eligible
    superseded: list[int]
    scheduled: dict[str, int] = field(default_factory=dict)  # device -> phase index
    phases: list[int] = field(default_factory=lambda: [100])
    # Devices of the first phase whose director metadata could not be signed or
    # written: they wait, and the rollout engine tries them again (device -> reason).
    failed: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AssignmentView:
    device_id: str
    hardware: str
    phase: int
    state: str
    detail: str | None
    previous_version: str | None
    assigned_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class PhaseView:
    index: int
    percent: int
    started: bool
    counts: dict[str, int]
    devices: list[AssignmentView]


@dataclass(frozen=True)
class DeploymentEventView:
    at: datetime
    kind: str
    actor: str
    detail: dict[str, Any]


@dataclass
class DeploymentView:
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
    phase_detail: list[PhaseView] = field(default_factory=list)
    events: list[DeploymentEventView] = field(default_factory=list)


@dataclass(frozen=True)
class RolloutActionResult:
    deployment_id: int
    action: str
    status: str
    devices: list[str] = field(default_factory=list)  # rolled back
    skipped: dict[str, str] = field(default_factory=dict)  # device -> why not
