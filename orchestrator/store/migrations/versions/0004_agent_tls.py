"""agents.tls_ca, tls_certificate, tls_key: the run CA's certificate and the orchestrator's
client certificate and key (PEM) that its agents require (mutual TLS); empty for an agent
that serves plaintext

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 21:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("agents") as batch_op:
        batch_op.add_column(sa.Column("tls_ca", sa.Text(), nullable=False, server_default=""))
        batch_op.add_column(
            sa.Column("tls_certificate", sa.Text(), nullable=False, server_default="")
        )
        batch_op.add_column(sa.Column("tls_key", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("agents") as batch_op:
        batch_op.drop_column("tls_key")
        batch_op.drop_column("tls_certificate")
        batch_op.drop_column("tls_ca")
