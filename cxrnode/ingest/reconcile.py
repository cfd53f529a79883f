"""Start-up reconciliation of the files in DATA_DIR/instances with the database.

An instance is acknowledged only after its file is durable *and* its row is committed
(:mod:`cxrnode.ingest.receive`). Two things can still leave a durable file without a row:

- the node was killed between linking the file into place and committing the row: the peer
  never heard success and will send again, but until then the file is invisible;
- the database lost rows the files outlived: a PostgreSQL failover that dropped the last
  asynchronously replicated transactions, or a restore from a backup older than the files.

So ``serve`` (and ``cxrnode db reconcile``) walks DATA_DIR/instances before it starts
listening and records again every complete instance that has no row, exactly as a
C-STORE of that file would have (its study is re-armed, so a job follows if one is due).
What cannot be an instance of ours (an unreadable file, UIDs that do not match its path, a
stray name) is moved to DATA_DIR/quarantine for a person to look at, never deleted. Partial
files in DATA_DIR/tmp are removed by :func:`cxrnode.ingest.storage.clean_tmp` before this
runs.

Cost: one grouped count per start, then a query only for the study folders holding more files
than rows (the usual start finds none).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from cxrnode.db import Instance
from cxrnode.ingest.receive import Ingest, Refused, dataset_offset, inspect
from cxrnode.ingest.storage import ensure_dir, is_valid_uid
from cxrnode.settings import Settings

log = logging.getLogger(__name__)

#: ``calling_aet`` of an instance recorded again by reconciliation (no peer sent it now).
RECONCILED_AET = "RECONCILED"


@dataclass
class Reconciled:
    """What one reconciliation found."""

    recorded: list[str] = field(default_factory=list)  # SOP Instance UIDs recorded again
    quarantined: list[Path] = field(default_factory=list)  # where each stray file went
    studies_checked: int = 0


def quarantine_dir(settings: Settings) -> Path:
    return settings.data_dir / "quarantine"


def reconcile_files(settings: Settings, sessions: sessionmaker) -> Reconciled:
    """Record every durable instance file without a row; quarantine what is not one."""
    found = Reconciled()
    root = settings.instances_dir
    if not root.is_dir():
        return found
    with sessions() as session:
        counts = dict(
            session.execute(
                select(Instance.study_instance_uid, func.count())
                .where(Instance.purged_at.is_(None))
                .group_by(Instance.study_instance_uid)
            ).all()
        )
        session.rollback()
    ingest = Ingest(settings, sessions)
    try:
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if not entry.is_dir(follow_symlinks=False) or not is_valid_uid(entry.name):
                _quarantine(settings, Path(entry.path), "not a study folder", found)
                continue
            files = list(os.scandir(entry.path))
            if len(files) <= counts.get(entry.name, 0):
                continue  # as many rows as files: nothing is missing
            found.studies_checked += 1
            _reconcile_study(settings, ingest, sessions, entry.name, files, found)
    finally:
        ingest.reader.dispose()
    if found.recorded or found.quarantined:
        log.warning(
            "reconciled DATA_DIR/instances with the database: %d instances recorded again, "
            "%d stray files moved to %s",
            len(found.recorded),
            len(found.quarantined),
            quarantine_dir(settings),
        )
    return found


def _reconcile_study(
    settings: Settings,
    ingest: Ingest,
    sessions: sessionmaker,
    study_uid: str,
    files: list[os.DirEntry[str]],
    found: Reconciled,
) -> None:
    with sessions() as session:
        known = set(
            session.scalars(
                select(Instance.sop_instance_uid).where(Instance.study_instance_uid == study_uid)
            )
        )
        session.rollback()
    for entry in files:
        path = Path(entry.path)
        sop_uid = path.name.removesuffix(".dcm")
        if not path.name.endswith(".dcm") or not is_valid_uid(sop_uid):
            _quarantine(settings, path, "not an instance file name", found)
            continue
        if sop_uid in known:
            continue
        why = _record(settings, ingest, path, study_uid, sop_uid)
        if why is None:
            found.recorded.append(sop_uid)
            log.info("recorded again %s (a durable file without a row)", sop_uid)
        else:
            _quarantine(settings, path, why, found)


def _record(
    settings: Settings, ingest: Ingest, path: Path, study_uid: str, sop_uid: str
) -> str | None:
    """Record one file as its C-STORE would have; None, or why it is not an instance of ours."""
    try:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        transfer_syntax = str(meta.TransferSyntaxUID)
        sop_class = str(meta.MediaStorageSOPClassUID)
        with open(path, "rb") as part10:
            header = inspect(
                part10,
                transfer_syntax,
                sop_class,
                str(meta.MediaStorageSOPInstanceUID),
                dataset_offset(part10),
                max_frame_bytes=settings.max_image_mb * 1024 * 1024,
            )
    except Refused as refused:
        return f"not acceptable: {refused.reason}"
    except (OSError, InvalidDicomError, AttributeError, ValueError) as exc:
        return f"not a readable DICOM file ({type(exc).__name__})"
    if header.study_instance_uid != study_uid or header.sop_instance_uid != sop_uid:
        return "its UIDs do not match its path"
    relpath = f"{study_uid}/{sop_uid}.dcm"
    ingest.record_stored(header, relpath, path.stat().st_size, RECONCILED_AET)
    return None


def _quarantine(settings: Settings, path: Path, why: str, found: Reconciled) -> None:
    """Move a stray file or folder out of DATA_DIR/instances, keeping its relative path."""
    target = quarantine_dir(settings) / path.relative_to(settings.instances_dir)
    ensure_dir(target.parent)
    if target.exists():
        target = target.with_name(f"{target.name}.{os.getpid()}")
    os.replace(path, target)
    found.quarantined.append(target)
    log.warning("moved %s to %s: %s", path.name, target.parent, why)
