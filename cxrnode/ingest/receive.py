"""Receive one instance: check it, store it durably, record it, say which DICOM status to send.

This is the plain-function core of the C-STORE SCP (``cxrnode.net.listener`` is a thin adapter over it),
so tests can call it without a network. The order is the node's first invariant:
temporary file → fsync → rename (or hard link) into place → row committed → only then 0x0000.

Only the header is parsed (pixel data is skipped, never decoded); the bytes written are the
bytes the peer sent. The listener receives each dataset straight into a file in DATA_DIR/tmp
(:meth:`Ingest.receive_file`), so a 10 MB image is written once and only fsynced and linked
into place here; :meth:`Ingest.receive` takes the dataset from memory instead.
"""

from __future__ import annotations

import logging
import struct
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from sqlalchemy import Connection, bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from cxrnode.db import Instance, InstanceState, Refusal, Study, StudyState, make_engine, utcnow
from cxrnode.ingest.header import (
    SECONDARY_CAPTURE_SOP_CLASSES,
    chest_skip_reason,
    classify_view,
    clean_text,
    recorded_header,
    secondary_capture_refusal,
)
from cxrnode.ingest.storage import (
    adopt_durably,
    free_bytes,
    instance_relpath,
    is_valid_uid,
)
from cxrnode.settings import Settings

log = logging.getLogger(__name__)

# C-STORE statuses (PS3.4 Annex B.2.3, PS3.7 C.4.2.1.4)
SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000

# The statements of the per-instance transaction, built once: constructing SQLAlchemy
# statements anew for every image cost more CPU than executing them.
_INSTANCES, _STUDIES = Instance.__table__, Study.__table__
_FIND_INSTANCE = select(
    _INSTANCES.c.id, _INSTANCES.c.study_id, _INSTANCES.c.study_instance_uid
).where(_INSTANCES.c.sop_instance_uid == bindparam("uid"))
_FIND_STUDY = select(_STUDIES.c.id, _STUDIES.c.settle_at)
_FIND_STUDY_BY_UID = _FIND_STUDY.where(
    _STUDIES.c.study_instance_uid == bindparam("uid")
).with_for_update()
_FIND_STUDY_BY_ID = _FIND_STUDY.where(_STUDIES.c.id == bindparam("b_id"))
_INSERT_INSTANCE = insert(_INSTANCES)
_INSERT_STUDY = insert(_STUDIES)
_REPLACE_INSTANCE = (
    update(_INSTANCES)
    .where(_INSTANCES.c.id == bindparam("b_id"))
    .values(
        path=bindparam("b_path"),
        node_host=bindparam("b_host"),
        size_bytes=bindparam("b_size"),
        received_at=bindparam("b_now"),
        header=bindparam("b_header"),
    )
)
_COUNT_IN_STUDY = (
    update(_STUDIES)
    .where(_STUDIES.c.id == bindparam("b_id"))
    .values(
        instance_count=_STUDIES.c.instance_count + 1,
        last_arrival=bindparam("b_now"),
        # the first accession number given stays: final reports are matched by it
        accession_number=func.coalesce(_STUDIES.c.accession_number, bindparam("b_accession")),
    )
)
_REARM = {  # a readable image arrived: (re)start the quiet period, also after a report
    "state": bindparam("b_state"),
    "skip_reason": None,
    "settle_at": bindparam("b_settle_at"),
}
_REARM_STUDY = update(_STUDIES).where(_STUDIES.c.id == bindparam("b_id")).values(_REARM)
_COUNT_AND_REARM = _COUNT_IN_STUDY.values(_REARM)

PIXEL_DATA = Tag(0x7FE0, 0x0010)
UNDEFINED_LENGTH = 0xFFFFFFFF

#: Most bytes the header parser may read (values longer than 4 KiB are skipped, not read):
#: a real header is tens of KiB; a dataset of millions of tiny elements would otherwise cost
#: gigabytes of Python objects before anything could refuse it.
MAX_HEADER_READ_BYTES = 2 * 1024 * 1024


class _BoundedReader:
    """A read-only file wrapper that fails once more than ``limit`` bytes were read."""

    def __init__(self, stream: BinaryIO, limit: int) -> None:
        self._stream = stream
        self._left = limit

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._left -= len(data)
        if self._left < 0:
            raise Refused(
                CANNOT_UNDERSTAND,
                f"header larger than {MAX_HEADER_READ_BYTES >> 20} MiB of elements: refused",
            )
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


