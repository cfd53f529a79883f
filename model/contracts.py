"""The typed contracts between the node and the model: what goes in, what comes out.

Three floors meet here. The node (``cxrnode``) reads DICOM and owns state; the model
(``model``) turns an 8-bit image into text; the workers (``worker``) carry one to the other
through the broker as JSON. Each crossing uses one of these classes, built and checked in one
place, so no layer passes an untyped dict along or filters one by field names:

- :class:`StudyContext`: what the model may know about the study (no identifiers);
- :class:`GenerationParams`: how to decode;
- :class:`ModelResult`: the model's answers, findings and provenance, stored once on the job;
  it is also the draft every output builder (SR, SC, PDF, HL7) takes, so the answer travels
  from the model to the PACS as one type.

This module imports neither torch nor numpy (the node imports it) and nothing from
``cxrnode`` (the model never does).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

__all__ = [
    "FINDINGS",
    "FINDING_STATES",
    "GenerationParams",
    "ModelResult",
    "StudyContext",
    "split_impression",
]

#: The findings every result names, in this order (the labeler's and the SR's list).
FINDINGS: tuple[str, ...] = (
    "atelectasis",
    "cardiomegaly",
    "consolidation",
    "edema",
    "pleural_effusion",
    "pneumothorax",
    "pneumonia",
    "lung_opacity",
    "no_finding",
)
#: The state of one finding in a result.
FINDING_STATES: tuple[str, ...] = ("present", "absent", "uncertain", "not_mentioned")

_SEXES = frozenset({"M", "F", "O"})
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


def _mapping(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{what} must be a mapping (the to_dict() form); got {type(value).__name__}"
        )
    return value


@dataclass(frozen=True)
class StudyContext:
    """What the node tells the model about the study: no names, IDs or dates.

    Attributes
    ----------
    age_years
        Patient age at the study in years (from PatientAge or birth and study dates), or None.
    sex
        ``"M"``, ``"F"``, ``"O"`` or None (PatientSex).
    view
        ``"PA"``, ``"AP"`` or None: the projection of the image the model reads.
    """

    age_years: float | None = None
    sex: str | None = None
    view: str | None = None

    def __post_init__(self) -> None:
        if self.age_years is not None and not (0 <= float(self.age_years) < 200):
            raise ValueError(f"StudyContext.age_years must be in [0, 200); got {self.age_years}")
        if self.sex is not None and self.sex not in _SEXES:
            raise ValueError(
                f"StudyContext.sex must be one of {sorted(_SEXES)} or None; got {self.sex!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> StudyContext:
        """The inverse of :meth:`to_dict`; ``None`` is an empty context. Unknown keys are an
        error: a message from a newer node must not be half understood."""
        data = _mapping(data or {}, "StudyContext")
        unknown = sorted(set(data) - {"age_years", "sex", "view"})
        if unknown:
            raise ValueError(f"StudyContext has unknown fields {unknown}")
        return cls(**data)


@dataclass(frozen=True)
class GenerationParams:
    """Decoding parameters of one request; requests batch together only when these match."""

    temperature: float = 0.2
    top_p: float = 0.8
    top_k: int = 50
    max_new_tokens: int = 512
    #: Self-consistency: reports sampled for the study (1: one report, no vote), and the least
    #: fraction of them that must agree on a finding before it is coded (else "uncertain").
    samples: int = 1
    min_agreement: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.samples <= 16:
            raise ValueError(f"samples must be in [1, 16]; got {self.samples}")
        if not 0 <= self.min_agreement <= 1:
            raise ValueError(f"min_agreement must be in [0, 1]; got {self.min_agreement}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0; got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0; got {self.top_k}")
        if not 1 <= self.max_new_tokens <= 512:
            raise ValueError(f"max_new_tokens must be in [1, 512]; got {self.max_new_tokens}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.samples == 1 and self.min_agreement == 0:  # what workers before the vote read
            del out["samples"], out["min_agreement"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> GenerationParams:
        data = _mapping(data or {}, "GenerationParams")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"GenerationParams has unknown fields {unknown}")
        return cls(**data)


@dataclass(frozen=True)
class ModelResult:
    """The model's answers for one study, with the provenance to reproduce them.

    Attributes
    ----------
    report, differential, recommendation
        The three answers as decoded (``""`` when a turn produced nothing or was skipped).
    findings
        Every name of :data:`FINDINGS` mapped to one of :data:`FINDING_STATES` (names left
        out are filled in as ``"not_mentioned"``).
    finding_sources
        Where each finding's state came from: ``"report"`` (the labeler read the report) or
        ``"confirmation"`` (a yes/no turn).
    prompts
        Prompt variant per turn, e.g. ``{"report": "paediatric"}``.
    model_id, model_hash
        Where the weights came from and the hash that identifies them (config and weights).
    timings
        Seconds spent per stage of the batch this study ran in (encode, prefill, decode, total).
    batch_id, batch_size
        The inference batch this study ran in (None outside a worker).
    worker
        The worker that ran it (None outside a worker).
    samples
        Reports sampled for the study (self-consistency); 1 when there was no vote.
    votes
        Finding -> {state: how many of the ``samples`` had it} (empty when ``samples`` is 1);
        the fraction of the state in ``findings`` is its vote fraction.
    pipeline_version
        The node's pipeline version that turns this result into outputs (None until the
        node sets it with :meth:`for_pipeline`; the output UIDs derive from it).

    An empty result (the model produced no text at all) is allowed: :attr:`is_empty` is
    true, and the builders say "no report text" rather than emitting an empty section.
    """

    report: str
    differential: str
    recommendation: str
    findings: Mapping[str, str]
    model_id: str
    model_hash: str
    finding_sources: Mapping[str, str] = field(default_factory=dict)
    prompts: Mapping[str, str] = field(default_factory=dict)
    timings: Mapping[str, float] = field(default_factory=dict)
    batch_id: str | None = None
    batch_size: int | None = None
    worker: str | None = None
    samples: int = 1
    votes: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    pipeline_version: str | None = None

    def __post_init__(self) -> None:
        for name in ("report", "differential", "recommendation"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(
                    f"ModelResult.{name} must be a string ('' for no answer); "
                    f"got {type(getattr(self, name)).__name__}"
                )
        for name in ("model_id", "model_hash"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"ModelResult.{name} must be a non-empty string; got {value!r}")
        findings = _mapping(self.findings, "ModelResult.findings")
        unknown = sorted(set(findings) - set(FINDINGS))
        if unknown:
            raise ValueError(
                f"ModelResult.findings has unknown names {unknown}; expected names from {list(FINDINGS)}"
            )
        bad = {k: v for k, v in findings.items() if v not in FINDING_STATES}
        if bad:
            raise ValueError(
                f"ModelResult.findings has invalid states {bad}; expected one of {list(FINDING_STATES)}"
            )
        object.__setattr__(
            self, "findings", {name: findings.get(name, "not_mentioned") for name in FINDINGS}
        )
        for name in ("finding_sources", "prompts"):
            value = _mapping(getattr(self, name), f"ModelResult.{name}")
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
                raise TypeError(f"ModelResult.{name} must map strings to strings; got {value!r}")
            object.__setattr__(self, name, dict(value))
        timings = _mapping(self.timings, "ModelResult.timings")
        object.__setattr__(self, "timings", {str(k): float(v) for k, v in timings.items()})
        if not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"ModelResult.samples must be an integer >= 1; got {self.samples!r}")
        votes = _mapping(self.votes, "ModelResult.votes")
        bad_votes = {
            k: v
            for k, v in votes.items()
            if k not in FINDINGS
            or not isinstance(v, Mapping)
            or not set(v) <= set(FINDING_STATES)
            or sum(v.values()) != self.samples
        }
        if bad_votes:
            raise ValueError(
                "ModelResult.votes must map finding names to {state: count} with counts that "
                f"add up to samples ({self.samples}); got {bad_votes}"
            )
        object.__setattr__(self, "votes", {k: dict(v) for k, v in votes.items()})
        if self.pipeline_version is not None and (
            not isinstance(self.pipeline_version, str) or not self.pipeline_version.strip()
        ):
            raise ValueError(
                "ModelResult.pipeline_version must be a non-empty string or None: the outputs "
                f"identify the pipeline with it; got {self.pipeline_version!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable form (broker messages, the job's result column)."""
        out = asdict(self)
        for name in ("findings", "finding_sources", "prompts", "timings", "votes"):
            out[name] = dict(out[name])
        if self.samples == 1:  # an unvoted result reads as it did before the vote existed
            del out["samples"], out["votes"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelResult:
        """The inverse of :meth:`to_dict`, checked.

        Raises
        ------
        TypeError, ValueError
            When a key is missing or unknown, or a value breaks the contract.
        """
        data = _mapping(data, "ModelResult")
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"ModelResult has unknown fields {unknown}")
        missing = sorted(
            n for n in ("report", "findings", "model_id", "model_hash") if n not in data
        )
        if missing:
            raise ValueError(f"ModelResult lacks {missing}")
        values = dict(data)
        values.setdefault("differential", "")
        values.setdefault("recommendation", "")
        return cls(**values)

    def with_batch(self, batch_id: str, batch_size: int, worker: str | None) -> ModelResult:
        """A copy naming the inference batch and worker it ran in."""
        values = {**self.__dict__, "batch_id": batch_id, "batch_size": batch_size, "worker": worker}
        return ModelResult(**values)

    def for_pipeline(self, pipeline_version: str) -> ModelResult:
        """A copy naming the node's pipeline version, as the output builders need it."""
        return replace(self, pipeline_version=pipeline_version)

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
