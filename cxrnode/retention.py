"""Retention: remove a study's files some days after it is delivered; keep its records.

The node is not an archive: the PACS holds the radiographs and, once delivered, the drafts.
What the node keeps under DATA_DIR (received instances, the prepared display image and model
input, the emitted SR/SC/PDF files) is only needed until the study's draft has reached every
destination. Without retention the data directory grows forever.

**When a study's files go.** A study is *done with* when

- it is not receiving (its quiet period is over: settled or skipped),
- none of its jobs is open (every job done, failed or superseded),
- none of its outputs is waiting or dead (every output delivered, delivered with a warning, or
  superseded; a dead letter is kept for `cxrnode resend`),

and nothing about it changed for ``RETENTION_DAYS``: no arrival, no job move, no output
outcome since the cut-off. A study with nothing to send (a skipped study, a failed job, a
site without destinations) counts as done with once it is quiet that long.

**What goes.** The instance files recorded for the study, the output files recorded for it,
and in ``DATA_DIR/prepared/<study>/`` and ``DATA_DIR/outputs/<study>/`` any file older than
the cut-off (outputs written without an outbox row, when no destination is configured). Empty
study directories are removed. Files newer than the cut-off are never touched, so an image
arriving for the study while the pass runs stays.

**What stays.** Every row: studies, instances and outputs get ``purged_at``; jobs, their
history and association logs are untouched. `cxrnode status` and the metrics read the counts
(:func:`retention_counts`, :func:`retention_metrics`).

**How often.** `cxrnode serve` runs :func:`run_retention` in a thread that sleeps
``RETENTION_INTERVAL_SECONDS`` (an hour) between passes; an idle pass is one indexed
read-only query. Work is done in batches of :data:`BATCH_STUDIES` studies, one transaction
each, so the listener can commit arrivals in between.

**Two node hosts.** Where two node hosts share the database, deciding what is due is a
singleton: only the holder of the lease (:mod:`cxrnode.jobs.lease`) runs :func:`purge_due`.
Each host holds only its own files (``instances.node_host``, ``jobs.node_host``), so the
holder removes its own and marks the study; the other host removes its files of the purged
study at its next pass (:func:`purge_left_behind`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Select, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from cxrnode.db import (
    FINAL_JOB_STATES,
    Instance,
    Job,
    Output,
    OutputState,
    Study,
    StudyState,
    utcnow,
)
from cxrnode.settings import Settings
from cxrnode.uids import is_valid_uid

__all__ = [
    "BATCH_STUDIES",
    "DELIVERED_STATES",
    "FIRST_PASS_DELAY",
    "PurgeResult",
    "cutoff",
    "due_studies",
    "purge_due",
    "purge_left_behind",
    "retention_counts",
    "retention_metrics",
    "run_retention",
]

log = logging.getLogger(__name__)

#: Output states after which nothing remains to send.
DELIVERED_STATES = frozenset(
    {OutputState.delivered, OutputState.delivered_warning, OutputState.superseded}
)
#: Studies purged in one transaction.
BATCH_STUDIES = 100
#: Seconds after `serve` starts before the first pass (at most the interval).
FIRST_PASS_DELAY = 60.0


@dataclass(frozen=True)
class PurgeResult:
    """What one pass removed."""

    studies: int = 0
    instances: int = 0
    outputs: int = 0
    files: int = 0
    bytes: int = 0

    def __add__(self, other: PurgeResult) -> PurgeResult:
        return PurgeResult(
            self.studies + other.studies,
            self.instances + other.instances,
            self.outputs + other.outputs,
            self.files + other.files,
            self.bytes + other.bytes,
        )


def cutoff(settings: Settings, now: datetime | None = None) -> datetime | None:
    """Moment before which a done-with study's files may go (None: retention is off)."""
    if settings.retention_days <= 0:
        return None
    return (now or utcnow()) - timedelta(days=settings.retention_days)


def due_studies(before: datetime, limit: int = BATCH_STUDIES) -> Select[Any]:
    """Ids of unpurged studies done with and quiet since ``before``, oldest first."""
    open_jobs = (
        select(Job.id)
        .where(
            Job.study_id == Study.id,
            or_(Job.state.not_in(sorted(FINAL_JOB_STATES)), Job.updated_at >= before),
        )
        .exists()
    )
    unsent_outputs = (
        select(Output.id)
        .join(Job, Output.job_id == Job.id)
        .where(
            Job.study_id == Study.id,
            or_(Output.state.not_in(sorted(DELIVERED_STATES)), Output.updated_at >= before),
        )
        .exists()
    )
    return (
        select(Study.id)
        .where(
            Study.purged_at.is_(None),
            Study.last_arrival < before,
            Study.state != StudyState.receiving,
            ~open_jobs,
            ~unsent_outputs,
        )
        .order_by(Study.last_arrival, Study.id)
        .limit(limit)
    )


