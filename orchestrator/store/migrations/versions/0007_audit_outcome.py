"""audit: outcome (how each call ended)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 14:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("audit") as batch_op:
        batch_op.add_column(
            sa.Column("outcome", sa.String(length=255), nullable=False, server_default="")
        )
    op.execute("UPDATE audit SET outcome = 'not recorded'")  # written before outcomes were


def downgrade() -> None:
    with op.batch_alter_table("audit") as batch_op:
        batch_op.drop_column("outcome")
