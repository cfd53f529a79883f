"""Database: typed SQLAlchemy models and the engine/session factory.

The database is the truth of the node: every instance, study, job and outgoing object has a
row with a state. Schema changes go through Alembic (``cxrnode/migrations``); ``create_all``
is never used outside tests of the migrations themselves.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

from model.contracts import ModelResult

UID = String(64)
AET = String(16)


def utcnow() -> datetime:
    """Naive UTC: stored the same way by SQLite and PostgreSQL."""
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(), dict[str, Any]: JSON}


class InstanceState(enum.StrEnum):
    stored = "stored"  # on disk and recorded; eligible for study grouping
    skipped = "skipped"  # on disk and recorded, but not fed to the model (reason given)


class StudyState(enum.StrEnum):
    receiving = "receiving"  # instances arriving; quiet period not over
    settled = "settled"  # quiet period over and a job was created
    skipped = "skipped"  # nothing the model can read (reason given)


class JobState(enum.StrEnum):
    """Where a job is; the allowed moves are in :mod:`cxrnode.jobs.states`."""

    pending = "pending"  # created by study grouping, not yet handed to the broker
    queued = "queued"  # prepare_image enqueued
    prepared = "prepared"  # display image and model input kept; infer_report enqueued
    waiting_model = "waiting_model"  # no usable model on the inference side; retried
    inferred = "inferred"  # the model's result is recorded; outputs being built
    done = "done"  # outputs written and recorded in the outbox
    failed = "failed"  # cannot succeed without a person (reason given)
    superseded = "superseded"  # a newer job for the same study replaced this one


FINAL_JOB_STATES = frozenset({JobState.done, JobState.failed, JobState.superseded})


class OutputState(enum.StrEnum):
    """Where an outbox row is; the allowed moves are in :mod:`cxrnode.outputs.states`."""

    pending = "pending"  # waiting for its next try
    in_flight = "in_flight"  # claimed for a send message; next_try_at is the lease's end
    delivered = "delivered"
    delivered_warning = "delivered_warning"  # peer answered with a warning status
    dead = "dead"  # permanent failure or out of tries; `cxrnode resend` revives it
    superseded = "superseded"  # a newer version of the draft was built before this was sent


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    view: Mapped[str | None] = mapped_column(String(16))  # PA, AP, LATERAL or None
    path: Mapped[str] = mapped_column(String(512))  # relative to DATA_DIR/instances
    #: the node host whose DATA_DIR holds the file (Settings.node_host; NULL: before 0005a)
    node_host: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_aet: Mapped[str] = mapped_column(AET)
    peer_host: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[InstanceState] = mapped_column(Enum(InstanceState, native_enum=False, length=16))
    skip_reason: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), index=True)
    #: The header attributes later steps need (patient and study modules, UIDs, geometry), as
    #: DICOM JSON, recorded at ingest so no later step parses the file's header again.
    header: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: When retention removed the file (the row stays: cxrnode.retention).
    purged_at: Mapped[datetime | None]


class Study(Base):
    __tablename__ = "studies"
    __table_args__ = (Index("ix_studies_purged_last_arrival", "purged_at", "last_arrival"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    state: Mapped[StudyState] = mapped_column(Enum(StudyState, native_enum=False, length=16))
    skip_reason: Mapped[str | None] = mapped_column(Text)
    first_arrival: Mapped[datetime] = mapped_column(default=utcnow)
    last_arrival: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    settle_at: Mapped[datetime] = mapped_column(index=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    chosen_instance_id: Mapped[int | None] = mapped_column(Integer)  # instances.id (no FK: cycle)
    version: Mapped[int] = mapped_column(Integer, default=0)  # number of jobs made so far
    #: AccessionNumber of the study's images (the first one given), so that a final report
    #: that names only the accession number finds its study.
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    #: When retention removed the study's files (the rows stay: cxrnode.retention).
    purged_at: Mapped[datetime | None]

    jobs: Mapped[list[Job]] = relationship(back_populates="study", order_by="Job.id")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state_updated", "state", "updated_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"))
    #: the host whose queues run its prepare, outputs and send steps: its instance's host
    node_host: Mapped[str | None] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[JobState] = mapped_column(Enum(JobState, native_enum=False, length=16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    error: Mapped[str | None] = mapped_column(Text)
    #: The model's answer, stored once: ``ModelResult.to_dict()`` (see :attr:`model_result`).
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: The draft's reading priority (stat / asap / routine, :mod:`cxrnode.triage`), set with
    #: its outputs; None before then.
    priority: Mapped[str | None] = mapped_column(String(8))

    study: Mapped[Study] = relationship(back_populates="jobs")
    events: Mapped[list[JobEvent]] = relationship(order_by="JobEvent.id", viewonly=True)

    @property
    def model_result(self) -> ModelResult | None:
        """The typed result (None before the model answered)."""
        return None if self.result is None else ModelResult.from_dict(self.result)


class JobEvent(Base):
    """One accepted state change of a job: its history, and the stage timings."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_to_state_at", "to_state", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str | None] = mapped_column(Text)


