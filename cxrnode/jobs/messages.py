"""The pipeline's task messages: one typed contract per broker hop.

Each class is the one message that starts one step (:mod:`cxrnode.jobs.steps`; inference in
``worker/tasks.py``). The dispatcher publishes an instance (:meth:`Dispatcher.publish
<cxrnode.jobs.dispatch.Dispatcher.publish>`) and the worker registers its Celery task from the
same class (``@app.task(name=PrepareImage.task)``), so a reader or a code-navigation tool
follows a hop from the publisher to the step by the class name, and nobody spells a task name
or picks an argument by position.

==================  =========  ==================================================  ==========
message             queue      step                                                next
==================  =========  ==================================================  ==========
:class:`PrepareImage`  prepare  ``steps.prepare``: decode once, keep images        InferReport
:class:`InferReport`   infer    ``worker.tasks.infer_report``: the model (GPU)     RecordResult
:class:`RecordResult`  outputs  ``steps.record``, then ``steps.build`` in-process   SendOutputs
:class:`RecordProblem` outputs  ``steps.record_problem``: waiting_model / failed   —
:class:`BuildOutputs`  outputs  ``steps.build`` (recovery of a lost record run)    SendOutputs
:class:`SendOutputs`   send     ``steps.send``: one association per study          WakeScheduler
==================  =========  ==================================================  ==========

The queues ``prepare``, ``outputs`` and ``send`` have a copy per node host (:func:`host_queue`):
a job's message goes to the copy of the host holding its files, and :class:`InferReport`
carries that host so the GPU side answers to it.

On the wire a message is one JSON object, the task's only argument: its fields and
``"schema"``, the version of its contract. A worker meeting a schema it does not know (a GPU
host still on an older release during a rolling upgrade), or a message of the positional form
that releases before these contracts sent, refuses it with one log line and changes nothing;
the job's state is untouched, so the reconciler sends it again once a worker that understands
it is running. Change a message's fields only together with its ``schema``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Self, TypeVar

import numpy as np

from cxrnode.db import JobState
from cxrnode.jobs.tracking import job_key, output_key
from cxrnode.prepare.images import encode_model_input
from cxrnode.settings import Settings
from model.contracts import GenerationParams, ModelResult, StudyContext

__all__ = [
    "MESSAGES",
    "SCHEMA_KEY",
    "STAGE_QUEUES",
    "TASK_QUEUES",
    "BadMessage",
    "BuildOutputs",
    "InferReport",
    "KeepDisplay",
    "Message",
    "PrepareImage",
    "RecordProblem",
    "RecordResult",
    "SendOutputs",
    "SendUrgentOutputs",
    "UnknownSchema",
    "WakeScheduler",
    "accept",
    "HOST_QUEUES",
    "base_queue",
    "consumed_queues",
    "generation_params",
    "host_queue",
    "infer_message",
    "message_type",
]

log = logging.getLogger(__name__)

#: The key of a message's contract version in its wire form.
SCHEMA_KEY = "schema"


class BadMessage(ValueError):
    """A message that does not fit its contract (missing, unknown or ill-typed fields)."""


class UnknownSchema(BadMessage):
    """A message of a contract version this release does not know."""


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadMessage(f"{what} must be an integer; got {value!r}")
    return value


def stage_of(task: str) -> str:
    """A task's short name (``cxrnode.prepare_image`` -> ``prepare_image``)."""
    return task.removeprefix("cxrnode.")


@dataclass(frozen=True)
class Message:
    """A task message: its task and queue, its contract version, its wire form."""

    #: The Celery task that runs this message's step (named once, here).
    task: ClassVar[str]
    #: The broker queue it travels in.
    queue: ClassVar[str]
    #: The version of its contract; raised whenever its fields change.
    schema: ClassVar[int] = 1
    #: Fields held as a typed contract of their own, decoded with its ``from_dict``.
    nested: ClassVar[Mapping[str, Any]] = {}

    @property
    def stage(self) -> str:
        """The short task name, as the tracking marks and the logs show it."""
        return stage_of(self.task)

    def tracking_keys(self) -> list[str]:
        """What a worker holds while it runs this message (:mod:`cxrnode.jobs.tracking`)."""
        return []

    def to_wire(self) -> dict[str, Any]:
        """The JSON object the broker carries."""
        wire: dict[str, Any] = {SCHEMA_KEY: self.schema}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in self.nested:
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            wire[f.name] = value
        return wire

    @classmethod
    def from_wire(cls, wire: Any) -> Self:
        """The message of a wire object, checked.

        Raises
        ------
        UnknownSchema
            The object carries no schema or one this release does not know.
        BadMessage
            A field is missing, unknown, or breaks the contract.
        """
        if not isinstance(wire, Mapping):
            raise UnknownSchema(
                f"{cls.__name__} must be one JSON object with {SCHEMA_KEY!r}; got "
                f"{type(wire).__name__} (a message from a release before typed messages?)"
            )
        schema = wire.get(SCHEMA_KEY)
        if schema != cls.schema:
            raise UnknownSchema(
                f"{cls.__name__} of schema {schema!r}; this release reads schema {cls.schema} "
                "(upgrade the older side of the node/worker pair)"
            )
        names = {f.name for f in fields(cls)}
        body = {k: v for k, v in wire.items() if k != SCHEMA_KEY}
        unknown, missing = sorted(set(body) - names), sorted(names - set(body))
        if unknown or missing:
            raise BadMessage(f"{cls.__name__} has unknown fields {unknown}, lacks {missing}")
        try:
            for name, contract in cls.nested.items():
                body[name] = contract.from_dict(body[name])
            return cls(**body)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, BadMessage):
                raise
            raise BadMessage(f"{cls.__name__}: {exc}") from exc


