"""The draft report that the SR and SC builders turn into DICOM.

A :class:`DraftReport` is what the node keeps from a model run (``ReportResult.to_dict()``):
the three answers of the model, the per-finding labels and enough provenance (model id and
hash, pipeline version, prompt variants) to identify the algorithm in the output. It is
checked once, at construction, so the builders never meet a half-valid draft.

An empty draft (the model produced no text at all) is allowed and is represented as such:
``is_empty`` is true and the builders print and encode "no report text" explicitly rather
than emitting an empty section.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from model.labeler import FINDINGS  # pure Python (no torch): the one list of findings

__all__ = [
    "FINDINGS",
    "FINDING_STATES",
    "DraftReport",
    "split_impression",
]

FINDING_STATES: tuple[str, ...] = ("present", "absent", "uncertain", "not_mentioned")

_PAEDIATRIC_PROMPTS = frozenset({"paediatric", "pediatric"})
# "Impression:" / "Conclusion:" at the start of the text or after a sentence or line end.
_IMPRESSION_RE = re.compile(r"(?:^|(?<=[\n.;!?]))[ \t]*(?:impressions?|conclusions?)[ \t]*:", re.I)
_FINDINGS_HEADING_RE = re.compile(r"^\s*findings?\s*:\s*", re.I)


def split_impression(report: str) -> tuple[str, str]:
    """Split a report into (findings, impression) if it has an impression heading.

    The model writes free text; when it labels a part "Impression:" (or "Conclusion:")
    that part is the impression and the text before it, without a leading "Findings:"
    heading, is the findings. Without such a heading the whole text is findings and the
    impression is empty: we do not guess an impression from unlabelled prose.
    """
    match = _IMPRESSION_RE.search(report)
    if match is None:
        findings, impression = report, ""
    else:
        findings, impression = report[: match.start()], report[match.end() :]
    return _FINDINGS_HEADING_RE.sub("", findings.strip(), count=1).strip(), impression.strip()


@dataclass(frozen=True)
class DraftReport:
    """A validated AI draft report, ready for the SR and SC builders.

    Attributes
    ----------
    report, differential, recommendation
        The model's answers, as decoded (``""`` when a turn produced nothing).
    findings
        Every name in :data:`FINDINGS` mapped to one of :data:`FINDING_STATES`. Names the
        caller leaves out are filled in as ``"not_mentioned"``; the mapping is ordered as
        :data:`FINDINGS`.
    model_id, model_hash
        Where the weights came from, and the hash that identifies them.
    pipeline_version
        Version of the node's pipeline that produced the draft.
    prompts
        Prompt variant per turn, e.g. ``{"report": "paediatric"}``.
    """

    report: str
    differential: str
    recommendation: str
    findings: Mapping[str, str]
    model_id: str
    model_hash: str
    pipeline_version: str
    prompts: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("report", "differential", "recommendation"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(
                    f"DraftReport.{name} must be a string (use '' for no answer); "
                    f"got {type(value).__name__}"
                )
        for name in ("model_id", "model_hash", "pipeline_version"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(
                    f"DraftReport.{name} must be a non-empty string: the outputs identify the "
                    f"algorithm with it; got {value!r}"
                )
        object.__setattr__(self, "findings", _checked_findings(self.findings))
        object.__setattr__(self, "prompts", _checked_prompts(self.prompts))

    @classmethod
    def from_result(cls, d: Mapping[str, Any], pipeline_version: str) -> DraftReport:
        """Build a draft from ``ReportResult.to_dict()``.

        Raises
        ------
        ValueError
            If a required key is missing or a value is not what the contract says.
        """
        if not isinstance(d, Mapping):
            raise TypeError(
                f"from_result expects the dict of ReportResult.to_dict(); got {type(d).__name__}"
            )
        if "model" not in d and "model_id" in d:  # ModelResult.to_dict()
            d = {**d, "model": {"id": d["model_id"], "hash": d.get("model_hash")}}
        missing = [key for key in ("report", "findings", "model") if key not in d]
        if missing:
            raise ValueError(
                f"ReportResult dict lacks {missing}; expected the output of "
                "ReportResult.to_dict() (keys report, differential, recommendation, findings, "
                "prompts, model)"
            )
        model = d["model"]
        if not isinstance(model, Mapping) or "id" not in model or "hash" not in model:
            raise ValueError(
                f"ReportResult 'model' must be a mapping with 'id' and 'hash'; got {model!r}"
            )
        return cls(
            report=d["report"] if d["report"] is not None else "",
            differential=d.get("differential") or "",
            recommendation=d.get("recommendation") or "",
            findings=d["findings"],
            model_id=model["id"],
            model_hash=model["hash"],
            pipeline_version=pipeline_version,
            prompts=d.get("prompts") or {},
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-serialisable), e.g. for a database column or a task."""
        return {
            "report": self.report,
            "differential": self.differential,
            "recommendation": self.recommendation,
            "findings": dict(self.findings),
            "model_id": self.model_id,
            "model_hash": self.model_hash,
            "pipeline_version": self.pipeline_version,
            "prompts": dict(self.prompts),
        }

    @property
    def is_empty(self) -> bool:
        """True when the model produced no text for any of the three turns."""
        return not (self.report.strip() or self.differential.strip() or self.recommendation.strip())

    @property
    def sections(self) -> tuple[str, str]:
        """(findings text, impression text) of the report; see :func:`split_impression`."""
        return split_impression(self.report)

    @property
    def paediatric_prompt(self) -> bool:
        """True when any turn used the paediatric (age-aware) prompt variant."""
        return any(value.lower() in _PAEDIATRIC_PROMPTS for value in self.prompts.values())

    @property
    def model_name(self) -> str:
        """Short model name for display: the last component of the model id."""
        return re.split(r"[\\/]", self.model_id.rstrip("/\\"))[-1] or self.model_id


def _checked_findings(findings: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(findings, Mapping):
        raise TypeError(
            f"DraftReport.findings must be a mapping name -> state; got {type(findings).__name__}"
        )
    unknown = sorted(set(findings) - set(FINDINGS))
    if unknown:
        raise ValueError(
            f"DraftReport.findings has unknown finding names {unknown}; expected names from "
            f"{list(FINDINGS)} (update cxrnode.outputs.draft.FINDINGS and the SR codes together if "
            "the labeler gained a finding)"
        )
    bad = {name: state for name, state in findings.items() if state not in FINDING_STATES}
    if bad:
        raise ValueError(
            f"DraftReport.findings has invalid states {bad}; expected one of {list(FINDING_STATES)}"
        )
    return {name: findings.get(name, "not_mentioned") for name in FINDINGS}


def _checked_prompts(prompts: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(prompts, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()
    ):
        raise TypeError(f"DraftReport.prompts must map strings to strings; got {prompts!r}")
    return dict(prompts)
