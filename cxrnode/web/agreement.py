"""The dashboard's "Model agreement" panel: where its data is wired in.

Agreement monitoring (final reports compared with the drafts, per finding) is built
elsewhere; the dashboard only shows what :func:`agreement_panel` returns. Until it is wired,
it returns None and the panel says so. To wire it, make :func:`agreement_panel` return an
:class:`AgreementPanel` built from the monitoring function (or pass ``agreement=`` to
:func:`cxrnode.web.app.create_app`); the template (``templates/_agreement.html``) needs
nothing else.
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


def agreement_panel(session: Session) -> AgreementPanel | None:
    """The panel's data (None: agreement monitoring is not wired in yet)."""
    return None
