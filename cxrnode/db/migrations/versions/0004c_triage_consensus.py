"""triage: draft priority, urgent drafts and their acknowledgement, notifications

Revision ID: 0004c
Revises: 0004b
Create Date: 2026-12-04

- ``jobs.priority``: the draft's reading priority (stat / asap / routine);
- ``outputs.priority``: 0 stat, 1 ASAP, 2 routine; the outbox claims the most urgent first;
- ``urgent_drafts``: urgent drafts listed on the dashboard until acknowledged (who, when);
- ``notifications``: each announcement of an urgent draft (webhook, e-mail), retried from here.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004c"
down_revision = "0004b"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (no batch copy on SQLite, which would drop 0003a's trigger on outputs).
    op.add_column("jobs", sa.Column("priority", sa.String(8), nullable=True))
    op.add_column(
        "outputs", sa.Column("priority", sa.Integer(), nullable=False, server_default=sa.text("2"))
    )
    op.create_table(
        "urgent_drafts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id"), nullable=False, unique=True),
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("priority", sa.String(8), nullable=False),
        sa.Column("suspected", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("acknowledged_at", sa.DateTime(), nullable=True),
        sa.Column("acknowledged_by", sa.String(200), nullable=True),
    )
    op.create_index("ix_urgent_drafts_study_id", "urgent_drafts", ["study_id"])
    op.create_index("ix_urgent_drafts_acknowledged_at", "urgent_drafts", ["acknowledged_at"])
    op.create_table(
        "notifications",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("urgent_id", sa.Integer(), sa.ForeignKey("urgent_drafts.id"), nullable=True),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("target", sa.String(500), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_try_at", sa.DateTime(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("sent_at", sa.DateTime(), nullable=True),
    )
    op.create_index("ix_notifications_urgent_id", "notifications", ["urgent_id"])
    op.create_index("ix_notifications_state_next", "notifications", ["state", "next_try_at"])


def downgrade() -> None:
    op.drop_index("ix_notifications_state_next", "notifications")
    op.drop_index("ix_notifications_urgent_id", "notifications")
    op.drop_table("notifications")
    op.drop_index("ix_urgent_drafts_acknowledged_at", "urgent_drafts")
    op.drop_index("ix_urgent_drafts_study_id", "urgent_drafts")
    op.drop_table("urgent_drafts")
    op.drop_column("outputs", "priority")  # SQLite >= 3.35 drops a column in place
    op.drop_column("jobs", "priority")
