"""responses.previous_id: a stored response keeps only its own turn of a conversation it continues (its input and
its answer), after the response it continues, instead of the whole conversation again (O(turns) stored for a chain,
not O(turns^2)); rows stored before keep their whole conversation (previous_id NULL)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("responses", sa.Column("previous_id", sa.String(), nullable=True))
    op.create_index("ix_responses_previous_id", "responses", ["previous_id"])


def downgrade() -> None:
    op.drop_index("ix_responses_previous_id", table_name="responses")
    op.drop_column("responses", "previous_id")
