"""Anti-replay window for status reports: late reports are accepted once, replays never.

Adds ``devices.report_seq_window``: bit ``k`` set means the report with
sequence number ``report_seq - 1 - k`` was accepted. With several server
replicas (or MQTT and the HTTP fallback at once) two reports of one device
can be stored out of order; the window lets the older one in once instead of
auditing it as a replay, while a copy of any accepted report stays refused.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("report_seq_window", sa.BigInteger(), nullable=False,
                                   server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("report_seq_window")
