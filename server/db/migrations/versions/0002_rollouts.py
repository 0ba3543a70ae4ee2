"""Phased rollouts: phase bookkeeping, rollout events, previous releases for rollback.

Adds ``deployments.current_phase`` / ``phase_started_at`` / ``finished_at``,
the ``deployment_events`` table (the rollout's history: phases started,
pauses with their reason, rollbacks), ``assignments.previous_release_id`` /
``assigned_at`` / ``finished_at``, and the ``waiting`` assignment state (a
device whose phase has not started). Batch mode, so SQLite rebuilds the
tables it cannot alter in place; PostgreSQL alters them directly.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD_STATES = ("pending", "downloading", "installed", "failed", "rolled_back", "superseded")
_NEW_STATES = ("waiting", *_OLD_STATES)


def _state_check(states: Sequence[str]) -> str:
    return "state IN (" + ", ".join(f"'{s}'" for s in states) + ")"


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("current_phase", sa.Integer(), nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("phase_started_at", sa.DateTime(timezone=True),
                                   nullable=True))
        batch.add_column(sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("deployments") as batch:
        batch.alter_column("current_phase", server_default=None)
    with op.batch_alter_table("assignments") as batch:
        batch.add_column(sa.Column("previous_release_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_foreign_key(op.f("fk_assignments_previous_release_id_releases"),
                                 "releases", ["previous_release_id"], ["id"])
        batch.drop_constraint(op.f("ck_assignments_assignment_state"), type_="check")
        batch.create_check_constraint(op.f("ck_assignments_assignment_state"),
                                      _state_check(_NEW_STATES))
    op.create_table(
        "deployment_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("deployment_id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["deployment_id"], ["deployments.id"],
                                name=op.f("fk_deployment_events_deployment_id_deployments")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deployment_events")),
    )
    op.create_index(op.f("ix_deployment_events_deployment_id_id"), "deployment_events",
                    ["deployment_id", "id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_deployment_events_deployment_id_id"),
                  table_name="deployment_events")
    op.drop_table("deployment_events")
    op.execute("DELETE FROM assignments WHERE state = 'waiting'")
    with op.batch_alter_table("assignments") as batch:
        batch.drop_constraint(op.f("ck_assignments_assignment_state"), type_="check")
        batch.create_check_constraint(op.f("ck_assignments_assignment_state"),
                                      _state_check(_OLD_STATES))
        batch.drop_constraint(op.f("fk_assignments_previous_release_id_releases"),
                              type_="foreignkey")
        batch.drop_column("finished_at")
        batch.drop_column("assigned_at")
        batch.drop_column("previous_release_id")
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("finished_at")
        batch.drop_column("phase_started_at")
        batch.drop_column("current_phase")