class Output(Base):
    """An object we send (SR or SC) to one destination: the outbox."""

    __tablename__ = "outputs"
    __table_args__ = (Index("ix_outputs_state_next", "state", "next_try_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(8))  # "sr" or "sc"
    destination: Mapped[str] = mapped_column(String(300))
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(512))  # relative to DATA_DIR/outputs
    state: Mapped[OutputState] = mapped_column(Enum(OutputState, native_enum=False, length=24))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_try_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_status: Mapped[str | None] = mapped_column(String(64))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    #: When retention removed the file (the row stays: cxrnode.retention).
    purged_at: Mapped[datetime | None]
    #: 0 stat, 1 ASAP, 2 routine (:attr:`cxrnode.triage.Priority.rank`): claimed in this order.
    priority: Mapped[int] = mapped_column(Integer, default=2, server_default="2")

    @classmethod
    def pending(
        cls,
        *,
        job_id: int,
        kind: str,
        destination: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        path: str,
        now: datetime,
        priority: int = 2,
    ) -> Output:
        """A new outbox row, due at once (``priority``: 0 stat, 1 ASAP, 2 routine)."""
        return cls(
            job_id=job_id,
            kind=kind,
            destination=destination,
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            path=path,
            state=OutputState.pending,
            attempts=0,
            next_try_at=now,
            created_at=now,
            updated_at=now,
            priority=priority,
        )


class ReportSource(enum.StrEnum):
    dicom = "dicom"  # an SR by C-STORE
    hl7 = "hl7"  # an HL7 v2 ORU^R01 over MLLP


class ReportState(enum.StrEnum):
    """What became of a received report; every one is stored and recorded."""

    matched = "matched"  # belongs to a known study; scored once the study has a draft
    unmatched = "unmatched"  # no known study yet; matched later when one arrives
    ignored = "ignored"  # not a radiologist's report (our own draft coming back)
    rejected = "rejected"  # unusable (malformed message, no report text); reason given


class ReportStatus(enum.StrEnum):
    """The result status of a report (HL7 OBR-25; for an SR, its flags)."""

    preliminary = "preliminary"
    final = "final"
    corrected = "corrected"
    cancelled = "cancelled"


class FinalReport(Base):
    """A radiologist's report as received (SR or HL7), the loop back from the reading room.

    The received bytes live under DATA_DIR/reports (``path``); the row keeps what matching and
    scoring need. Which of a study's reports counts is decided when scoring
    (:func:`cxrnode.monitor.scoring.chosen_report`): a final replaces a preliminary one, a
    correction replaces a final one, a cancellation withdraws them.
    """

    __tablename__ = "final_reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[ReportSource] = mapped_column(Enum(ReportSource, native_enum=False, length=8))
    state: Mapped[ReportState] = mapped_column(Enum(ReportState, native_enum=False, length=16))
    status: Mapped[ReportStatus | None] = mapped_column(
        Enum(ReportStatus, native_enum=False, length=16)
    )
    reason: Mapped[str | None] = mapped_column(Text)
    #: SOP Instance UID of an SR; "sending application|facility|MSH-10[#group]" of an HL7
    #: report (duplicates of an accepted report are answered without a new row)
    message_id: Mapped[str | None] = mapped_column(String(300), index=True)
    answer: Mapped[str | None] = mapped_column(String(16))  # DIMSE status or ACK code sent
    peer: Mapped[str | None] = mapped_column(String(100))  # calling AE title or remote host
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    observed_at: Mapped[datetime | None]  # when the radiologist reported, if the report says
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), index=True)
    path: Mapped[str | None] = mapped_column(String(512))  # relative to DATA_DIR/reports
    text: Mapped[str | None] = mapped_column(Text)
    #: the labeler's reading of ``text``: finding -> present/absent/uncertain/not_mentioned
    labels: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: the study's draft (job id) this report was last scored against; a newer draft makes
    #: the study due for scoring again
    scored_job_id: Mapped[int | None] = mapped_column(Integer)


