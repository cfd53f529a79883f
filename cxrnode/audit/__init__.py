"""The audit trail: who did what to which study, when, from where, with what outcome, in the
DICOM audit message format (PS3.15 A.5, IHE ATNA).

- :mod:`.messages` builds the messages, one builder per event (110100 Application Activity,
  110102 Begin Transferring, 110103 Instances Accessed, 110104 Instances Transferred, 110105
  Study Deleted, 110112 Query, 110113 Security Alert, 110114 User Authentication);
- :mod:`.files` appends them durably to rotated, append-only files under ``DATA_DIR/audit/``;
- :mod:`.syslog` forwards the files to the site's audit repository (RFC 5424 over TLS).

Any process emits with ``auditor(settings).emit(message)``: a local, fsync-ed append (well
under a millisecond on a local disk, never the network), so the clinical paths stay as fast
as they were. A failure to write is logged and does not fail the clinical work.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from cxrnode.audit.files import AuditFiles
from cxrnode.audit.messages import AuditMessage, Node, StudyObject
from cxrnode.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["Auditor", "StudyObject", "auditor", "patient_id_of"]


class Auditor:
    """The node's audit writer in this process."""

    def __init__(self, settings: Settings) -> None:
        self.node = Node.here(settings.ae_title, settings.audit_site)
        self.files = AuditFiles(audit_dir(settings), settings.audit_file_max_mb * 1024 * 1024)

    def emit(self, message: AuditMessage) -> None:
        try:
            self.files.append(message.xml())
        except Exception:
            log.exception(
                "an audit record (%s) could not be written to %s",
                message.event.value[1],
                self.files.directory,
            )


_auditors: dict[Path, Auditor] = {}
_lock = threading.Lock()


def audit_dir(settings: Settings) -> Path:
    return settings.data_dir / "audit"


def auditor(settings: Settings) -> Auditor:
    """This process's auditor for the node of ``settings``."""
    key = audit_dir(settings)
    with _lock:
        found = _auditors.get(key)
        if found is None:
            found = _auditors[key] = Auditor(settings)
        return found


def patient_id_of(session: object, study_uid: str) -> str | None:
    """The Patient ID recorded with the study's first instance (the audit message's patient
    participant object); None when unknown."""
    from sqlalchemy import select

    from cxrnode.db import Instance

    header = session.scalar(  # type: ignore[attr-defined]
        select(Instance.header).where(Instance.study_instance_uid == study_uid).limit(1)
    )
    if not isinstance(header, dict):
        return None
    value = (header.get("00100020") or {}).get("Value") or []
    return str(value[0]) if value and value[0] else None
