"""several gateways on one database: event origin, capability revision, settlement entry keys

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 00:00:00
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
    with op.batch_alter_table("node_events") as batch:
        batch.add_column(sa.Column("origin", sa.String(), nullable=True))
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("capability_at", sa.Float(), nullable=True))
        batch.add_column(sa.Column("gateway", sa.String(), nullable=True))
    with op.batch_alter_table("settlements") as batch:
        batch.add_column(sa.Column("entry_key", sa.String(), nullable=True))
    op.create_index("ux_settlements_entry_key", "settlements", ["entry_key"], unique=True)
    op.create_index("ix_nodes_last_seen", "nodes", ["last_seen"])


def downgrade() -> None:
    op.drop_index("ix_nodes_last_seen", table_name="nodes")
    op.drop_index("ux_settlements_entry_key", table_name="settlements")
    with op.batch_alter_table("settlements") as batch:
        batch.drop_column("entry_key")
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("gateway")
        batch.drop_column("capability_at")
    with op.batch_alter_table("node_events") as batch:
        batch.drop_column("origin")
