"""outputs in flight are a state of their own

Revision ID: 0004a
Revises: 0004c
Create Date: 2026-12-04

An outbox row claimed for a send message was ``pending`` with ``last_status`` "in flight";
it is now in the state ``in_flight`` (see ``cxrnode.outputs.states``), and ``last_status``
keeps the status of its last real try. The column is a VARCHAR (``native_enum=False``), so
only the rows change. Downgrade gives the old form back.
"""

from alembic import op

revision = "0004a"
down_revision = "0004c"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "UPDATE outputs SET state = 'in_flight', last_status = NULL "
        "WHERE state = 'pending' AND last_status = 'in flight'"
    )


def downgrade() -> None:
    op.execute(
        "UPDATE outputs SET state = 'pending', last_status = 'in flight' WHERE state = 'in_flight'"
    )