@dataclass(frozen=True)
class JobMessage(Message):
    """A message about one job version: a step acts only while the job is at this version."""

    job_id: int
    version: int

    def __post_init__(self) -> None:
        _int(self.job_id, f"{type(self).__name__}.job_id")
        _int(self.version, f"{type(self).__name__}.version")

    def tracking_keys(self) -> list[str]:
        return [job_key(self.job_id)]


@dataclass(frozen=True)
class PrepareImage(JobMessage):
    """Decode the job's chosen image once; keep its display image and model input."""

    task: ClassVar[str] = "cxrnode.prepare_image"
    queue: ClassVar[str] = "prepare"


@dataclass(frozen=True)
class InferReport(JobMessage):
    """Everything the GPU side needs for one study: it has no database and no shared disk.

    ``model_input_b64`` is the model input as base64 of its raw bytes: 512 x 512 uint8,
    row-major, no header (:func:`cxrnode.prepare.images.encode_model_input`). ``node_host``
    is the node host that prepared it and holds the display image: the answer goes to its
    ``outputs`` queue (:func:`host_queue`). Schema 2 added it.
    """

    task: ClassVar[str] = "cxrnode.infer_report"
    queue: ClassVar[str] = "infer"
    schema: ClassVar[int] = 2
    nested: ClassVar[Mapping[str, Any]] = {"context": StudyContext, "params": GenerationParams}

    model_input_b64: str
    context: StudyContext
    params: GenerationParams
    node_host: str

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.model_input_b64, str):
            raise BadMessage(
                f"InferReport.model_input_b64 must be a base64 string; got "
                f"{type(self.model_input_b64).__name__}"
            )
        if not isinstance(self.node_host, str) or not self.node_host:
            raise BadMessage(f"InferReport.node_host must name a node host; got {self.node_host!r}")


@dataclass(frozen=True)
class RecordResult(JobMessage):
    """The model's answer for one job version, to be recorded once."""

    task: ClassVar[str] = "cxrnode.record_result"
    queue: ClassVar[str] = "outputs"
    nested: ClassVar[Mapping[str, Any]] = {"result": ModelResult}

    result: ModelResult


#: The states the inference side may report (it has no database of its own).
PROBLEM_STATES = frozenset({JobState.waiting_model, JobState.failed})


@dataclass(frozen=True)
class RecordProblem(JobMessage):
    """A state reported by the inference side: no usable model, or inference failed."""

    task: ClassVar[str] = "cxrnode.record_problem"
    queue: ClassVar[str] = "outputs"

    state: JobState
    reason: str

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.state not in PROBLEM_STATES:
            raise BadMessage(
                f"RecordProblem.state must be one of {sorted(PROBLEM_STATES)}; got {self.state!r}"
            )
        object.__setattr__(self, "state", JobState(self.state))
        if not isinstance(self.reason, str):
            raise BadMessage(f"RecordProblem.reason must be a string; got {self.reason!r}")


@dataclass(frozen=True)
class BuildOutputs(JobMessage):
    """Build the outputs of a recorded result (recovery after a lost ``RecordResult`` run)."""

    task: ClassVar[str] = "cxrnode.build_outputs"
    queue: ClassVar[str] = "outputs"


@dataclass(frozen=True)
class SendOutputs(Message):
    """One study's claimed outputs for one destination: one association's worth."""

    task: ClassVar[str] = "cxrnode.send_outputs"
    queue: ClassVar[str] = "send"

    destination: str
    output_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.destination, str) or not self.destination:
            raise BadMessage(
                f"SendOutputs.destination must be a destination entry; got {self.destination!r}"
            )
        if not isinstance(self.output_ids, list | tuple):
            raise BadMessage(f"SendOutputs.output_ids must be a list; got {self.output_ids!r}")
        ids = tuple(_int(i, "SendOutputs.output_ids[]") for i in self.output_ids)
        object.__setattr__(self, "output_ids", ids)

    def tracking_keys(self) -> list[str]:
        return [output_key(i) for i in self.output_ids]


