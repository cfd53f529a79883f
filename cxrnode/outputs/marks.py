"""What a draft's objects say besides its text: a suspected urgent finding, and how many of
the sampled reports agreed on each finding.

Triage (:mod:`cxrnode.triage`) may find an urgent finding; the radiologist must see it where
they look first, not only in the coded findings. So the SC banner reads "AI DRAFT — SUSPECTED
PNEUMOTHORAX — NOT VERIFIED", the text report's first notice says the same, and every series
description starts with "SUSPECTED PNEUMOTHORAX" (OHIF's study browser shows about 24
characters of a description, so the finding must come first to be seen in a PACS list).

With self-consistency (``CONSENSUS_SAMPLES`` = k > 1) each coded finding carries the number of
the k samples that agreed with its voted state, printed "Present, 4 of 5 samples".

The builders take a :class:`DraftMarks` (``None``: an unmarked draft, exactly as before).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["DraftMarks", "marked_series_description"]

#: LO holds 64 characters.
_LO = 64
_STATE_WORDS = {
    "present": "Present",
    "absent": "Absent",
    "uncertain": "Undetermined",
    "not_mentioned": "not mentioned",
}


@dataclass(frozen=True)
class DraftMarks:
    """The marks of one draft.

    Attributes
    ----------
    suspected
        "SUSPECTED PNEUMOTHORAX" when triage made the draft urgent, else None.
    samples
        Reports sampled for the draft (1: no vote).
    votes
        Finding -> {state: samples that had it} (only when samples > 1).
    """

    suspected: str | None = None
    samples: int = 1
    votes: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    @property
    def banner(self) -> str | None:
        """The SC banner of an urgent draft ("AI DRAFT — SUSPECTED X — NOT VERIFIED")."""
        if not self.suspected:
            return None
        return f"AI DRAFT — {self.suspected} — NOT VERIFIED"

    def agreement(self, finding: str, state: str) -> str | None:
        """How many samples had ``state`` (the voted one) for ``finding``: "4 of 5 samples";
        for a state no sample had (coded Undetermined for too little agreement), how the
        samples split: "samples split 3 Present, 2 Absent". None without a vote."""
        counts = self.votes.get(finding)
        if self.samples <= 1 or not counts:
            return None
        if counts.get(state):
            return f"{counts[state]} of {self.samples} samples"
        split = ", ".join(
            f"{n} {_STATE_WORDS.get(s, s)}" for s, n in sorted(counts.items(), key=lambda i: -i[1])
        )
        return f"samples split {split}"


def marked_series_description(plain: str, suspected: str | None) -> str:
    """``plain`` ("AI DRAFT IMAGE - NOT FOR DIAGNOSTIC USE") led by the suspected finding.

    The finding comes first (viewers cut descriptions); the rest of ``plain`` follows as far as
    LO's 64 characters allow, cut at a " - " boundary so it never ends mid-word; "AI DRAFT
    <what it is>" is always kept.
    """
    if not suspected:
        return plain
    parts = plain.split(" - ")
    while len(parts) > 1:
        text = f"{suspected} - {' - '.join(parts)}"
        if len(text) <= _LO:
            return text
        parts.pop()
    # "AI DRAFT <what>" always stays (drafts look like drafts); a finding too long is cut.
    room = _LO - len(parts[0]) - 3
    return f"{suspected[:room].rstrip()} - {parts[0]}"
