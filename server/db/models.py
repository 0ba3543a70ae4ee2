"""The server's database schema as SQLAlchemy 2.x declarative models.

These classes are storage only: they say what is kept and which invariants the
database itself enforces (uniqueness, foreign keys, closed vocabularies as
CHECK constraints). Decisions -- may this token do that, is this release
valid, which phase is next -- live in the services that use them.

Portability between SQLite (the default) and PostgreSQL (replicas) is a rule
here, so only generic types are used: ``JSON`` (``json`` on PostgreSQL, text on
SQLite), ``LargeBinary`` (``bytea`` / ``BLOB``), ``BigInteger`` for sizes, and
:class:`UTCDateTime` for every instant. Closed vocabularies are stored as
``VARCHAR`` plus a CHECK constraint (``native_enum=False``) rather than a
PostgreSQL ``ENUM`` type, so adding a value is an ordinary migration on both
databases.

The schema changes only through Alembic migrations
(``edgeota.server.db.migrations``); ``tests/test_db.py`` compares these models
with the migrated schema so the two cannot drift apart unnoticed.

JSON columns do not track in-place mutation: assign a new value
(``device.tags = {**device.tags, "site": "b"}``) rather than editing the dict,
or SQLAlchemy will not see the change.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Dialect,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, validates
from sqlalchemy.types import DateTime

from edgeota.protocol.identity import validate_device_id

__all__ = [
    "NAMING_CONVENTION",
    "ROLE_VALUES",
    "ApiToken",
    "Assignment",
    "AssignmentState",
    "AuditEntry",
    "Base",
    "Deployment",
    "DeploymentStatus",
    "Device",
    "Release",
    "ReleaseStatus",
    "RepoLock",
    "StatusEvent",
    "UTCDateTime",
    "utcnow",
]

# Deterministic constraint names, identical on SQLite and PostgreSQL, so a
# later migration can drop or alter a constraint by name on both.
NAMING_CONVENTION: Mapping[str, str] = MappingProxyType(
    {
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# API token roles as stored. ``edgeota.server.tokens.Role`` is the policy
# (ordering, ``allows``); it is defined there, not here, because it is logic
# and the token service imports these models. A test checks the two agree.
ROLE_VALUES: tuple[str, ...] = ("viewer", "operator", "release-manager", "admin", "device")

_DEVICE_ID_LENGTH = 64  # edgeota.protocol.identity.DEVICE_ID_PATTERN allows at most 64
_NAME_LENGTH = 128  # model names, token names, actors
_VERSION_LENGTH = 64
_PATH_LENGTH = 255
_SHA256_HEX_LENGTH = 64
_ENUM_LENGTH = 32  # room for values added by later migrations without widening the column


def utcnow() -> datetime:
    """The current instant, tz-aware in UTC: the default for every timestamp column."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """An instant stored in UTC and always returned tz-aware in UTC.

    PostgreSQL keeps ``timestamp with time zone`` and returns aware values in
    the session's time zone; SQLite has no time zone type and returns naive
    values. Normalising here means every reader gets the same thing on both.

    Naive datetimes are refused on write (``ValueError``): a naive value has no
    defined instant, and guessing "local" or "UTC" is how skewed timestamps get
    into an audit trail.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime, got {type(value).__name__}")
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("naive datetime refused: pass a tz-aware value (UTC)")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            # SQLite's DATETIME text has no offset; store the UTC wall time.
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _str_enum(enum_cls: type[enum.StrEnum], name: str) -> Enum:
    """A portable enum column: VARCHAR plus a CHECK constraint, storing the values."""
    return Enum(
        enum_cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=_ENUM_LENGTH,
        values_callable=lambda members: [member.value for member in members],
        validate_strings=True,
    )


class ReleaseStatus(enum.StrEnum):
    """Where a release stands: only ``published`` ones are in the image repository."""

    PENDING = "pending"  # waiting for more release-manager signatures (k-of-n)
    PUBLISHED = "published"
    REFUSED = "refused"  # failed the server's re-validation; kept for the audit trail


class DeploymentStatus(enum.StrEnum):
    """Lifecycle of a deployment (a rollout of one release to a selection of devices)."""

    ACTIVE = "active"
    PAUSED = "paused"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"  # a newer deployment of the same model took over its devices