#: How refusals are grouped in the ``refusals`` table, by status.
REFUSAL_KINDS = {
    CANNOT_UNDERSTAND: "unreadable",
    DOES_NOT_MATCH_SOP_CLASS: "mismatch",
    SOP_CLASS_NOT_SUPPORTED: "not-supported",
    OUT_OF_RESOURCES: "out-of-resources",
}
UID_CONFLICT = "uid-conflict"


class Refused(Exception):
    """The instance cannot be accepted; ``status`` is the DICOM status to answer with."""

    def __init__(self, status: int, reason: str, kind: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.kind = kind or REFUSAL_KINDS.get(status, "other")


@dataclass(frozen=True)
class Header:
    """What the node records about an instance (no patient identifiers)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    body_part: str | None
    view: str | None
    transfer_syntax_uid: str
    skip_reason: str | None  # None: a chest image the model may read
    recorded: dict[str, Any]  # the attributes later steps need, as DICOM JSON
    accession_number: str | None = None  # matches final reports to the study


@dataclass(frozen=True)
class Outcome:
    status: int
    reason: str | None = None
    instance_id: int | None = None
    duplicate: bool = False
    size_bytes: int = 0


def read_header(stream: BinaryIO, transfer_syntax: str, start: int = 0) -> tuple[Dataset, int]:
    """Parse the dataset that begins at offset ``start`` without loading pixel data; return it
    and the stream length (offsets in the dataset, like ``value_tell``, are stream offsets).

    Raises :class:`Refused` (0xC000) when the bytes are not a readable dataset.
    """
    ts = UID(transfer_syntax)
    total = stream.seek(0, 2)
    stream.seek(start)
    if ts == DeflatedExplicitVRLittleEndian:
        stream = BytesIO(zlib.decompress(stream.read(), -zlib.MAX_WBITS))
        total = len(stream.getbuffer())
    if not ts.is_transfer_syntax:
        raise Refused(CANNOT_UNDERSTAND, f"unknown transfer syntax {transfer_syntax}")
    try:
        ds = read_dataset(
            _BoundedReader(stream, MAX_HEADER_READ_BYTES),  # type: ignore[arg-type]
            ts.is_implicit_VR,
            ts.is_little_endian,
            defer_size=4096,
        )
    except Refused:
        raise
    except Exception as exc:  # pydicom raises many types for broken encodings
        raise Refused(CANNOT_UNDERSTAND, f"dataset cannot be parsed: {type(exc).__name__}") from exc
    if len(ds) == 0:
        raise Refused(CANNOT_UNDERSTAND, "dataset is empty or not DICOM")
    return ds, total


def _check_pixels(ds: Dataset, total: int, transfer_syntax: str) -> None:
    raw = ds.get_item(PIXEL_DATA, keep_deferred=True) if PIXEL_DATA in ds else None
    if raw is None:
        raise Refused(DOES_NOT_MATCH_SOP_CLASS, "image instance without Pixel Data")
    length = getattr(raw, "length", None)
    tell = getattr(raw, "value_tell", None)
    encapsulated = length == UNDEFINED_LENGTH
    if encapsulated != UID(transfer_syntax).is_encapsulated:
        raise Refused(
            CANNOT_UNDERSTAND,
            "Pixel Data "
            + ("encapsulated" if encapsulated else "not encapsulated")
            + f" under transfer syntax {transfer_syntax}: the transfer syntax does not match",
        )
    if length is None or encapsulated or tell is None:
        return  # encapsulated: pydicom already read through to the sequence delimiter
    if tell + length > total:
        raise Refused(CANNOT_UNDERSTAND, f"Pixel Data truncated: {total - tell} of {length} bytes")
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        expected = (
            int(ds.Rows)
            * int(ds.Columns)
            * int(ds.get("SamplesPerPixel", 1))
            * frames
            * int(ds.BitsAllocated)
            // 8
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise Refused(
            DOES_NOT_MATCH_SOP_CLASS, "Rows, Columns or Bits Allocated missing or invalid"
        ) from exc
    if length < expected:
        raise Refused(CANNOT_UNDERSTAND, f"Pixel Data holds {length} bytes, expected {expected}")


def dataset_offset(part10: BinaryIO) -> int:
    """Where the dataset starts in a DICOM Part-10 file: after the 128-byte preamble, "DICM"
    and the File Meta group, whose length is its first element (PS3.10 7.1).

    Raises :class:`Refused` (0xC000) when the file does not start that way.
    """
    part10.seek(0)
    head = part10.read(144)
    if (
        len(head) < 144
        or head[128:132] != b"DICM"
        or head[132:140] != b"\x02\x00\x00\x00UL\x04\x00"
    ):
        raise Refused(CANNOT_UNDERSTAND, "received file has no File Meta group length")
    return 144 + struct.unpack("<I", head[140:144])[0]


def inspect(
    stream: BinaryIO,
    transfer_syntax: str,
    affected_sop_class: str,
    affected_sop_instance: str,
    start: int = 0,
    max_frame_bytes: int | None = None,
) -> Header:
    """Check a received dataset (beginning at offset ``start``) and extract the header the
    node records; raise :class:`Refused` with the status to answer.

    Never raises anything else for bad input: a header that parses but whose values cannot
    be read (a wrong character set, a malformed number) is refused as not understood.
    """
    ds, total = read_header(stream, transfer_syntax, start)
    try:
        return _inspect(
            ds, total, transfer_syntax, affected_sop_class, affected_sop_instance, max_frame_bytes
        )
    except Refused:
        raise
    except Exception as exc:  # values pydicom could not convert when they were read
        raise Refused(
            CANNOT_UNDERSTAND, f"header values cannot be read: {type(exc).__name__}"
        ) from exc


def _inspect(
    ds: Dataset,
    total: int,
    transfer_syntax: str,
    affected_sop_class: str,
    affected_sop_instance: str,
    max_frame_bytes: int | None,
) -> Header:
    sop_instance = str(ds.get("SOPInstanceUID", "") or "")
    sop_class = str(ds.get("SOPClassUID", "") or "")
    study = str(ds.get("StudyInstanceUID", "") or "")
    series = str(ds.get("SeriesInstanceUID", "") or "")
    if not sop_instance or not sop_class:
        raise Refused(CANNOT_UNDERSTAND, "no SOP Class/Instance UID: not a readable dataset")
    for name, value in (
        ("SOP Instance UID", sop_instance),
        ("Study Instance UID", study),
        ("Series Instance UID", series),
    ):
        if not is_valid_uid(value):
            raise Refused(DOES_NOT_MATCH_SOP_CLASS, f"{name} missing or not a valid UID")
    if sop_instance != affected_sop_instance or sop_class != affected_sop_class:
        raise Refused(
            DOES_NOT_MATCH_SOP_CLASS,
            "SOP Class/Instance UID in the dataset differ from the C-STORE request",
        )
    if sop_class in SECONDARY_CAPTURE_SOP_CLASSES:
        refusal = secondary_capture_refusal(ds)
        if refusal:
            raise Refused(SOP_CLASS_NOT_SUPPORTED, refusal)
    _check_pixels(ds, total, transfer_syntax)

    view = classify_view(ds)
    skip_reason = chest_skip_reason(ds, max_frame_bytes)
    return Header(
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        study_instance_uid=study,
        series_instance_uid=series,
        modality=clean_text(ds.get("Modality"), 16) or None,
        body_part=clean_text(ds.get("BodyPartExamined"), 64) or None,
        view=view,
        transfer_syntax_uid=str(transfer_syntax),
        skip_reason=skip_reason,
        recorded=recorded_header(ds),
        accession_number=clean_text(ds.get("AccessionNumber"), 64).strip() or None,
    )


class Ingest:
    """Stores and records instances for one node process."""

    def __init__(self, settings: Settings, sessions: sessionmaker) -> None:
        self.settings = settings
        self.sessions = sessions
        self.engine = sessions.kw["bind"]
        self.reader = make_engine(settings.effective_database_url, read_only=True)
        self.reserve_bytes = settings.min_free_disk_mb * 1024 * 1024

    def disk_low(self) -> bool:
        return free_bytes(self.settings.data_dir) < self.reserve_bytes

    def receive_file(
        self,
        path: Path,
        transfer_syntax: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        calling_aet: str,
        peer_host: str | None,
    ) -> Outcome:
        """Handle one C-STORE already received into the Part-10 file ``path`` in DATA_DIR/tmp
        (pynetdicom's chunked receive); never raises for bad input, always returns a status.

        The order is the first invariant: check, store durably, commit the row, and only then
        say success. The file is fsynced and linked into place, not copied; ``path`` itself
        is left for its owner to remove.
        """
        if self.disk_low():
            log.warning("free space below the reserve: answering 0xA700 (sop=%s)", sop_instance_uid)
            return Outcome(OUT_OF_RESOURCES, "free disk space below the configured reserve")
        peer = (calling_aet, peer_host, sop_class_uid, sop_instance_uid)
        try:
            with open(path, "rb") as part10:
                start = dataset_offset(part10)
                header = inspect(
                    part10,
                    transfer_syntax,
                    sop_class_uid,
                    sop_instance_uid,
                    start,
                    max_frame_bytes=self.settings.max_image_mb * 1024 * 1024,
                )
        except Refused as refused:
            return self._refuse(refused, *peer)

        existing = self._find(header.sop_instance_uid)
        if existing is not None and existing.study_instance_uid != header.study_instance_uid:
            conflict = Refused(
                DOES_NOT_MATCH_SOP_CLASS,
                "SOP Instance UID already received under another Study Instance UID",
                UID_CONFLICT,
            )
            return self._refuse(conflict, *peer)
        if existing is not None and self.settings.duplicates == "keep_first":
            log.info("duplicate %s kept as first received", header.sop_instance_uid)
            return Outcome(SUCCESS, "duplicate: first copy kept", existing.id, duplicate=True)

        relpath = instance_relpath(header.study_instance_uid, header.sop_instance_uid)
        try:
            size = adopt_durably(path, self.settings.instances_dir / relpath, self.settings.tmp_dir)
        except OSError as exc:
            log.error("cannot write %s: %s", header.sop_instance_uid, exc)
            return Outcome(OUT_OF_RESOURCES, f"cannot write to storage: {exc.strerror}")
        try:
            instance_id, duplicate = self._record(
                header, relpath, size, calling_aet, peer_host, existing
            )
        except Exception as exc:
            log.exception("cannot record %s", header.sop_instance_uid)
            return Outcome(OUT_OF_RESOURCES, f"database unavailable: {type(exc).__name__}")
        return Outcome(SUCCESS, None, instance_id, duplicate, size)

    def record_stored(
        self, header: Header, relpath: str, size: int, calling_aet: str
    ) -> tuple[int, bool]:
        """Record an instance whose file is already durable at ``relpath`` (the start-up
        reconciliation, :mod:`cxrnode.ingest.reconcile`); returns (row id, was it known)."""
        return self._record(
            header, relpath, size, calling_aet, None, self._find(header.sop_instance_uid)
        )

    def _refuse(
        self,
        refused: Refused,
        calling_aet: str,
        peer_host: str | None,
        sop_class_uid: str,
        sop_instance_uid: str,
    ) -> Outcome:
        """Log one line and record the refusal (UIDs only when valid: a hostile UID is
        neither stored nor logged); the answer never waits on the record."""
        sop_class = sop_class_uid if is_valid_uid(sop_class_uid) else None
        sop_instance = sop_instance_uid if is_valid_uid(sop_instance_uid) else None
        log.warning(
            "refused %s from %s: 0x%04X %s (%s)",
            sop_instance or "an instance with an invalid UID",
            calling_aet,
            refused.status,
            refused.kind,
            refused.reason,
        )
        try:
            with self.engine.connect() as conn:
                conn.execute(
                    insert(Refusal.__table__),
                    {
                        "received_at": utcnow(),
                        "calling_aet": clean_text(calling_aet, 16),
                        "peer_host": clean_text(peer_host, 64) if peer_host else None,
                        "sop_class_uid": sop_class,
                        "sop_instance_uid": sop_instance,
                        "status": refused.status,
                        "kind": refused.kind,
                        "reason": clean_text(refused.reason, 500),
                    },
                )
                conn.commit()
        except Exception as exc:  # bookkeeping must never change the answer
            log.warning("cannot record the refusal: %s", type(exc).__name__)
        return Outcome(refused.status, refused.reason)

    def _find(self, sop_instance_uid: str) -> Any:
        """The row of an instance already received (id, study_id, study_instance_uid) or None.

        One read on the reader engine (no write lock); a concurrent first arrival of the same
        instance is caught by the unique index when it is inserted.
        """
        with self.reader.connect() as conn:
            row = conn.execute(_FIND_INSTANCE, {"uid": sop_instance_uid}).first()
            conn.rollback()
            return row

    def _record(
        self,
        header: Header,
        relpath: str,
        size: int,
        calling_aet: str,
        peer_host: str | None,
        existing: Any,
    ) -> tuple[int, bool]:
        """Insert the instance row (or replace the known one's file) and count it in its
        study, in one transaction.

        SQLAlchemy Core with prepared statements rather than the ORM: this runs once per
        received image while the caller waits for the answer (bench/ingest.py).
        """
        now = utcnow()
        settle_at = now + timedelta(seconds=self.settings.settle_seconds)
        readable = header.skip_reason is None
        with self.engine.connect() as conn:
            if existing is not None:  # DUPLICATES=replace: the new file takes the old one's place
                conn.execute(
                    _REPLACE_INSTANCE,
                    {
                        "b_id": existing.id,
                        "b_path": relpath,
                        "b_host": self.settings.node_host,
                        "b_size": size,
                        "b_now": now,
                        "b_header": header.recorded,
                    },
                )
                if existing.study_id is not None and readable:
                    study = conn.execute(_FIND_STUDY_BY_ID, {"b_id": existing.study_id}).first()
                    if study is not None:
                        conn.execute(
                            _REARM_STUDY, {"b_id": study.id, **_rearmed(study.settle_at, settle_at)}
                        )
                conn.commit()
                return existing.id, True
            study_id = _count_in_study(
                conn, header.study_instance_uid, now, settle_at, readable, header.accession_number
            )
            try:
                inserted = conn.execute(
                    _INSERT_INSTANCE,
                    {
                        "sop_instance_uid": header.sop_instance_uid,
                        "sop_class_uid": header.sop_class_uid,
                        "study_instance_uid": header.study_instance_uid,
                        "series_instance_uid": header.series_instance_uid,
                        "transfer_syntax_uid": header.transfer_syntax_uid,
                        "modality": header.modality,
                        "body_part": header.body_part,
                        "view": header.view,
                        "path": relpath,
                        "node_host": self.settings.node_host,
                        "size_bytes": size,
                        "calling_aet": calling_aet,
                        "peer_host": peer_host,
                        "state": InstanceState.stored if readable else InstanceState.skipped,
                        "skip_reason": header.skip_reason,
                        "received_at": now,
                        "study_id": study_id,
                        "header": header.recorded,
                    },
                )
                conn.commit()
            except IntegrityError:  # the same instance raced in on another association
                conn.rollback()
                return -1, True
            return inserted.inserted_primary_key[0], False


def _rearmed(current: datetime | None, settle_at: datetime) -> dict[str, object]:
    """Parameters of ``_REARM``: the quiet period ends at ``settle_at`` or later."""
    return {
        "b_state": StudyState.receiving,
        "b_settle_at": max(settle_at, current) if current else settle_at,
    }


def _count_in_study(
    conn: Connection,
    study_uid: str,
    now: datetime,
    settle_at: datetime,
    readable: bool,
    accession_number: str | None = None,
) -> int:
    """Count one more instance in its study (creating the study row); return the study id.

    The study row is locked (FOR UPDATE; SQLite's BEGIN IMMEDIATE already serialises
    writers) so concurrent associations of one study count correctly.
    """
    study = conn.execute(_FIND_STUDY_BY_UID, {"uid": study_uid}).first()
    if study is None:
        try:
            with conn.begin_nested():
                created = conn.execute(
                    _INSERT_STUDY,
                    {
                        "study_instance_uid": study_uid,
                        "state": StudyState.receiving,
                        "first_arrival": now,
                        "last_arrival": now,
                        "settle_at": settle_at,
                        "instance_count": 1,
                        "version": 0,
                        "accession_number": accession_number,
                    },
                )
            return created.inserted_primary_key[0]
        except IntegrityError:  # created concurrently by another association (PostgreSQL)
            study = conn.execute(_FIND_STUDY_BY_UID, {"uid": study_uid}).one()
    counted = {"b_id": study.id, "b_now": now, "b_accession": accession_number}
    if readable:
        conn.execute(_COUNT_AND_REARM, {**counted, **_rearmed(study.settle_at, settle_at)})
    else:
        conn.execute(_COUNT_IN_STUDY, counted)
    return study.id
