"""which node host holds each instance, and where each job's file-bound steps run

Revision ID: 0005a
Revises: 0004a
Create Date: 2026-12-04

Two active node hosts share one database, each with its own DATA_DIR. ``instances.node_host``
names the host whose DATA_DIR holds the instance file; ``jobs.node_host`` the host whose
queues take the job's prepare, outputs and send steps (the host of its chosen instance).
Rows from before are NULL: their messages go to the plain queues (``prepare``, ``outputs``,
``send``), which every node-side worker still consumes, as before.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005a"
down_revision = "0004a"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("node_host", sa.String(64), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("node_host", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("node_host")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("node_host")
