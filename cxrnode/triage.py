"""Triage: which drafts are urgent, and how urgent.

A pneumothorax read hours later is the case that matters. The node ranks each draft by the
findings it codes present, using a site's priority table (``TRIAGE_PRIORITIES``). The default
follows the worklist-prioritisation study of Baltruschat et al. (Eur Radiol 2021), which
ranked pneumothorax first and pleural effusion and consolidation (infiltrate) next:
pneumothorax present is ``stat``, pleural effusion or consolidation present ``asap``, anything
else ``routine``.

The same study warns that a false negative sinks to the end of the worklist, so the draft may
only raise a study's priority: where the order already carries one (DICOM Requested Procedure
Priority), the result is never lower than it.

Pure functions only: :mod:`cxrnode.outputs.build` records the result, the builders print it,
:mod:`cxrnode.notify` announces it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from model.contracts import FINDINGS

__all__ = [
    "OFF",
    "Priority",
    "Triage",
    "order_priority",
    "parse_priority_table",
    "suspected_label",
    "triage",
]

OFF = "off"


class Priority(enum.StrEnum):
    """A draft's reading priority, most urgent first (HL7 TQ1-9 codes S, A, R)."""

    stat = "stat"
    asap = "asap"
    routine = "routine"

    @property
    def rank(self) -> int:
        """0 for stat, 1 for ASAP, 2 for routine: sorts most urgent first."""
        return _RANK[self]

    @property
    def hl7(self) -> str:
        """HL7 v2 table 0485 code: S (stat), A (ASAP), R (routine)."""
        return {"stat": "S", "asap": "A", "routine": "R"}[self.value]

    @property
    def urgent(self) -> bool:
        return self is not Priority.routine


_RANK = {Priority.stat: 0, Priority.asap: 1, Priority.routine: 2}

#: DICOM Requested Procedure Priority (0040,1003) values and what they mean here.
_ORDER_PRIORITIES = {
    "STAT": Priority.stat,
    "HIGH": Priority.asap,
    "MEDIUM": Priority.routine,
    "ROUTINE": Priority.routine,
    "LOW": Priority.routine,
}


def parse_priority_table(text: str) -> dict[str, Priority]:
    """``"pneumothorax=stat,pleural_effusion=asap"`` -> ``{finding: Priority}``.

    ``"off"`` or an empty string is an empty table (triage off).

    Raises
    ------
    ValueError
        Naming the entry that is not ``finding=stat|asap|routine`` with a known finding.
    """
    text = text.strip()
    if not text or text.lower() == OFF:
        return {}
    table: dict[str, Priority] = {}
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        name, sep, level = (piece.strip().lower() for piece in entry.partition("="))
        if (
            not sep
            or name not in FINDINGS
            or name == "no_finding"
            or level not in {p.value for p in Priority}
        ):
            raise ValueError(
                f"TRIAGE_PRIORITIES entry {entry!r} is not finding=stat|asap|routine; findings "
                f"are {', '.join(n for n in FINDINGS if n != 'no_finding')}, or set 'off'"
            )
        table[name] = Priority(level)
    return table


def order_priority(value: str | None) -> Priority | None:
    """The priority an order carries (DICOM Requested Procedure Priority), if it says one."""
    if not value:
        return None
    return _ORDER_PRIORITIES.get(str(value).strip().upper())


@dataclass(frozen=True)
class Triage:
    """A draft's priority and the findings that set it (most urgent first)."""

    priority: Priority = Priority.routine
    suspected: tuple[str, ...] = field(default_factory=tuple)

    @property
    def urgent(self) -> bool:
        """True when the draft itself raised the priority (not only the order)."""
        return bool(self.suspected) and self.priority.urgent

    @property
    def label(self) -> str | None:
        """ "SUSPECTED PNEUMOTHORAX" (the most urgent finding), or None when not urgent."""
        return suspected_label(self.suspected[:1]) if self.urgent else None

    def to_dict(self) -> dict[str, object]:
        return {"priority": self.priority.value, "suspected": list(self.suspected)}


def suspected_label(findings: tuple[str, ...] | list[str]) -> str | None:
    """``("pneumothorax", "pleural_effusion")`` -> "SUSPECTED PNEUMOTHORAX, PLEURAL EFFUSION"."""
    if not findings:
        return None
    return "SUSPECTED " + ", ".join(name.replace("_", " ").upper() for name in findings)


def triage(
    findings: Mapping[str, str],
    table: Mapping[str, Priority],
    order: Priority | None = None,
) -> Triage:
    """The priority of a draft with ``findings`` (name -> present/absent/...).

    Findings coded present that the table ranks above routine are the suspected ones, the
    most urgent first (then in the table's order). The result is the most urgent of those
    and of ``order``: a draft never lowers what the order said.
    """
    raised = [
        (table[name].rank, index, name)
        for index, name in enumerate(table)
        if findings.get(name) == "present" and table[name].urgent
    ]
    raised.sort()
    suspected = tuple(name for _, _, name in raised)
    candidates = [table[name] for name in suspected]
    if order is not None:
        candidates.append(order)
    priority = min(candidates, key=lambda p: p.rank, default=Priority.routine)
    return Triage(priority, suspected)
