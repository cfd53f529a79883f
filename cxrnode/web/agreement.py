"""The dashboard's "Model agreement" panel: the drafts compared with the radiologists' final
reports (:mod:`cxrnode.monitor`), per finding, for the model that drafted most recently.

The panel shows point estimates over :data:`PANEL_WINDOW_DAYS` days (no bootstrap: the page
refreshes often); `cxrnode monitor`, ``/api/v1/agreement`` and ``/metrics`` have the intervals
and every window. Tests may pass another source as ``agreement=`` to
:func:`cxrnode.web.app.create_app`.
"""

from __future__ import annotations

from pydantic import BaseModel, Field
from sqlalchemy.orm import Session


class AgreementRow(BaseModel):
    """Agreement of drafts with final reports for one finding."""

    finding: str
    n: int = Field(description="Studies with both a draft and a final report.")
    sensitivity: float | None = None
    ppv: float | None = None
    f1: float | None = None
    kappa: float | None = None


class AgreementPanel(BaseModel):
    """What the panel shows."""

    window: str = Field(description="e.g. 'last 30 days'")
    model: str | None = Field(None, description="Model version the figures are for.")
    rows: list[AgreementRow]
    note: str | None = Field(None, description="A line under the table (e.g. a drift alert).")


#: The window the dashboard panel shows.
PANEL_WINDOW_DAYS = 30


def agreement_panel(session: Session) -> AgreementPanel | None:
    """The panel's data: the most recent model's agreement over the last 30 days (None when
    no final report has been compared with a draft yet)."""
    from cxrnode.monitor.agreement import summary

    table = summary(session, window_days=PANEL_WINDOW_DAYS, resamples=0)
    if not table["rows"]:
        return None
    latest = max(table["rows"], key=lambda row: row["studies"])["model_hash"]
    rows = [row for row in table["rows"] if row["model_hash"] == latest]
    return AgreementPanel(
        window=f"last {PANEL_WINDOW_DAYS} days",
        model=f"{rows[0]['model_id']} ({rows[0]['model']})",
        rows=[
            AgreementRow(
                finding=row["finding"],
                n=row["pairs"],
                sensitivity=row["sensitivity"],
                ppv=row["ppv"],
                f1=row["f1"],
                kappa=row["kappa"],
            )
            for row in rows
        ],
        note=f"{rows[0]['studies']} studies with a draft and a final report; definite pairs per "
        "finding in the n column",
    )