@dataclass(frozen=True)
class SendUrgentOutputs(SendOutputs):
    """Not a broker message: an urgent draft's claimed outputs for one destination, sent by
    the worker that built them, ahead of everything waiting in the send queue (triage:
    :mod:`cxrnode.triage`). The worker holds them while it sends, as it would a
    :class:`SendOutputs` it received, so the reconciler does not take them for lost."""

    task: ClassVar[str] = ""
    queue: ClassVar[str] = ""


@dataclass(frozen=True)
class KeepDisplay(Message):
    """Not a broker message: the last part of the prepare step, run in the same process
    once its :class:`InferReport` is published (so the model works meanwhile): keep the
    display image at the size the Secondary Capture uses, so building the outputs neither
    decodes nor resamples the source."""

    task: ClassVar[str] = ""
    queue: ClassVar[str] = ""

    study_instance_uid: str
    sop_instance_uid: str
    display: np.ndarray = field(compare=False, repr=False)  # 8-bit, as prepare made it


@dataclass(frozen=True)
class WakeScheduler(Message):
    """Not a task: a step asks the scheduler to look again now (an output to retry later)."""

    task: ClassVar[str] = ""
    queue: ClassVar[str] = ""


def generation_params(settings: Settings) -> GenerationParams:
    """The decoding parameters every inference request of this node carries."""
    return GenerationParams(
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_new_tokens=settings.max_new_tokens,
        samples=settings.consensus_samples,
        min_agreement=settings.consensus_min_agreement,
    )


def infer_message(
    settings: Settings,
    job_id: int,
    version: int,
    image: np.ndarray,
    context: StudyContext,
    node_host: str | None = None,
) -> InferReport:
    """The inference request of a prepared job: the message carries everything the GPU side
    needs (image, context, decoding parameters, where to answer), so that side needs no
    database. ``node_host``: the host holding the job's prepared images (default: this one)."""
    return InferReport(
        job_id,
        version,
        encode_model_input(image),
        context,
        generation_params(settings),
        node_host or settings.node_host,
    )


#: The queues whose steps read or write a node host's DATA_DIR: each node host has its own
#: copy of them (``prepare.<host>``, ...), consumed by its node-side worker; ``infer`` is one
#: queue for every GPU worker (they need only the broker).
HOST_QUEUES = frozenset({"prepare", "outputs", "send"})


def host_queue(queue: str, node_host: str | None) -> str:
    """The queue a message of ``queue`` travels in for work on ``node_host``:
    ``prepare.<host>`` for a host-bound queue, the plain name otherwise (``infer``, or no host
    named: the plain queues every node-side worker also consumes)."""
    if node_host and queue in HOST_QUEUES:
        return f"{queue}.{node_host}"
    return queue


def consumed_queues(queues: Iterable[str], node_host: str) -> list[str]:
    """What a worker asked for ``queues`` consumes on ``node_host``: each host-bound queue
    twice, its host's copy and the plain one (messages published before 0005a, or by a
    release without host queues), so ``--queues prepare,outputs,send`` keeps its meaning."""
    consumed: list[str] = []
    for queue in queues:
        consumed += dict.fromkeys((queue, host_queue(queue, node_host)))
    return consumed


def base_queue(queue: str) -> str:
    """The queue a per-host queue is a copy of (``prepare.node-a`` -> ``prepare``)."""
    return queue.split(".", 1)[0]


#: Every message a worker consumes.
MESSAGES: tuple[type[Message], ...] = (
    PrepareImage,
    InferReport,
    RecordResult,
    RecordProblem,
    BuildOutputs,
    SendOutputs,
)
#: The queue of each task (Celery's routes, and where the reconciler looks for a message).
TASK_QUEUES: dict[str, str] = {cls.task: cls.queue for cls in MESSAGES}
#: Stage (the short task name the tracking marks carry) -> queue.
STAGE_QUEUES: dict[str, str] = {stage_of(cls.task): cls.queue for cls in MESSAGES}
_BY_TASK: dict[str, type[Message]] = {cls.task: cls for cls in MESSAGES}


def message_type(task: str) -> type[Message] | None:
    """The message class of a task name (None: not one of ours)."""
    return _BY_TASK.get(task)


M = TypeVar("M", bound=Message)


def accept(cls: type[M], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> M | None:
    """The message a task was called with, or None (with one log line) when it is refused.

    A refused message changes nothing: its job keeps its state, and the reconciler sends
    it again (from a node that speaks this release's contract) once it counts as lost.
    """
    try:
        if kwargs or len(args) != 1:
            raise UnknownSchema(
                f"{cls.__name__} must arrive as one JSON object; got {len(args)} positional "
                f"and {len(kwargs)} keyword arguments (a message from a release before typed "
                "messages?)"
            )
        return cls.from_wire(args[0])
    except BadMessage as exc:
        log.error("%s refused: %s", cls.task, exc)
        return None