def purge_due(
    settings: Settings,
    sessions: sessionmaker,
    readers: sessionmaker | None = None,
    *,
    now: datetime | None = None,
    stop: threading.Event | None = None,
) -> PurgeResult:
    """Remove the files of every study that is due; return what was removed.

    ``readers`` (a read-only engine's sessions) answers the first "anything due?" question
    without taking SQLite's write lock; the work itself runs on ``sessions``.
    """
    before = cutoff(settings, now)
    if before is None:
        return PurgeResult()
    with (readers or sessions)() as session:
        anything = session.scalars(due_studies(before, limit=1)).first()
        session.rollback()
    total = PurgeResult()
    while anything is not None and not (stop is not None and stop.is_set()):
        done = _purge_batch(settings, sessions, before, now or utcnow())
        total += done
        if done.studies < BATCH_STUDIES:
            break
    if total.studies:
        log.info(
            "retention: removed the files of %d studies (%d instances, %d outputs; %d files, "
            "%.1f MB) delivered more than %g days ago",
            total.studies,
            total.instances,
            total.outputs,
            total.files,
            total.bytes / 1e6,
            settings.retention_days,
        )
    return total


def _purge_batch(
    settings: Settings, sessions: sessionmaker, before: datetime, now: datetime
) -> PurgeResult:
    """One transaction: lock a batch of due studies, remove their files, mark their rows."""
    result = PurgeResult()
    with sessions() as session:
        query = due_studies(before).with_for_update(of=Study, skip_locked=True)
        study_ids = list(session.scalars(query).all())
        for study_id in study_ids:
            result += _purge_study(session, settings, study_id, before, now)
        session.commit()
    _audit_deleted(settings, sessions, study_ids)
    return result


def _audit_deleted(settings: Settings, sessions: sessionmaker, study_ids: list[int]) -> None:
    """110105 Study Deleted for each study whose files were removed (after the commit)."""
    if not study_ids:
        return
    try:
        from cxrnode.audit import patient_id_of
        from cxrnode.audit.dicom import study_deleted

        with sessions() as session:
            uids = session.scalars(
                select(Study.study_instance_uid).where(Study.id.in_(study_ids))
            ).all()
            for uid in uids:
                study_deleted(settings, uid, patient_id_of(session, uid))
            session.rollback()
    except Exception:
        log.exception("cannot write the audit records of %d removed studies", len(study_ids))


def _purge_study(
    session: Session, settings: Settings, study_id: int, before: datetime, now: datetime
) -> PurgeResult:
    """Remove the study's files held by this node host (``settings.node_host``) and mark
    their rows; the study is marked too, and another node host removes its own files of it
    at its next pass (:func:`purge_left_behind`)."""
    host = settings.node_host
    study = session.get(Study, study_id)
    assert study is not None
    uid = study.study_instance_uid
    instances = session.scalars(
        select(Instance).where(
            Instance.study_id == study_id, Instance.purged_at.is_(None), _held_by(Instance, host)
        )
    ).all()
    outputs = session.scalars(
        select(Output)
        .join(Job, Output.job_id == Job.id)
        .where(Job.study_id == study_id, Output.purged_at.is_(None), _held_by(Job, host))
    ).all()
    files = nbytes = 0
    for root, relpaths in (
        (settings.instances_dir, [i.path for i in instances]),
        (settings.outputs_dir, [o.path for o in outputs]),
    ):
        for relpath in relpaths:
            removed = _remove(root, root / relpath)
            files += removed > 0
            nbytes += max(removed, 0)
    if is_valid_uid(uid):
        cutoff_ts = _timestamp(before)
        for root in (settings.outputs_dir, settings.prepared_dir):
            for path in _files_older_than(root / uid, cutoff_ts):
                removed = _remove(root, path)
                files += removed > 0
                nbytes += max(removed, 0)
        for root in (settings.instances_dir, settings.outputs_dir, settings.prepared_dir):
            _remove_empty_dir(root / uid)
    study.purged_at = study.purged_at or now
    if instances:
        session.execute(
            update(Instance)
            .where(Instance.id.in_([i.id for i in instances]))
            .values(purged_at=now)
            .execution_options(synchronize_session=False)
        )
    if outputs:
        session.execute(
            update(Output)
            .where(Output.id.in_([o.id for o in outputs]))
            .values(purged_at=now)
            .execution_options(synchronize_session=False)
        )
    return PurgeResult(1, len(instances), len(outputs), files, nbytes)


def _held_by(table: Any, host: str) -> Any:
    """Rows whose files are in this node host's DATA_DIR (NULL: recorded before 0005a, when
    one node host held everything)."""
    return or_(table.node_host == host, table.node_host.is_(None))


