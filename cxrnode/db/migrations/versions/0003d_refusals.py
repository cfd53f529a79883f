"""refused C-STOREs

Revision ID: 0003d
Revises: 0003a
Create Date: 2026-11-29

- ``refusals``: every C-STORE answered with a failure status (kind, status, reason, the
  caller and the UIDs when they are valid), so admins see UID conflicts and bad senders.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003d"
down_revision = "0003a"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "refusals",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("calling_aet", sa.String(16), nullable=False),
        sa.Column("peer_host", sa.String(64), nullable=True),
        sa.Column("sop_class_uid", sa.String(64), nullable=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=True),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
    )
    op.create_index("ix_refusals_received_at", "refusals", ["received_at"])
    op.create_index("ix_refusals_kind", "refusals", ["kind"])


def downgrade() -> None:
    op.drop_index("ix_refusals_kind", "refusals")
    op.drop_index("ix_refusals_received_at", "refusals")
    op.drop_table("refusals")
