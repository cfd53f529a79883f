"""The draft the output builders take: the model's result itself.

There is one draft type, :class:`model.contracts.ModelResult`: checked once, at construction
(every finding named, every state one of :data:`FINDING_STATES`, the model identified), with
what the builders read from it (:attr:`~model.contracts.ModelResult.sections`,
``is_empty``, ``paediatric_prompt``, ``model_name``) and the node's ``pipeline_version``
(:meth:`~model.contracts.ModelResult.for_pipeline`). ``DraftReport`` is that same class under
the name the builders import; new code imports ``ModelResult`` from :mod:`model.contracts`.
"""

from __future__ import annotations

from model.contracts import FINDING_STATES, FINDINGS, ModelResult, split_impression

__all__ = ["FINDINGS", "FINDING_STATES", "DraftReport", "split_impression"]

#: The same class as :class:`model.contracts.ModelResult` (not a copy, not a subclass).
DraftReport = ModelResult
