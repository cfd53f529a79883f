"""The outputs of a finished job: the DICOM files, and their rows in the outbox.

When the model has answered (job state ``inferred``), the node turns the answer into the
DICOM objects the site asked for in ``OUTPUTS`` (:func:`make_objects`: by default the
text-report SR and the Secondary Capture the radiologist reads; optionally the TID 1500 SR
and an Encapsulated PDF), writes them durably under DATA_DIR/outputs, and records one
:class:`~cxrnode.db.Output` row per object and destination. Recording the rows and marking the job ``done`` happen in one
transaction, so an output is either fully recorded with its file on disk or not at all; the
sender (``cxrnode.outputs.outbox``) works only from those rows.

Why it is safe to run twice: the UIDs of every object are a pure function of the source
image, the model hash, :data:`PIPELINE_VERSION` and the job's version (``cxrnode.uids``), so
a redelivered task writes byte-for-byte the same files, and it finds the rows of the first
run and returns them instead of adding more.

With ``HL7_DESTINATIONS`` configured, the draft is also written as an HL7 ORU^R01
(:mod:`cxrnode.hl7.oru`, kind ``hl7``) with one row per MLLP destination; the DICOM objects go
to ``DESTINATIONS`` only.

Triage (:mod:`cxrnode.triage`) ranks the draft by its findings in the same step: the job's
priority is recorded, its outbox rows carry it (the outbox claims the most urgent first), and an
urgent draft is marked in its objects (:mod:`cxrnode.outputs.marks`), listed for acknowledgement
(:class:`~cxrnode.db.UrgentDraft`) and announced (:class:`~cxrnode.db.Notification` rows,
sent by :mod:`cxrnode.notify`), all in the transaction that records the outputs.

No destinations configured: the files are still written (an admin may fetch them, and a
later ``cxrnode resend --study`` after adding a destination sends them), but no rows are
recorded, because a row means "to be sent somewhere".
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from cxrnode import notify
from cxrnode.db import Instance, Job, JobState, Output, OutputState, UrgentDraft, utcnow
from cxrnode.ingest.record import SourceRecord
from cxrnode.ingest.storage import instance_relpath, write_durably
from cxrnode.jobs.states import transition
from cxrnode.outputs import states as output_states
from cxrnode.outputs.common import PriorDocument, series_description, source_record
from cxrnode.outputs.findings_sr import build_findings_sr
from cxrnode.outputs.marks import DraftMarks, marked_series_description
from cxrnode.outputs.outbox import KIND_ORDER, LEGACY_SR_KIND
from cxrnode.outputs.pdf import build_pdf
from cxrnode.outputs.report_sr import build_report_sr
from cxrnode.outputs.sc import build_sc
from cxrnode.prepare.display import ImagingError
from cxrnode.prepare.images import load_display
from cxrnode.settings import Settings
from cxrnode.triage import Triage, order_priority, parse_priority_table, triage
from cxrnode.uids import OutputKind
from model.contracts import ModelResult

__all__ = [
    "PIPELINE_VERSION",
    "BuiltOutput",
    "build_outputs",
    "full_text_series",
    "make_objects",
    "output_path",
    "previous_sr",
]

log = logging.getLogger(__name__)

_SOP_INSTANCE_UID_TAG = "00080018"  # in the recorded DICOM JSON


def _pipeline_version() -> str:
    try:
        return version("cxrnode")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


#: Version of the node's pipeline (prompting, labelling, rendering): the package version.
#: It goes into every output UID, so a new release makes new instances instead of silently
#: replacing drafts that an older release made.
PIPELINE_VERSION: str = _pipeline_version()


@dataclass(frozen=True)
class BuiltOutput:
    """One written object: what the outbox row needs to know about it."""

    kind: str  # "text_sr", "air_sr", "sc", "pdf" (OutputKind) or "hl7"
    sop_class_uid: str
    sop_instance_uid: str
    path: str  # relative to DATA_DIR/outputs


def output_path(settings: Settings, relpath: str) -> Path:
    """Absolute path of an output file recorded as ``relpath``."""
    return settings.outputs_dir / relpath


def build_outputs(session: Session, settings: Settings, job_id: int) -> list[int]:
    """Build, write and record the outputs of an inferred job; return the outbox row ids.

    The job moves to ``done`` in the same transaction that records the rows. A job whose
    outputs cannot be built (unreadable source, a result that breaks the draft contract)
    moves to ``failed`` with the reason, and nothing is recorded.

    Parameters
    ----------
    session
        A session of the node's database; this function commits it.
    settings
        Where DATA_DIR is and which destinations exist.
    job_id
        The job to finish.

    Returns
    -------
    list[int]
        Ids of the job's outbox rows (one per object and destination) in the order they
        were made; the rows of an earlier run when there was one; ``[]`` when the job
        does not want outputs (not inferred, failed, superseded) or no destination is
        configured.
    """
    job = session.get(Job, job_id)
    if job is None:
        session.rollback()
        return []
    existing = _row_ids(session, job_id)
    if existing or job.state != JobState.inferred:
        session.rollback()
        return existing
    instance = session.get(Instance, job.instance_id)
    if instance is None:
        session.rollback()
        return _fail(session, job_id, job.version, "the job's source instance row is missing")
    raw_result, job_version, recorded_at = job.result, job.version, job.updated_at
    recorded = instance.header or {}
    study_id = job.study_id
    study_uid, sop_uid = instance.study_instance_uid, instance.sop_instance_uid
    source_path = settings.instances_dir / instance.path
    predecessors = {
        kind: previous_sr(session, settings, job, kind)
        for kind in (OutputKind.TEXT_SR, OutputKind.AIR_SR)
        if kind in settings.outputs
    }
    # End the read transaction before the slow part: on SQLite every writing transaction holds
    # the write lock, and the listener must be able to commit arrivals meanwhile.
    session.rollback()

    try:
        if raw_result is None:
            raise ValueError("the job is inferred but holds no model result")
        result = ModelResult.from_dict(raw_result)
        # Checked once here; every builder takes this record (cxrnode.ingest.record).
        if _SOP_INSTANCE_UID_TAG in recorded:
            source = SourceRecord.from_recorded(recorded)
        else:  # recorded before headers were kept (0001 rows)
            source = SourceRecord.from_dataset(
                pydicom.dcmread(source_path, stop_before_pixels=True)
            )
        draft = result.for_pipeline(PIPELINE_VERSION)
        decision = draft_triage(settings, result, source)
        marks = DraftMarks(decision.label, result.samples, result.votes)
        display = (
            load_display(settings, study_uid, sop_uid, source_path)
            if OutputKind.SC in settings.outputs
            else None
        )
        objects = make_objects(
            source,
            display,
            draft,
            version=job_version,
            predecessors=predecessors,
            settings=settings,
            marks=marks,
        )
    except (ImagingError, InvalidDicomError, OSError, TypeError, ValueError) as exc:
        log.warning("job %d: outputs cannot be built: %s", job_id, exc)
        return _fail(session, job_id, job_version, f"outputs cannot be built: {exc}")
    built = [_write(settings, ds, kind) for kind, ds in objects]
    try:
        messages = _hl7_outputs(settings, source, draft, job_version, recorded_at, decision)
    except (OSError, ValueError) as exc:
        log.warning("job %d: the HL7 draft cannot be built: %s", job_id, exc)
        return _fail(session, job_id, job_version, f"the HL7 draft cannot be built: {exc}")

    # Record the rows and the state change in one transaction; a concurrent run that recorded
    # them first (same files, same UIDs) wins, and this one returns its rows.
    existing = _row_ids(session, job_id)
    if existing:
        session.rollback()
        return existing
    if not transition(session, job_id, JobState.done, version=job_version, commit=False):
        session.rollback()
        return _row_ids(session, job_id)
    now = utcnow()
    rows = [
        Output.pending(
            job_id=job_id,
            kind=item.kind,
            destination=destination,
            sop_class_uid=item.sop_class_uid,
            sop_instance_uid=item.sop_instance_uid,
            path=item.path,
            now=now,
            priority=decision.priority.rank,
        )
        for destinations, items in (
            (settings.destinations, built),  # DICOM objects to the PACS
            (settings.hl7_destinations, messages),  # the ORU to the RIS
        )
        for destination in destinations
        for item in items
    ]
    session.add_all(rows)
    session.execute(update(Job).where(Job.id == job_id).values(priority=decision.priority.value))
    if decision.urgent:
        _record_urgent(session, settings, job_id, study_id, source, decision, now)
    superseded = _supersede_older(session, job, now)
    session.flush()
    ids = [row.id for row in rows]
    session.commit()
    log.info(
        "job %d: %s written; %d outbox rows%s",
        job_id,
        ", ".join(f"{item.kind} {item.sop_instance_uid}" for item in built),
        len(ids),
        f"; {superseded} older pending outputs superseded" if superseded else "",
    )
    return ids


def draft_triage(settings: Settings, result: ModelResult, source: SourceRecord) -> Triage:
    """The draft's priority from its (voted) findings, never below the order's."""
    table = parse_priority_table(settings.triage_priorities)
    order = order_priority(source.text("RequestedProcedurePriority") or None)
    return triage(result.findings, table, order)


def _record_urgent(
    session: Session,
    settings: Settings,
    job_id: int,
    study_id: int,
    source: SourceRecord,
    decision: Triage,
    now: datetime,
) -> None:
    """List the draft for acknowledgement and record its announcements (same transaction)."""
    urgent = UrgentDraft(
        job_id=job_id,
        study_id=study_id,
        priority=decision.priority.value,
        suspected=",".join(decision.suspected),
        created_at=now,
    )
    session.add(urgent)
    session.flush()
    payload = notify.urgent_payload(
        study_uid=source.study_instance_uid,
        accession=source.text("AccessionNumber") or None,
        priority=decision.priority.value,
        suspected=decision.suspected,
        job_id=job_id,
        made_at=now,
    )
    session.add_all(notify.new_notifications(settings, payload, urgent.id, now))


def _supersede_older(session: Session, job: Job, now: datetime) -> int:
    """Mark outputs of older versions of the study's draft that are still to be sent
    superseded: a radiologist must not receive a draft that a newer one already replaces."""
    older = select(Job.id).where(Job.study_id == job.study_id, Job.version < job.version)
    rows = session.scalars(
        select(Output)
        .where(Output.job_id.in_(older), Output.state.in_(sorted(output_states.OPEN)))
        .with_for_update()
    ).all()
    return sum(
        output_states.move(
            row, OutputState.superseded, now=now, last_error="a newer draft replaced it"
        )
        for row in rows
    )


def make_objects(
    header: SourceRecord | Dataset,
    display: np.ndarray | None,
    draft: ModelResult,
    *,
    version: int,
    predecessors: Mapping[str, PriorDocument | None],
    settings: Settings,
    marks: DraftMarks | None = None,
) -> list[tuple[str, Dataset]]:
    """The DICOM objects of one draft that ``settings.outputs`` asks for, in the order they
    travel (:data:`~cxrnode.outputs.outbox.KIND_ORDER`): ``(kind, dataset)`` pairs.

    Pure: no I/O. ``header`` is the source image's checked record (a dataset is checked
    first; no pixel data needed),
    ``display`` its 8-bit display image (uint8, H x W) as the prepare step made it, and
    ``predecessors`` the SR each SR kind replaces (by kind; absent or ``None``: none);
    ``marks`` a suspected urgent finding and the samples' agreement, printed by each object.
    """
    institution = settings.institution_name
    header = source_record(header)  # checked once, whatever the number of objects
    wanted = sorted((OutputKind(kind) for kind in settings.outputs), key=KIND_ORDER.__getitem__)
    objects: list[tuple[str, Dataset]] = []
    for kind in wanted:
        if kind == OutputKind.TEXT_SR:
            ds = build_report_sr(
                header,
                draft,
                version=version,
                predecessor=predecessors.get(kind),
                institution_name=institution,
                marks=marks,
            )
        elif kind == OutputKind.AIR_SR:
            ds = build_findings_sr(
                header,
                draft,
                version=version,
                predecessor=predecessors.get(kind),
                institution_name=institution,
                marks=marks,
            )
        elif kind == OutputKind.SC:
            if display is None:
                raise ValueError("the Secondary Capture needs the display image")
            ds = build_sc(
                header,
                display,
                draft,
                version=version,
                institution_name=institution,
                full_text_series=full_text_series(
                    settings.outputs, marks.suspected if marks else None
                ),
                marks=marks,
            )
        else:
            ds = build_pdf(
                header, draft, version=version, institution_name=institution, marks=marks
            )
        objects.append((kind.value, ds))
    return objects


def full_text_series(outputs: Sequence[str], suspected: str | None = None) -> str | None:
    """Series description of the object a reader of the SC should open for the full text:
    the text report, else the PDF; ``None`` when the site makes neither."""
    for kind in (OutputKind.TEXT_SR, OutputKind.PDF):
        if kind in outputs:
            return marked_series_description(series_description(kind), suspected)
    return None


def previous_sr(
    session: Session, settings: Settings, job: Job, kind: OutputKind | str
) -> PriorDocument | None:
    """The SR of ``kind`` that a new version of a study's draft replaces, if one reached a
    destination.

    That is the SR of that kind of the highest earlier version of the same study that was
    delivered. Older drafts still pending are superseded by the new one and never sent, and
    a dead one never reached the PACS, so a viewer could not follow either reference. Its
    UIDs are read from its file: the model or pipeline of the earlier version may differ, so
    they cannot be recomputed. Rows recorded as ``sr`` (before the text report existed, that
    was the TID 1500 SR) count as ``air_sr``.
    """
    kinds = [OutputKind(kind).value]
    if kinds == [OutputKind.AIR_SR.value]:
        kinds.append(LEGACY_SR_KIND)
    row = session.scalars(
        select(Output)
        .join(Job, Output.job_id == Job.id)
        .where(
            Job.study_id == job.study_id,
            Job.version < job.version,
            Output.kind.in_(kinds),
            Output.state.in_([OutputState.delivered, OutputState.delivered_warning]),
        )
        .order_by(Job.version.desc(), Output.id)
        .limit(1)
    ).first()
    if row is None:
        return None
    try:
        prior = pydicom.dcmread(output_path(settings, row.path), stop_before_pixels=True)
        return PriorDocument.from_dataset(prior)
    except (InvalidDicomError, OSError, AttributeError, ValueError) as exc:
        log.warning(
            "job %d: the previous %s %s cannot be read (%s); the new version will not reference it",
            job.id,
            row.kind,
            row.sop_instance_uid,
            exc,
        )
        return None


def _row_ids(session: Session, job_id: int) -> list[int]:
    return list(
        session.scalars(select(Output.id).where(Output.job_id == job_id).order_by(Output.id))
    )


def _fail(session: Session, job_id: int, version: int, reason: str) -> list[int]:
    transition(session, job_id, JobState.failed, version=version, error=reason)
    return []


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _hl7_outputs(
    settings: Settings,
    header: SourceRecord,
    draft: ModelResult,
    version: int,
    made_at: datetime,
    decision: Triage | None = None,
) -> list[BuiltOutput]:
    """The HL7 ORU draft, written durably, when MLLP destinations exist (else nothing)."""
    if not settings.hl7_destinations:
        return []
    from cxrnode.hl7.oru import build_oru

    oru = build_oru(
        header,
        draft,
        version=version,
        made_at=made_at,
        sending_application=settings.hl7_sending_application,
        sending_facility=settings.hl7_sending_facility,
        receiving_application=settings.hl7_receiving_application,
        receiving_facility=settings.hl7_receiving_facility,
        **({"priority": decision.priority, "suspected": decision.suspected} if decision else {}),
    )
    relpath = f"{header.study_instance_uid}/{oru.uid}.hl7"
    instance_relpath(header.study_instance_uid, oru.uid)  # both UIDs checked for the path
    write_durably(output_path(settings, relpath), [oru.encode()], settings.tmp_dir)
    return [BuiltOutput("hl7", "", oru.uid, relpath)]


def _write(settings: Settings, ds: Dataset, kind: str) -> BuiltOutput:
    relpath = instance_relpath(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
    write_durably(output_path(settings, relpath), [_encode(ds)], settings.tmp_dir)
    return BuiltOutput(kind, str(ds.SOPClassUID), str(ds.SOPInstanceUID), relpath)