class AssignmentState(enum.StrEnum):
    """Server-side view of one device's progress within one deployment."""

    WAITING = "waiting"  # its phase has not started: not in the director yet
    PENDING = "pending"  # assigned in the director, no report on this release yet
    DOWNLOADING = "downloading"
    INSTALLED = "installed"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    SUPERSEDED = "superseded"


class Base(DeclarativeBase):
    """Declarative base carrying the naming convention (the migrations rely on it)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Device(Base):
    """An enrolled device: its public identity, tags and last accepted report."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(_DEVICE_ID_LENGTH), primary_key=True)
    hardware: Mapped[str] = mapped_column(String(_NAME_LENGTH))
    tags: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    # DevicePublicIdentity.to_dict(): public keys only, never private material.
    identity: Mapped[dict[str, Any]] = mapped_column(JSON)
    tls_cert_pem: Mapped[str | None] = mapped_column(Text, default=None)
    enrolled_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    # The last accepted (signature-checked) status report body; SQL NULL until one arrives.
    reported_state: Mapped[dict[str, Any] | None] = mapped_column(
        JSON(none_as_null=True), default=None
    )
    # Highest accepted report sequence number: a replayed older report is refused.
    report_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    # Bit k: report report_seq - 1 - k was accepted (late reports get in once; see reports.py).
    report_seq_window: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)

    @validates("id")
    def _check_id(self, _key: str, value: str) -> str:
        # Ids reach MQTT topics, file names and certificate CNs: refuse bad ones early.
        return validate_device_id(value)


