"""Prometheus metrics of AI-radiologist agreement: a custom collector read at scrape time.

The admin web app registers it once (``REGISTRY.register(AgreementCollector(sessions))``);
every scrape then runs one aggregate query per window on a read-only session. Labels are the
finding, the model (first 16 hex digits of its hash) and the window ("7d", "30d", "all"):
nothing that names a patient or a study.

Gauges (one sample per finding, model and window; a ratio only where it is defined):

- ``cxrnode_agreement_f1``, ``_kappa``, ``_sensitivity``, ``_ppv``, ``_specificity``
- ``cxrnode_agreement_pairs``: definite pairs the ratios stand on
- ``cxrnode_agreement_studies``: studies compared
- ``cxrnode_agreement_f1_floor``, ``_kappa_floor``, ``_min_pairs``: the configured alert
  thresholds, so that ``config/prometheus/agreement-rules.yml`` never repeats a number
- ``cxrnode_final_reports{source, state}``: reports received, by entrance and outcome
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from cxrnode.db import FinalReport, ReportSource, ReportState, utcnow
from cxrnode.monitor.agreement import (
    MEASURES,
    confusion_from_counts,
    measures,
    model_label,
    pair_counts,
    window_name,
)
from cxrnode.settings import Settings, get_settings

__all__ = ["AgreementCollector"]

_LABELS = ("finding", "model", "window")
_HELP = {
    "sensitivity": "Sensitivity of the AI draft against the radiologist's report (TP/(TP+FN))",
    "ppv": "Positive predictive value of the AI draft (TP/(TP+FP))",
    "specificity": "Specificity of the AI draft (TN/(TN+FP))",
    "f1": "F1 of the AI draft against the radiologist's report (2TP/(2TP+FP+FN))",
    "kappa": "Cohen's kappa between the AI draft and the radiologist",
}


class AgreementCollector(Collector):
    """Collects the agreement gauges from the database at scrape time.

    Parameters
    ----------
    sessions
        A sessionmaker of the node's database, preferably on a read-only engine
        (``make_engine(url, read_only=True)``).
    settings
        The windows and alert thresholds; default: the process's settings.
    clock
        Returns "now" (naive UTC); tests pass a fixed one.
    """

    def __init__(
        self,
        sessions: Callable[[], Any],
        settings: Settings | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.clock = clock

    def _families(self) -> dict[str, GaugeMetricFamily]:
        families = {
            measure: GaugeMetricFamily(f"cxrnode_agreement_{measure}", text, labels=_LABELS)
            for measure, text in _HELP.items()
        }
        families["pairs"] = GaugeMetricFamily(
            "cxrnode_agreement_pairs",
            "Definite AI-radiologist pairs (both present or absent) per finding",
            labels=_LABELS,
        )
        families["studies"] = GaugeMetricFamily(
            "cxrnode_agreement_studies",
            "Studies whose AI draft was compared with the radiologist's report",
            labels=_LABELS,
        )
        families["f1_floor"] = GaugeMetricFamily(
            "cxrnode_agreement_f1_floor", "AGREEMENT_F1_FLOOR: the F1 alert threshold"
        )
        families["kappa_floor"] = GaugeMetricFamily(
            "cxrnode_agreement_kappa_floor", "AGREEMENT_KAPPA_FLOOR: the kappa alert threshold"
        )
        families["min_pairs"] = GaugeMetricFamily(
            "cxrnode_agreement_min_pairs",
            "AGREEMENT_MIN_PAIRS: definite pairs a finding needs before the alert may fire",
        )
        families["reports"] = GaugeMetricFamily(
            "cxrnode_final_reports",
            "Radiologists' reports received, by entrance and what became of them",
            labels=("source", "state"),
        )
        return families

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """The families without samples: registering the collector reads no database."""
        yield from self._families().values()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        settings = self.settings or get_settings()
        families = self._families()
        now = self.clock()
        with self.sessions() as session:
            for days in [*settings.monitor_windows_days, None]:
                since = None if days is None else now - timedelta(days=days)
                window = window_name(days)
                for pairs in pair_counts(session, since):
                    labels = [pairs.finding, model_label(pairs.model_hash), window]
                    counts = confusion_from_counts(pairs.counts, pairs.finding)
                    values = measures(counts)
                    for measure in MEASURES:
                        if values[measure] is not None:
                            families[measure].add_metric(labels, values[measure])
                    families["pairs"].add_metric(labels, counts.definite)
                    families["studies"].add_metric(labels, pairs.studies)
            received = {
                (source, state): n
                for source, state, n in session.execute(
                    select(FinalReport.source, FinalReport.state, func.count()).group_by(
                        FinalReport.source, FinalReport.state
                    )
                )
            }
            session.rollback()
        for source in ReportSource:
            for state in ReportState:
                families["reports"].add_metric(
                    [source.value, state.value], received.get((source, state), 0)
                )
        families["f1_floor"].add_metric([], settings.agreement_f1_floor)
        families["kappa_floor"].add_metric([], settings.agreement_kappa_floor)
        families["min_pairs"].add_metric([], settings.agreement_min_pairs)
        yield from families.values()
