"""retention: when a study's files were removed

Revision ID: 0003c
Revises: 0003b
Create Date: 2026-12-02

- ``studies.purged_at``, ``instances.purged_at``, ``outputs.purged_at``: set by the retention
  pass (``cxrnode.retention``) when it removes the files; the rows stay as the record.
- ``ix_studies_purged_last_arrival``: the pass looks for unpurged studies quiet since a cut-off.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003c"
down_revision = "0003b"
branch_labels = None
depends_on = None

_TABLES = ("studies", "instances", "outputs")


def upgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("purged_at", sa.DateTime(), nullable=True))
    op.create_index("ix_studies_purged_last_arrival", "studies", ["purged_at", "last_arrival"])


def downgrade() -> None:
    op.drop_index("ix_studies_purged_last_arrival", table_name="studies")
    for table in reversed(_TABLES):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("purged_at")
