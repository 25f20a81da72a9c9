"""runs: cancel_reason, team, policy, budget_usd, cost_usd, carried_usd, held_from, held_until (what a run spends
and may spend); schedules and their firings

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch_op:
        batch_op.add_column(
            sa.Column("cancel_reason", sa.Text(), nullable=False, server_default="")
        )
        batch_op.add_column(
            sa.Column("team", sa.String(length=255), nullable=False, server_default="")
        )
        batch_op.add_column(sa.Column("policy", sa.Text(), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("budget_usd", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("cost_usd", sa.Float(), nullable=False, server_default="0"))
        batch_op.add_column(
            sa.Column("carried_usd", sa.Float(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("held_from", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("held_until", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "schedules",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("fuzzfile", sa.Text(), nullable=False),
        sa.Column("cron", sa.String(length=255), nullable=False),
        sa.Column("window_s", sa.Float(), nullable=False),
        sa.Column("budget_usd", sa.Float(), nullable=True),
        sa.Column("policy", sa.Text(), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "firings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("schedule_id", sa.Integer(), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "WAITING",
                "STARTED",
                "SKIPPED",
                "MISSED",
                "FAILED",
                name="firingstate",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("start_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("site", sa.String(length=255), nullable=False),
        sa.Column("estimate_usd", sa.Float(), nullable=True),
        sa.Column("run_name", sa.String(length=255), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["schedule_id"], ["schedules.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("schedule_id", "due_at"),
    )
    op.create_index(op.f("ix_firings_schedule_id"), "firings", ["schedule_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_firings_schedule_id"), table_name="firings")
    op.drop_table("firings")
    op.drop_table("schedules")
    with op.batch_alter_table("runs") as batch_op:
        for column in (
            "held_until",
            "held_from",
            "carried_usd",
            "cost_usd",
            "budget_usd",
            "policy",
            "team",
            "cancel_reason",
        ):
            batch_op.drop_column(column)
