"""job history, recorded headers, the model result stored once

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29

- ``job_events``: every accepted job state change (history and stage timings).
- ``instances.header``: the header attributes later steps need, recorded at ingest.
- ``jobs``: the model's answer lives in ``result`` alone (ModelResult.to_dict()); the copies in
  separate columns are dropped after their values are folded into ``result``.
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_DROPPED = (
    "model_id",
    "model_hash",
    "report",
    "differential",
    "recommendation",
    "findings",
    "timings",
    "batch_size",
    "batch_id",
)


def _fold_results() -> None:
    """Rewrite results of the 0001 shape ({"model": {"id", "hash"}, ...}) as ModelResult."""
    bind = op.get_bind()
    rows = bind.execute(sa.text("SELECT id, result, batch_id, batch_size FROM jobs")).all()
    for job_id, raw, batch_id, batch_size in rows:
        if raw is None:
            continue
        result = json.loads(raw) if isinstance(raw, str) else dict(raw)
        model = result.pop("model", None)
        if isinstance(model, dict):
            result.setdefault("model_id", model.get("id"))
            result.setdefault("model_hash", model.get("hash"))
        batch = result.pop("batch", None) or {}
        result.setdefault("batch_id", batch.get("id", batch_id))
        result.setdefault("batch_size", batch.get("size", batch_size))
        result.setdefault("worker", batch.get("worker"))
        bind.execute(
            sa.text("UPDATE jobs SET result = :result WHERE id = :id"),
            {"result": json.dumps(result), "id": job_id},
        )


def upgrade() -> None:
    op.create_table(
        "job_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("from_state", sa.String(length=16), nullable=True),
        sa.Column("to_state", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_job_events_job_id", "job_events", ["job_id"])
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("header", sa.JSON(), nullable=True))
    _fold_results()
    with op.batch_alter_table("jobs") as batch:
        for column in _DROPPED:
            batch.drop_column(column)


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("model_id", sa.String(length=512), nullable=True))
        batch.add_column(sa.Column("model_hash", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("report", sa.Text(), nullable=True))
        batch.add_column(sa.Column("differential", sa.Text(), nullable=True))
        batch.add_column(sa.Column("recommendation", sa.Text(), nullable=True))
        batch.add_column(sa.Column("findings", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("timings", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("batch_size", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("batch_id", sa.String(length=64), nullable=True))
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("header")
    op.drop_index("ix_job_events_job_id", table_name="job_events")
    op.drop_table("job_events")
