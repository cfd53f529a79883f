"""Receive one instance: check it, store it durably, record it, say which DICOM status to send.

This is the plain-function core of the C-STORE SCP (``cxrnode.scp`` is a thin adapter over it),
so tests can call it without a network. The order is the node's first invariant:
temporary file → fsync → rename → row committed → only then 0x0000.

Only the header is parsed (pixel data is skipped, never decoded); the bytes written are the
bytes the peer sent.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from io import BytesIO
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from cxrnode.db import Instance, InstanceState, Study, StudyState, utcnow
from cxrnode.settings import Settings
from cxrnode.storage import free_bytes, instance_relpath, is_valid_uid, write_durably

log = logging.getLogger(__name__)

# C-STORE statuses (PS3.4 Annex B.2.3)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000

PIXEL_DATA = Tag(0x7FE0, 0x0010)
UNDEFINED_LENGTH = 0xFFFFFFFF


class Refused(Exception):
    """The instance cannot be accepted; ``status`` is the DICOM status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


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


@dataclass(frozen=True)
class Outcome:
    status: int
    reason: str | None = None
    instance_id: int | None = None
    duplicate: bool = False
    size_bytes: int = 0


def read_header(stream: BinaryIO, transfer_syntax: str) -> tuple[Dataset, int]:
    """Parse the dataset without loading pixel data; return it and the stream length.

    Raises :class:`Refused` (0xC000) when the bytes are not a readable dataset.
    """
    ts = UID(transfer_syntax)
    stream.seek(0, 2)
    total = stream.tell()
    stream.seek(0)
    if ts == DeflatedExplicitVRLittleEndian:
        stream = BytesIO(zlib.decompress(stream.read(), -zlib.MAX_WBITS))
        total = len(stream.getbuffer())
    if not ts.is_transfer_syntax:
        raise Refused(CANNOT_UNDERSTAND, f"unknown transfer syntax {transfer_syntax}")
    try:
        ds = read_dataset(stream, ts.is_implicit_VR, ts.is_little_endian, defer_size=4096)
    except Exception as exc:  # pydicom raises many types for broken encodings
        raise Refused(CANNOT_UNDERSTAND, f"dataset cannot be parsed: {type(exc).__name__}") from exc
    if len(ds) == 0:
        raise Refused(CANNOT_UNDERSTAND, "dataset is empty or not DICOM")
    return ds, total


def _check_pixels(ds: Dataset, total: int) -> None:
    raw = ds.get_item(PIXEL_DATA, keep_deferred=True) if PIXEL_DATA in ds else None
    if raw is None:
        raise Refused(DOES_NOT_MATCH_SOP_CLASS, "image instance without Pixel Data")
    length = getattr(raw, "length", None)
    tell = getattr(raw, "value_tell", None)
    if length is None or length == UNDEFINED_LENGTH or tell is None:
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


def inspect(
    stream: BinaryIO, transfer_syntax: str, affected_sop_class: str, affected_sop_instance: str
) -> Header:
    """Check a received dataset and extract the header the node records."""
    ds, total = read_header(stream, transfer_syntax)
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
    _check_pixels(ds, total)

    from cxrnode.imaging import classify_view, is_chest

    view = classify_view(ds)
    skip_reason = None
    if not is_chest(ds):
        skip_reason = "not a chest radiograph (body part / descriptions)"
    elif view == "LATERAL":
        skip_reason = "lateral view"
    return Header(
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        study_instance_uid=study,
        series_instance_uid=series,
        modality=str(ds.get("Modality", "") or "") or None,
        body_part=str(ds.get("BodyPartExamined", "") or "")[:64] or None,
        view=view,
        transfer_syntax_uid=str(transfer_syntax),
        skip_reason=skip_reason,
    )


