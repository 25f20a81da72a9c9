"""runs.cancel_requested (a cancel asked for by another process); transfers keep their
secret reference, time limit and tries, so a failed egress can be retried later

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch_op:
        batch_op.add_column(
            sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("transfers") as batch_op:
        batch_op.add_column(sa.Column("secret", sa.String(255), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("timeout", sa.Float(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("tries", sa.Integer(), nullable=False, server_default="3"))


def downgrade() -> None:
    with op.batch_alter_table("transfers") as batch_op:
        for column in ("tries", "timeout", "secret"):
            batch_op.drop_column(column)
    with op.batch_alter_table("runs") as batch_op:
        batch_op.drop_column("cancel_requested")