class Agreement(Base):
    """One finding of one study: the AI draft's state beside the radiologist's.

    A study has one row per finding, from its chosen report and its latest draft; re-scoring
    (a correction, a newer draft) replaces the rows.
    """

    __tablename__ = "agreements"
    __table_args__ = (
        UniqueConstraint("study_id", "finding", name="uq_agreements_study_finding"),
        Index("ix_agreements_reported_model", "reported_at", "model_hash"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    report_id: Mapped[int] = mapped_column(ForeignKey("final_reports.id"), index=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    finding: Mapped[str] = mapped_column(String(32))
    ai: Mapped[str] = mapped_column(String(16))  # present / absent / uncertain / not_mentioned
    radiologist: Mapped[str] = mapped_column(String(16))
    model_hash: Mapped[str] = mapped_column(String(128))
    model_id: Mapped[str] = mapped_column(String(512))
    reported_at: Mapped[datetime]  # the chosen report's received_at: what windows count by
    scored_at: Mapped[datetime] = mapped_column(default=utcnow)


class OutputAttempt(Base):
    """One try to deliver an output, and each admin resend: the output's delivery history.

    Written by a database trigger on ``outputs.attempts`` (migration 0003a), so every process
    that records a try (the sender, ``cxrnode resend``, the admin API) leaves a row without
    knowing about this table: ``attempt`` is the try's number (0 for a resend, which resets
    the count), ``state``/``status``/``error`` are the output's after that try.
    """

    __tablename__ = "output_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    output_id: Mapped[int] = mapped_column(ForeignKey("outputs.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime]
    state: Mapped[str] = mapped_column(String(24))
    status: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)


class AssociationLog(Base):
    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_aet: Mapped[str] = mapped_column(String(64))
    called_aet: Mapped[str] = mapped_column(String(64))
    peer_host: Mapped[str | None] = mapped_column(String(64))
    accepted: Mapped[bool]
    reason: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None]
    instances: Mapped[int] = mapped_column(Integer, default=0)
    bytes_received: Mapped[int] = mapped_column(BigInteger, default=0)


class Refusal(Base):
    """A C-STORE answered with a failure status: what was refused, from whom, and why.

    UIDs, AE titles and the reason only (no patient data). ``kind`` groups them for admins:
    ``uid-conflict`` (an SOP Instance UID already received under another Study Instance UID),
    ``unreadable``, ``mismatch``, ``not-supported``, ``out-of-resources``.
    """

    __tablename__ = "refusals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    calling_aet: Mapped[str] = mapped_column(AET)
    peer_host: Mapped[str | None] = mapped_column(String(64))
    sop_class_uid: Mapped[str | None] = mapped_column(UID)  # only when a valid UID
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)  # only when a valid UID
    status: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    reason: Mapped[str] = mapped_column(Text)