class Ingest:
    """Stores and records instances for one node process."""

    def __init__(self, settings: Settings, sessions: sessionmaker) -> None:
        self.settings = settings
        self.sessions = sessions
        self.reserve_bytes = settings.min_free_disk_mb * 1024 * 1024

    def disk_low(self) -> bool:
        return free_bytes(self.settings.data_dir) < self.reserve_bytes

    def receive(
        self,
        stream: BinaryIO,
        file_meta: bytes,
        transfer_syntax: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        calling_aet: str,
        peer_host: str | None,
    ) -> Outcome:
        """Handle one C-STORE; never raises for bad input, always returns a status."""
        if self.disk_low():
            log.warning("free space below the reserve: answering 0xA700 (sop=%s)", sop_instance_uid)
            return Outcome(OUT_OF_RESOURCES, "free disk space below the configured reserve")
        try:
            header = inspect(stream, transfer_syntax, sop_class_uid, sop_instance_uid)
        except Refused as refused:
            log.warning(
                "refused instance from %s: 0x%04X %s", calling_aet, refused.status, refused.reason
            )
            return Outcome(refused.status, refused.reason)

        if self.settings.duplicates == "keep_first" and self._known(header.sop_instance_uid):
            log.info("duplicate %s kept as first received", header.sop_instance_uid)
            return Outcome(SUCCESS, "duplicate: first copy kept", duplicate=True)

        relpath = instance_relpath(header.study_instance_uid, header.sop_instance_uid)
        buffer = stream.getbuffer() if isinstance(stream, BytesIO) else stream.read()
        try:
            size = write_durably(
                self.settings.instances_dir / relpath,
                (b"\x00" * 128, b"DICM", file_meta, buffer),
                self.settings.tmp_dir,
            )
        except OSError as exc:
            log.error("cannot write %s: %s", header.sop_instance_uid, exc)
            return Outcome(OUT_OF_RESOURCES, f"cannot write to storage: {exc.strerror}")
        finally:
            del buffer
        try:
            instance_id, duplicate = self._record(header, relpath, size, calling_aet, peer_host)
        except Exception as exc:
            log.exception("cannot record %s", header.sop_instance_uid)
            return Outcome(OUT_OF_RESOURCES, f"database unavailable: {type(exc).__name__}")
        return Outcome(SUCCESS, None, instance_id, duplicate, size)

    def _known(self, sop_instance_uid: str) -> bool:
        with self.sessions() as session:
            found = session.scalar(
                select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)
            )
            return found is not None

    def _record(
        self, header: Header, relpath: str, size: int, calling_aet: str, peer_host: str | None
    ) -> tuple[int, bool]:
        now = utcnow()
        settle_at = now + timedelta(seconds=self.settings.settle_seconds)
        with self.sessions() as session:
            existing = session.scalar(
                select(Instance).where(Instance.sop_instance_uid == header.sop_instance_uid)
            )
            if existing is not None:
                if self.settings.duplicates == "keep_first":
                    return existing.id, True
                existing.path, existing.size_bytes, existing.received_at = relpath, size, now
                study = session.get(Study, existing.study_id) if existing.study_id else None
                if study is not None and header.skip_reason is None:
                    _rearm(study, now, settle_at)
                session.commit()
                return existing.id, True
            study = _study_for_update(session, header.study_instance_uid, now, settle_at)
            study.instance_count += 1
            study.last_arrival = now
            if header.skip_reason is None:
                _rearm(study, now, settle_at)
            instance = Instance(
                sop_instance_uid=header.sop_instance_uid,
                sop_class_uid=header.sop_class_uid,
                study_instance_uid=header.study_instance_uid,
                series_instance_uid=header.series_instance_uid,
                transfer_syntax_uid=header.transfer_syntax_uid,
                modality=header.modality,
                body_part=header.body_part,
                view=header.view,
                path=relpath,
                size_bytes=size,
                calling_aet=calling_aet,
                peer_host=peer_host,
                state=InstanceState.skipped if header.skip_reason else InstanceState.stored,
                skip_reason=header.skip_reason,
                received_at=now,
                study_id=study.id,
            )
            session.add(instance)
            try:
                session.commit()
            except IntegrityError:  # the same instance raced in on another association
                session.rollback()
                return -1, True
            return instance.id, False


def _rearm(study: Study, now: datetime, settle_at: datetime) -> None:
    """A readable image arrived: (re)start the quiet period, also after an earlier report."""
    study.state = StudyState.receiving
    study.skip_reason = None
    study.settle_at = max(settle_at, study.settle_at) if study.settle_at else settle_at


def _study_for_update(
    session: Session, study_uid: str, now: datetime, settle_at: datetime
) -> Study:
    study = session.scalar(
        select(Study).where(Study.study_instance_uid == study_uid).with_for_update()
    )
    if study is not None:
        return study
    study = Study(
        study_instance_uid=study_uid,
        state=StudyState.receiving,
        first_arrival=now,
        last_arrival=now,
        settle_at=settle_at,
        instance_count=0,
        version=0,
    )
    try:
        with session.begin_nested():
            session.add(study)
    except IntegrityError:  # created concurrently by another association (PostgreSQL)
        study = session.scalars(
            select(Study).where(Study.study_instance_uid == study_uid).with_for_update()
        ).one()
    return study
