"""final reports, AI-radiologist agreement, studies' accession numbers

Revision ID: 0003b
Revises: 0002
Create Date: 2026-11-29

- ``final_reports``: every radiologist report received (SR by C-STORE, HL7 ORU over MLLP),
  matched or not, with its labels.
- ``agreements``: per study and finding, the AI draft's state beside the radiologist's.
- ``studies.accession_number``: filled at ingest from the images' headers, and here from the
  headers already recorded, so that a report naming only the accession finds its study.
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0003b"
down_revision = "0002"
branch_labels = None
depends_on = None

_ACCESSION_TAG = "00080050"


def _accession(raw: object) -> str | None:
    header = json.loads(raw) if isinstance(raw, str) else raw
    if not isinstance(header, dict):
        return None
    values = (header.get(_ACCESSION_TAG) or {}).get("Value") or []
    value = str(values[0]).strip() if values else ""
    return value[:64] or None


def _backfill_accession_numbers() -> None:
    bind = op.get_bind()
    rows = bind.execute(
        sa.text(
            "SELECT study_id, header FROM instances "
            "WHERE study_id IS NOT NULL AND header IS NOT NULL ORDER BY id"
        )
    ).all()
    found: dict[int, str] = {}
    for study_id, header in rows:
        if study_id not in found:
            accession = _accession(header)
            if accession:
                found[study_id] = accession
    for study_id, accession in found.items():
        bind.execute(
            sa.text("UPDATE studies SET accession_number = :a WHERE id = :id"),
            {"a": accession, "id": study_id},
        )


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("accession_number", sa.String(length=64), nullable=True))
    op.create_index("ix_studies_accession_number", "studies", ["accession_number"])
    _backfill_accession_numbers()

    op.create_table(
        "final_reports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column(
            "source",
            sa.Enum("dicom", "hl7", name="reportsource", native_enum=False, length=8),
            nullable=False,
        ),
        sa.Column(
            "state",
            sa.Enum(
                "matched",
                "unmatched",
                "ignored",
                "rejected",
                name="reportstate",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column(
            "status",
            sa.Enum(
                "preliminary",
                "final",
                "corrected",
                "cancelled",
                name="reportstatus",
                native_enum=False,
                length=16,
            ),
            nullable=True,
        ),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("message_id", sa.String(length=300), nullable=True),
        sa.Column("answer", sa.String(length=16), nullable=True),
        sa.Column("peer", sa.String(length=100), nullable=True),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("observed_at", sa.DateTime(), nullable=True),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("accession_number", sa.String(length=64), nullable=True),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("study_id", sa.Integer(), nullable=True),
        sa.Column("path", sa.String(length=512), nullable=True),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("labels", sa.JSON(), nullable=True),
        sa.Column("scored_job_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    for column in ("message_id", "received_at", "study_instance_uid", "accession_number"):
        op.create_index(f"ix_final_reports_{column}", "final_reports", [column])
    op.create_index("ix_final_reports_study_id", "final_reports", ["study_id"])

    op.create_table(
        "agreements",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("report_id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("finding", sa.String(length=32), nullable=False),
        sa.Column("ai", sa.String(length=16), nullable=False),
        sa.Column("radiologist", sa.String(length=16), nullable=False),
        sa.Column("model_hash", sa.String(length=128), nullable=False),
        sa.Column("model_id", sa.String(length=512), nullable=False),
        sa.Column("reported_at", sa.DateTime(), nullable=False),
        sa.Column("scored_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.ForeignKeyConstraint(["report_id"], ["final_reports.id"]),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("study_id", "finding", name="uq_agreements_study_finding"),
    )
    op.create_index("ix_agreements_job_id", "agreements", ["job_id"])
    op.create_index("ix_agreements_report_id", "agreements", ["report_id"])
    op.create_index("ix_agreements_reported_model", "agreements", ["reported_at", "model_hash"])


def downgrade() -> None:
    op.drop_index("ix_agreements_reported_model", table_name="agreements")
    op.drop_index("ix_agreements_report_id", table_name="agreements")
    op.drop_index("ix_agreements_job_id", table_name="agreements")
    op.drop_table("agreements")
    op.drop_index("ix_final_reports_study_id", table_name="final_reports")
    for column in ("message_id", "received_at", "study_instance_uid", "accession_number"):
        op.drop_index(f"ix_final_reports_{column}", table_name="final_reports")
    op.drop_table("final_reports")
    op.drop_index("ix_studies_accession_number", table_name="studies")
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("accession_number")