class LocalUser(Base):
    """A local account (sites without a directory): name, role and a scrypt hash of the
    password (:mod:`cxrnode.web.users`); never the password itself."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    disabled_at: Mapped[datetime | None]


class ApiToken(Base):
    """A service account's API token: only its SHA-256 is kept (the token is shown once)."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class UrgentDraft(Base):
    """A draft that triage made urgent: listed on the dashboard until someone acknowledges it.

    ``suspected`` is the comma-separated findings that raised the priority (most urgent
    first); ``acknowledged_by`` names the operator (the dashboard's identity of the session).
    """

    __tablename__ = "urgent_drafts"
    __table_args__ = (Index("ix_urgent_drafts_acknowledged_at", "acknowledged_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    priority: Mapped[str] = mapped_column(String(8))
    suspected: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    acknowledged_at: Mapped[datetime | None]
    acknowledged_by: Mapped[str | None] = mapped_column(String(200))


class NotificationState(enum.StrEnum):
    pending = "pending"  # waiting for its next try
    sent = "sent"
    failed = "failed"  # out of tries or refused for good (reason in last_error)


class Notification(Base):
    """One announcement of an urgent draft to one channel target (a webhook URL, an e-mail
    recipient list): recorded with the draft's outputs, then sent and retried from here."""

    __tablename__ = "notifications"
    __table_args__ = (Index("ix_notifications_state_next", "state", "next_try_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    urgent_id: Mapped[int | None] = mapped_column(ForeignKey("urgent_drafts.id"), index=True)
    channel: Mapped[str] = mapped_column(String(16))  # "webhook" or "email"
    target: Mapped[str] = mapped_column(String(500))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[NotificationState] = mapped_column(
        Enum(NotificationState, native_enum=False, length=16)
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_try_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None]


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # a commit we acknowledge survives power loss
    cursor.execute("PRAGMA busy_timeout=30000")  # several listener processes share the file
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin_immediate(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_begin_deferred(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN")


def _sqlite_query_only(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA query_only=ON")
    cursor.close()


#: libpq settings that bound how long a dead or partitioned database host can hold a
#: connection (a C-STORE's commit, a scheduler pass): connecting gives up after 10 s, and
#: unacknowledged data or silent keepalives break the connection after about 20 s, instead of
#: the kernel's ~15 minutes of retransmissions. A setting in the URL's query wins.
PG_NETWORK_DEFAULTS: dict[str, int] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 2,
    "tcp_user_timeout": 20000,
}


def network_connect_args(url: str) -> dict[str, int]:
    """:data:`PG_NETWORK_DEFAULTS` for a PostgreSQL URL, less what its query sets."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("postgresql"):
        return {}
    return {k: v for k, v in PG_NETWORK_DEFAULTS.items() if k not in parsed.query}


def make_engine(url: str, *, read_only: bool = False) -> Engine:
    """Create an engine; SQLite gets WAL, full fsync on commit and a generous busy timeout.

    On SQLite, every transaction of a writing engine starts with ``BEGIN IMMEDIATE`` (it takes
    the write lock at once, so concurrent writers wait on the busy timeout instead of failing
    when a read lock cannot be upgraded). A ``read_only`` engine starts plain ``BEGIN`` and
    refuses writes (``PRAGMA query_only``): in WAL mode its readers never wait for a writer nor
    hold one up, which is what status pages, the scheduler's due-work queries and metrics use.
    """
    if url.startswith("sqlite"):
        # Driver-level autocommit plus an explicit BEGIN: SQLAlchemy's pysqlite default would
        # issue none and let the driver open transactions implicitly.
        engine = create_engine(url, connect_args={"timeout": 30, "isolation_level": None})
        event.listen(engine, "connect", _sqlite_pragmas)
        if read_only:
            event.listen(engine, "connect", _sqlite_query_only)
            event.listen(engine, "begin", _sqlite_begin_deferred)
        else:
            event.listen(engine, "begin", _sqlite_begin_immediate)
        return engine
    engine = create_engine(url, pool_pre_ping=True, connect_args=network_connect_args(url))
    if read_only:
        engine = engine.execution_options(postgresql_readonly=True)
    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)
