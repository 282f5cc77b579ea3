"""key_leases: each gateway's lease on a key's budget (the spend it may reach), so budgets hold across gateways

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "key_leases",
        sa.Column("key_id", sa.String(), primary_key=True),
        sa.Column("gateway_id", sa.String(), primary_key=True),
        sa.Column("leased_usd", sa.Float(), nullable=False),
        sa.Column("spent_usd", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("key_leases")