def purge_left_behind(
    settings: Settings, sessions: sessionmaker, *, now: datetime | None = None
) -> PurgeResult:
    """Remove this node host's files of studies another node host purged.

    Deciding which studies are due is a singleton (:func:`purge_due` runs on the holder of
    the lease); each node host removes only the files in its own DATA_DIR, so the files a
    split study left on the other host are removed by that host here, at its next pass.
    """
    before = cutoff(settings, now)
    if before is None:
        return PurgeResult()
    now = now or utcnow()
    host = settings.node_host
    with sessions() as session:
        left = set(
            session.scalars(
                select(Instance.study_id)
                .join(Study, Instance.study_id == Study.id)
                .where(
                    Instance.node_host == host,
                    Instance.purged_at.is_(None),
                    Study.purged_at.is_not(None),
                )
                .limit(BATCH_STUDIES)
            )
        )
        left |= set(
            session.scalars(
                select(Job.study_id)
                .join(Output, Output.job_id == Job.id)
                .join(Study, Job.study_id == Study.id)
                .where(
                    Job.node_host == host,
                    Output.purged_at.is_(None),
                    Study.purged_at.is_not(None),
                )
                .limit(BATCH_STUDIES)
            )
        )
        result = PurgeResult()
        for study_id in sorted(i for i in left if i is not None):
            done = _purge_study(session, settings, study_id, before, now)
            result += PurgeResult(0, done.instances, done.outputs, done.files, done.bytes)
        session.commit()
    if result.files:
        log.info(
            "retention: removed this host's %d files (%.1f MB) of studies purged elsewhere",
            result.files,
            result.bytes / 1e6,
        )
    return result


def _timestamp(moment: datetime) -> float:
    """POSIX time of a naive UTC datetime (how the database stores moments)."""
    return (moment - datetime(1970, 1, 1)).total_seconds()


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _remove(root: Path, path: Path) -> int:
    """Unlink ``path`` (which must lie under ``root``); its size, 0 when it was already gone,
    -1 when it could not be removed (logged)."""
    if not _inside(root, path):
        log.warning("retention: %s is outside %s; left alone", path, root)
        return -1
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.warning("retention: cannot remove %s: %s", path, exc)
        return -1
    return size


def _files_older_than(directory: Path, timestamp: float) -> Iterable[Path]:
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    return [
        Path(entry.path)
        for entry in entries
        if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < timestamp
    ]


def _remove_empty_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # a directory that still holds something stays
        directory.rmdir()


# --------------------------------------------------------------------------- the loop


def run_retention(
    settings: Settings,
    sessions: sessionmaker,
    readers: sessionmaker | None,
    stop: threading.Event,
    leads: Callable[[], bool] | None = None,
) -> None:
    """Body of `serve`'s retention thread: a pass every ``RETENTION_INTERVAL_SECONDS``.

    Deciding what is due runs on one node host at a time, the one for which ``leads``
    (the singletons' lease, :mod:`cxrnode.jobs.lease`) says so; every node host then removes
    its own files of what was purged (:func:`purge_left_behind`).
    """
    if settings.retention_days <= 0:
        log.info("retention is off (RETENTION_DAYS=0): files are kept forever")
        return
    delay = min(FIRST_PASS_DELAY, settings.retention_interval_seconds)
    while not stop.wait(delay):
        try:
            if leads is None or leads():
                purge_due(settings, sessions, readers, stop=stop)
            purge_left_behind(settings, sessions)
        except Exception:  # a bad moment of the database must not end retention for good
            log.exception("retention pass failed; trying again at the next interval")
        delay = settings.retention_interval_seconds


# ------------------------------------------------------------------------- what it did


def retention_counts(session: Session) -> dict[str, Any]:
    """What retention removed so far: studies, instances, outputs, the bytes of the instances,
    and when it last removed something (ISO 8601 UTC, or None)."""
    studies, last = session.execute(
        select(func.count(Study.id), func.max(Study.purged_at)).where(Study.purged_at.is_not(None))
    ).one()
    instances, nbytes = session.execute(
        select(func.count(Instance.id), func.coalesce(func.sum(Instance.size_bytes), 0)).where(
            Instance.purged_at.is_not(None)
        )
    ).one()
    outputs = session.scalar(select(func.count(Output.id)).where(Output.purged_at.is_not(None)))
    return {
        "purged_studies": int(studies or 0),
        "purged_instances": int(instances or 0),
        "purged_outputs": int(outputs or 0),
        "purged_instance_bytes": int(nbytes or 0),
        "last_purge": last.isoformat(timespec="seconds") + "Z" if last else None,
    }


def retention_metrics(session: Session) -> dict[str, float]:
    """The same counts as Prometheus gauge values, by metric name, for the admin web app's
    ``/metrics`` (it reads them from the database, so any process can serve them)."""
    counts = retention_counts(session)
    last = session.scalar(select(func.max(Study.purged_at)))
    return {
        "cxrnode_retention_purged_studies": float(counts["purged_studies"]),
        "cxrnode_retention_purged_instances": float(counts["purged_instances"]),
        "cxrnode_retention_purged_outputs": float(counts["purged_outputs"]),
        "cxrnode_retention_purged_instance_bytes": float(counts["purged_instance_bytes"]),
        "cxrnode_retention_last_purge_timestamp_seconds": _timestamp(last) if last else 0.0,
    }
