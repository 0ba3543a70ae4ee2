"""Initial schema: devices, releases, deployments, assignments, reports, tokens, audit, locks.

Drafted with ``alembic revision --autogenerate`` and then reviewed by hand.
Migrations are frozen history, so this file does not import the models: it
spells out generic SQLAlchemy types (``DateTime(timezone=True)`` where the
models use their ``UTCDateTime`` decorator, which only adds conversions in
Python). Constraint names follow ``edgeota.server.db.models.NAMING_CONVENTION``
so later migrations can address them by name on SQLite and PostgreSQL.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _instant(name: str, *, nullable: bool) -> sa.Column[Any]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _str_enum(name: str, *values: str) -> sa.Enum:
    """VARCHAR(32) plus a CHECK constraint named ``ck_<table>_<name>`` (no native ENUM type)."""
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=32)


def upgrade() -> None:
    op.create_table(
        "audit_log",
        # Assigned by edgeota.server.audit.append (max + 1 under a lock): no sequence.
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("recorded_at", sa.String(length=32), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("subject", sa.String(length=255), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("entry_hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_table(
        "devices",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("hardware", sa.String(length=128), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("identity", sa.JSON(), nullable=False),
        sa.Column("tls_cert_pem", sa.Text(), nullable=True),
        _instant("enrolled_at", nullable=False),
        _instant("last_seen", nullable=True),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("reported_state", sa.JSON(), nullable=True),
        sa.Column("report_seq", sa.BigInteger(), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_devices")),
    )
    op.create_table(
        "releases",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("release_counter", sa.Integer(), nullable=False),
        sa.Column("target_path", sa.String(length=255), nullable=False),
        sa.Column("length", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("plaintext_sha256", sa.String(length=64), nullable=False),
        sa.Column("plaintext_size", sa.BigInteger(), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("wrapped_content_key", sa.LargeBinary(), nullable=False),
        sa.Column("bin_role", sa.String(length=128), nullable=False),
        sa.Column("bin_version", sa.Integer(), nullable=False),
        sa.Column("pending_metadata", sa.LargeBinary(), nullable=True),
        sa.Column(
            "status",
            _str_enum("release_status", "pending", "published", "refused"),
            nullable=False,
        ),
        _instant("created_at", nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        _instant("published_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_releases")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_releases_name_version")),
        sa.UniqueConstraint("target_path", name=op.f("uq_releases_target_path")),
    )
    op.create_table(
        "repo_locks",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_repo_locks")),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column(
            "role",
            _str_enum("role", "viewer", "operator", "release-manager", "admin", "device"),
            nullable=False,
        ),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=True),
        _instant("created_at", nullable=False),
        _instant("last_used", nullable=True),
        _instant("revoked_at", nullable=True),
        sa.CheckConstraint(
            "(role = 'device') = (device_id IS NOT NULL)",
            name=op.f("ck_api_tokens_device_binding"),
        ),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_api_tokens_device_id_devices")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
    op.create_table(
        "deployments",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("release_id", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("selector", sa.JSON(), nullable=False),
        sa.Column("phases", sa.JSON(), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column(
            "status",
            _str_enum(
                "deployment_status", "active", "paused", "completed", "cancelled", "superseded"
            ),
            nullable=False,
        ),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column("superseded_by", sa.Integer(), nullable=True),
        _instant("created_at", nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(
            ["release_id"], ["releases.id"], name=op.f("fk_deployments_release_id_releases")
        ),
        sa.ForeignKeyConstraint(
            ["superseded_by"],
            ["deployments.id"],
            name=op.f("fk_deployments_superseded_by_deployments"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deployments")),
    )
    op.create_index(
        op.f("ix_deployments_model_name_status"), "deployments", ["model_name", "status"]
    )
    op.create_table(
        "status_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        _instant("received_at", nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("release", sa.String(length=255), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_status_events_device_id_devices")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_status_events")),
    )
    op.create_index(
        op.f("ix_status_events_device_id_received_at"),
        "status_events",
        ["device_id", "received_at"],
    )
    op.create_table(
        "assignments",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("deployment_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("release_id", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("phase", sa.Integer(), nullable=False),
        sa.Column(
            "state",
            _str_enum(
                "assignment_state",
                "pending",
                "downloading",
                "installed",
                "failed",
                "rolled_back",
                "superseded",
            ),
            nullable=False,
        ),
        sa.Column("detail", sa.Text(), nullable=True),
        _instant("updated_at", nullable=False),
        sa.ForeignKeyConstraint(
            ["deployment_id"],
            ["deployments.id"],
            name=op.f("fk_assignments_deployment_id_deployments"),
        ),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_assignments_device_id_devices")
        ),
        sa.ForeignKeyConstraint(
            ["release_id"], ["releases.id"], name=op.f("fk_assignments_release_id_releases")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_assignments")),
        sa.UniqueConstraint(
            "deployment_id", "device_id", name=op.f("uq_assignments_deployment_id_device_id")
        ),
    )
    op.create_index(
        op.f("ix_assignments_device_id_model_name"), "assignments", ["device_id", "model_name"]
    )


def downgrade() -> None:
    # Reverse dependency order; dropping a table drops its indexes and constraints.
    for table in (
        "assignments",
        "status_events",
        "deployments",
        "api_tokens",
        "repo_locks",
        "releases",
        "devices",
        "audit_log",
    ):
        op.drop_table(table)
