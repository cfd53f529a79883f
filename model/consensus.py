"""Self-consistency: k sampled reports of one study, voted into one.

The paper's failure signature is variance across repeated inferences. Sampling the report k
times (``GenerationParams.samples``) and voting each finding over the k labelled samples tells
a stable finding from an unstable one:

- each finding's state is the most frequent one among the samples; a tie between states is
  ``uncertain`` (the samples do not settle it);
- a state held by fewer than ``min_agreement`` of the samples becomes ``uncertain`` as well;
- the report text (with its differential and recommendation, which follow from it in the same
  chat) is the sample whose findings agree most with the vote, the earliest on a tie;
- the vote's counts travel with the result (``ModelResult.votes``), so outputs can print
  "Present, 4 of 5 samples".

The k samples decode together: they share the study's image encoding and the prefill of the
prompt (``model.scheduler`` encodes a shared image once and copies a shared prompt's KV prefix
to the other rows), so the cost of k samples is mostly k rows in decode steps that run anyway.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from model.contracts import FINDINGS, ModelResult

__all__ = ["vote"]


def vote(samples: Sequence[ModelResult], min_agreement: float = 0.0) -> ModelResult:
    """One result from ``samples`` of the same study (see the module docstring).

    A single sample is returned unchanged (k = 1 is exactly the unvoted path).
    """
    if not samples:
        raise ValueError("vote needs at least one sample")
    if len(samples) == 1:
        return samples[0]
    k = len(samples)
    voted: dict[str, str] = {}
    votes: dict[str, dict[str, int]] = {}
    for name in FINDINGS:
        counts = Counter(result.findings[name] for result in samples)
        votes[name] = dict(counts)
        (top, n), *rest = counts.most_common()
        tied = bool(rest) and rest[0][1] == n
        voted[name] = "uncertain" if tied or n / k < min_agreement else top
    agreement = [sum(r.findings[n] == voted[n] for n in FINDINGS) for r in samples]
    chosen = samples[agreement.index(max(agreement))]
    values = {**chosen.__dict__, "findings": voted, "samples": k, "votes": votes}
    return ModelResult(**values)
