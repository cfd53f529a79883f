"""delivery history of outputs; indexes for the admin pages

Revision ID: 0003a
Revises: 0003c
Create Date: 2026-12-02

- ``output_attempts``: one row per try to deliver an output (and per admin resend, which
  resets the tries: ``attempt`` 0). A trigger on ``outputs`` writes it whenever ``attempts``
  changes, so every process that records a try (the sender in any worker, ``cxrnode
  resend``, the admin API) leaves its row without knowing about this table.
- ``ix_studies_last_arrival``: the admin pages list the most recent studies first.
- ``ix_job_events_to_state_at``: throughput and stage latencies of the last hour.

On SQLite a later migration that rebuilds ``outputs`` (Alembic's batch mode copies the table
and drops the old one, and its triggers with it) must create the trigger again:
:func:`create_attempt_trigger`.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003a"
down_revision = "0003c"
branch_labels = None
depends_on = None

_COLUMNS = "output_id, attempt, at, state, status, error"
_VALUES = "NEW.id, NEW.attempts, NEW.updated_at, NEW.state, NEW.last_status, NEW.last_error"


def create_attempt_trigger() -> None:
    """The trigger ``output_attempt_recorded`` on ``outputs`` (SQLite or PostgreSQL)."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION cxrnode_output_attempt() RETURNS trigger AS $$ BEGIN "
            f"INSERT INTO output_attempts ({_COLUMNS}) VALUES ({_VALUES}); "
            "RETURN NEW; END $$ LANGUAGE plpgsql"
        )
        op.execute(
            "CREATE TRIGGER output_attempt_recorded AFTER UPDATE OF attempts ON outputs "
            "FOR EACH ROW WHEN (NEW.attempts IS DISTINCT FROM OLD.attempts) "
            "EXECUTE FUNCTION cxrnode_output_attempt()"
        )
        return
    op.execute(
        "CREATE TRIGGER output_attempt_recorded AFTER UPDATE OF attempts ON outputs "
        "FOR EACH ROW WHEN NEW.attempts IS NOT OLD.attempts BEGIN "
        f"INSERT INTO output_attempts ({_COLUMNS}) VALUES ({_VALUES}); END"
    )


def drop_attempt_trigger() -> None:
    op.execute("DROP TRIGGER IF EXISTS output_attempt_recorded" + _on_outputs())
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS cxrnode_output_attempt()")


def _on_outputs() -> str:
    return " ON outputs" if op.get_bind().dialect.name == "postgresql" else ""


def upgrade() -> None:
    op.create_table(
        "output_attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("output_id", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("state", sa.String(length=24), nullable=False),
        sa.Column("status", sa.String(length=64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["output_id"], ["outputs.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_output_attempts_output_id", "output_attempts", ["output_id"])
    op.create_index("ix_studies_last_arrival", "studies", ["last_arrival"])
    op.create_index("ix_job_events_to_state_at", "job_events", ["to_state", "at"])
    create_attempt_trigger()


def downgrade() -> None:
    drop_attempt_trigger()
    op.drop_index("ix_job_events_to_state_at", table_name="job_events")
    op.drop_index("ix_studies_last_arrival", table_name="studies")
    op.drop_index("ix_output_attempts_output_id", table_name="output_attempts")
    op.drop_table("output_attempts")