class Release(Base):
    """A model release uploaded by a release manager: the sealed bundle's facts and keys."""

    __tablename__ = "releases"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(_NAME_LENGTH))
    version: Mapped[str] = mapped_column(String(_VERSION_LENGTH))
    # Security floor (DESIGN "Trust model"), not the model version.
    release_counter: Mapped[int] = mapped_column(Integer)
    target_path: Mapped[str] = mapped_column(String(_PATH_LENGTH), unique=True)
    length: Mapped[int] = mapped_column(BigInteger)  # bytes of the sealed bundle
    sha256: Mapped[str] = mapped_column(String(_SHA256_HEX_LENGTH))  # of the sealed bundle
    plaintext_sha256: Mapped[str] = mapped_column(String(_SHA256_HEX_LENGTH))
    plaintext_size: Mapped[int] = mapped_column(BigInteger)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    # The content key wrapped to the server's key-wrap key; never stored in clear.
    wrapped_content_key: Mapped[bytes] = mapped_column(LargeBinary)
    bin_role: Mapped[str] = mapped_column(String(_NAME_LENGTH))
    bin_version: Mapped[int] = mapped_column(Integer)
    # Partially signed bin metadata while k-of-n signatures are being collected.
    pending_metadata: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    status: Mapped[ReleaseStatus] = mapped_column(
        _str_enum(ReleaseStatus, "release_status"), default=ReleaseStatus.PENDING
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[str] = mapped_column(String(_NAME_LENGTH))
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


class Deployment(Base):
    """A staged rollout of one release to the devices a selector picks."""

    __tablename__ = "deployments"
    __table_args__ = (Index(None, "model_name", "status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id"))
    model_name: Mapped[str] = mapped_column(String(_NAME_LENGTH))
    selector: Mapped[dict[str, Any]] = mapped_column(JSON)  # device ids, tags or group
    phases: Mapped[list[int]] = mapped_column(JSON)  # cumulative percentages, e.g. [10, 50, 100]
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # soak, ratios, ...
    status: Mapped[DeploymentStatus] = mapped_column(
        _str_enum(DeploymentStatus, "deployment_status"), default=DeploymentStatus.ACTIVE
    )
    status_reason: Mapped[str | None] = mapped_column(Text, default=None)
    superseded_by: Mapped[int | None] = mapped_column(ForeignKey("deployments.id"), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[str] = mapped_column(String(_NAME_LENGTH))
    current_phase: Mapped[int] = mapped_column(Integer, default=0)  # index into phases
    phase_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)

    release: Mapped[Release] = relationship(foreign_keys=[release_id])


class DeploymentEvent(Base):
    """What happened to a rollout and why: phase started, paused by a gate, rolled back..."""

    __tablename__ = "deployment_events"
    __table_args__ = (Index(None, "deployment_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    deployment_id: Mapped[int] = mapped_column(ForeignKey("deployments.id"))
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(_ENUM_LENGTH))
    actor: Mapped[str] = mapped_column(String(_NAME_LENGTH))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Assignment(Base):
    """One device's part in one deployment; at most one per (deployment, device)."""

    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("deployment_id", "device_id"),
        Index(None, "device_id", "model_name"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    deployment_id: Mapped[int] = mapped_column(ForeignKey("deployments.id"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id"))
    model_name: Mapped[str] = mapped_column(String(_NAME_LENGTH))
    phase: Mapped[int] = mapped_column(Integer)  # index into Deployment.phases
    state: Mapped[AssignmentState] = mapped_column(
        _str_enum(AssignmentState, "assignment_state"), default=AssignmentState.PENDING
    )
    detail: Mapped[str | None] = mapped_column(Text, default=None)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    # The release of this model the device had before (what a rollback assigns).
    previous_release_id: Mapped[int | None] = mapped_column(
        ForeignKey("releases.id"), default=None)
    assigned_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)

    deployment: Mapped[Deployment] = relationship(foreign_keys=[deployment_id])
    device: Mapped[Device] = relationship(foreign_keys=[device_id])
    release: Mapped[Release] = relationship(foreign_keys=[release_id])
    previous_release: Mapped[Release | None] = relationship(
        foreign_keys=[previous_release_id])


class StatusEvent(Base):
    """An accepted status report, kept as history (the device row holds only the latest)."""

    __tablename__ = "status_events"
    __table_args__ = (Index(None, "device_id", "received_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    seq: Mapped[int] = mapped_column(BigInteger)
    # The agent's state names; free text because the agent's vocabulary may grow first.
    state: Mapped[str] = mapped_column(String(_ENUM_LENGTH))
    release: Mapped[str | None] = mapped_column(String(_PATH_LENGTH), default=None)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class ApiToken(Base):
    """An API token: only its SHA-256 is stored, the plaintext is shown once at issue."""

    __tablename__ = "api_tokens"
    __table_args__ = (
        # A device token is bound to exactly one device; no other token is.
        CheckConstraint("(role = 'device') = (device_id IS NOT NULL)", name="device_binding"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(_NAME_LENGTH))
    role: Mapped[str] = mapped_column(
        Enum(
            *ROLE_VALUES,
            name="role",
            native_enum=False,
            create_constraint=True,
            length=_ENUM_LENGTH,
            validate_strings=True,
        )
    )
    token_hash: Mapped[str] = mapped_column(String(_SHA256_HEX_LENGTH), unique=True)
    device_id: Mapped[str | None] = mapped_column(ForeignKey("devices.id"), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


class AuditEntry(Base):
    """One link of the hash-chained audit log (see :mod:`edgeota.server.audit`).

    ``id`` is the chain's sequence number. It is assigned by
    :func:`edgeota.server.audit.append` as ``max(id) + 1`` under a lock, not
    by a database sequence: sequences leave gaps when a transaction rolls
    back, and :func:`edgeota.server.audit.verify` reads a gap as a deleted
    entry. ``recorded_at`` is ISO-8601 text, not a timestamp column, so the
    exact string that was hashed survives any database round trip.
    """

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    recorded_at: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(_NAME_LENGTH))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(_PATH_LENGTH))
    detail: Mapped[str] = mapped_column(Text)  # canonical JSON, ASCII only
    prev_hash: Mapped[str] = mapped_column(String(_SHA256_HEX_LENGTH))
    entry_hash: Mapped[str] = mapped_column(String(_SHA256_HEX_LENGTH))


class RepoLock(Base):
    """One row per serialised resource ("image", "director", "audit").

    :func:`edgeota.server.db.session.lock` locks the row for the rest of the
    transaction, so replicas sharing one PostgreSQL database take turns.
    """

    __tablename__ = "repo_locks"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
