"""Retention removes a study's files only when the study is delivered and old, and keeps its
records. In-process on a migrated SQLite database with real files under a data directory;
the run with a real node is in test_pacs_outage.py."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from cxrnode.db import (
    Instance,
    InstanceState,
    Job,
    JobState,
    Output,
    OutputState,
    Study,
    StudyState,
    make_engine,
    make_sessionmaker,
    utcnow,
)
from cxrnode.db.migrate import upgrade
from cxrnode.retention import (
    due_studies,
    purge_due,
    retention_counts,
    retention_metrics,
    run_retention,
)
from cxrnode.settings import Settings
from cxrnode.status import collect_status, render_status

NOW = datetime(2026, 6, 1, 12, 0, 0)
OLD = NOW - timedelta(days=40)
RECENT = NOW - timedelta(days=2)


@dataclass
class Made:
    study_id: int
    uid: str
    files: list[Path]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'node.db'}",
        retention_days=30,
    )


@pytest.fixture
def sessions(settings: Settings):
    engine = make_engine(settings.effective_database_url)
    upgrade(engine)
    yield make_sessionmaker(engine)
    engine.dispose()


def _file(path: Path, moment: datetime, size: int = 1000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    stamp = (moment - datetime(1970, 1, 1)).total_seconds()
    os.utime(path, (stamp, stamp))
    return path


def make_study(
    sessions,
    settings: Settings,
    *,
    state: StudyState = StudyState.settled,
    last_arrival: datetime = OLD,
    jobs: tuple[tuple[JobState, datetime, tuple[tuple[OutputState, datetime], ...]], ...] = (
        (JobState.done, OLD, ((OutputState.delivered, OLD), (OutputState.delivered, OLD))),
    ),
    instances: int = 2,
) -> Made:
    """A study with instance files, prepared images and output files, as a node leaves them."""
    uid = generate_uid()
    files: list[Path] = []
    with sessions() as session:
        study = Study(
            study_instance_uid=uid,
            state=state,
            first_arrival=last_arrival,
            last_arrival=last_arrival,
            settle_at=last_arrival,
            instance_count=instances,
            version=len(jobs),
        )
        session.add(study)
        session.flush()
        rows = []
        for _ in range(instances):
            sop = generate_uid()
            relpath = f"{uid}/{sop}.dcm"
            files.append(_file(settings.instances_dir / relpath, last_arrival, 5000))
            files.append(_file(settings.prepared_dir / uid / f"{sop}.display.npy", last_arrival))
            row = Instance(
                sop_instance_uid=sop,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                study_instance_uid=uid,
                series_instance_uid=generate_uid(),
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path=relpath,
                size_bytes=5000,
                calling_aet="PACS",
                state=InstanceState.stored,
                received_at=last_arrival,
                study_id=study.id,
            )
            session.add(row)
            rows.append(row)
        session.flush()
        for version, (job_state, job_at, outputs) in enumerate(jobs, start=1):
            job = Job(
                study_id=study.id,
                instance_id=rows[0].id,
                version=version,
                state=job_state,
                created_at=job_at,
                updated_at=job_at,
            )
            session.add(job)
            session.flush()
            for kind, (output_state, output_at) in zip(("text_sr", "sc"), outputs, strict=False):
                sop = generate_uid()
                relpath = f"{uid}/{sop}.dcm"
                files.append(_file(settings.outputs_dir / relpath, output_at))
                output = Output.pending(
                    job_id=job.id,
                    kind=kind,
                    destination="PACS@pacs:104",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.88.33",
                    sop_instance_uid=sop,
                    path=relpath,
                    now=output_at,
                )
                output.state = output_state
                session.add(output)
        session.commit()
        # the ORM's onupdate would stamp "now"; set the moments the test means
        for job in session.scalars(select(Job).where(Job.study_id == study.id)):
            job.updated_at = next(at for state, at, _ in jobs if state == job.state)
        session.commit()
        return Made(study.id, uid, files)


def purged(sessions, made: Made) -> bool:
    with sessions() as session:
        study = session.get(Study, made.study_id)
        instances = session.scalars(select(Instance).where(Instance.study_id == made.study_id))
        outputs = session.scalars(
            select(Output).join(Job, Output.job_id == Job.id).where(Job.study_id == made.study_id)
        )
        marks = (
            [study.purged_at] + [i.purged_at for i in instances] + [o.purged_at for o in outputs]
        )
    gone = [not path.exists() for path in made.files]
    assert all(gone) == all(m is not None for m in marks), "files and marks agree"
    assert all(gone) or not any(gone), "a study goes whole or not at all"
    return all(gone)


def test_a_delivered_study_older_than_the_retention_loses_its_files_and_keeps_its_rows(
    settings: Settings, sessions
) -> None:
    made = make_study(sessions, settings)
    result = purge_due(settings, sessions, now=NOW)
    assert (result.studies, result.instances, result.outputs) == (1, 2, 2)
    assert result.files == 6 and result.bytes == 2 * 5000 + 4 * 1000
    assert purged(sessions, made)
    for root in (settings.instances_dir, settings.outputs_dir, settings.prepared_dir):
        assert not (root / made.uid).exists(), "empty study directories go too"
    with sessions() as session:
        assert session.get(Study, made.study_id).state == StudyState.settled
        assert len(session.scalars(select(Job)).all()) == 1, "jobs and history stay"
        counts = retention_counts(session)
        metrics = retention_metrics(session)
    assert counts["purged_studies"] == 1 and counts["purged_instances"] == 2
    assert counts["purged_outputs"] == 2 and counts["purged_instance_bytes"] == 10000
    assert counts["last_purge"].startswith("2026-06-01T12:00:00")
    assert metrics["cxrnode_retention_purged_studies"] == 1.0
    assert metrics["cxrnode_retention_last_purge_timestamp_seconds"] > 0
    assert purge_due(settings, sessions, now=NOW).studies == 0, "a second pass finds nothing"


@pytest.mark.parametrize(
    "case",
    [
        "delivered recently",
        "an output still pending",
        "a dead letter",
        "a job still open",
        "a job moved recently",
        "still receiving",
        "an image arrived recently",
    ],
)
def test_a_study_that_is_not_delivered_or_not_old_keeps_its_files(
    settings: Settings, sessions, case: str
) -> None:
    delivered = (OutputState.delivered, OLD)
    variants = {
        "delivered recently": dict(
            jobs=((JobState.done, OLD, (delivered, (OutputState.delivered, RECENT))),)
        ),
        "an output still pending": dict(
            jobs=((JobState.done, OLD, (delivered, (OutputState.pending, OLD))),)
        ),
        "a dead letter": dict(jobs=((JobState.done, OLD, (delivered, (OutputState.dead, OLD))),)),
        "a job still open": dict(jobs=((JobState.waiting_model, OLD, ()),)),
        "a job moved recently": dict(jobs=((JobState.failed, RECENT, ()),)),
        "still receiving": dict(state=StudyState.receiving),
        "an image arrived recently": dict(last_arrival=RECENT),
    }
    made = make_study(sessions, settings, **variants[case])
    assert purge_due(settings, sessions, now=NOW).studies == 0
    assert not purged(sessions, made)


def test_superseded_outputs_count_as_done_once_the_newer_draft_is_delivered(
    settings: Settings, sessions
) -> None:
    superseded = (OutputState.superseded, OLD)
    delivered = (OutputState.delivered, OLD)
    made = make_study(
        sessions,
        settings,
        jobs=(
            (JobState.done, OLD, (superseded, superseded)),
            (JobState.done, OLD, (delivered, delivered)),
        ),
    )
    assert purge_due(settings, sessions, now=NOW).outputs == 4
    assert purged(sessions, made)


@pytest.mark.parametrize("case", ["skipped study", "failed job", "no destinations"])
def test_a_study_with_nothing_to_send_goes_once_it_is_old(
    settings: Settings, sessions, case: str
) -> None:
    variants = {
        "skipped study": dict(state=StudyState.skipped, jobs=()),
        "failed job": dict(jobs=((JobState.failed, OLD, ()),)),
        "no destinations": dict(jobs=((JobState.done, OLD, ()),)),
    }
    made = make_study(sessions, settings, **variants[case])
    if case == "no destinations":  # outputs written without rows: swept from the directory
        made.files.append(_file(settings.outputs_dir / made.uid / "unsent.dcm", OLD))
    assert purge_due(settings, sessions, now=NOW).studies == 1
    assert purged(sessions, made)


def test_a_file_newer_than_the_cutoff_in_a_purged_study_stays(settings: Settings, sessions) -> None:
    made = make_study(sessions, settings)
    newer = _file(settings.prepared_dir / made.uid / "arrived-meanwhile.display.npy", RECENT)
    missing = made.files[0]
    missing.unlink()  # removed by hand earlier: not an error
    assert purge_due(settings, sessions, now=NOW).studies == 1
    assert newer.exists() and (settings.prepared_dir / made.uid).is_dir()
    assert not any(path.exists() for path in made.files)


def test_only_old_delivered_studies_go_and_large_backlogs_go_in_batches(
    settings: Settings, sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cxrnode.retention as retention

    monkeypatch.setattr(retention, "BATCH_STUDIES", 2)
    old = [make_study(sessions, settings, instances=1) for _ in range(5)]
    young = make_study(sessions, settings, last_arrival=RECENT, instances=1)
    assert purge_due(settings, sessions, now=NOW).studies == 5
    assert all(purged(sessions, made) for made in old)
    assert not purged(sessions, young)


def test_retention_days_zero_keeps_everything(settings: Settings, sessions) -> None:
    made = make_study(sessions, settings)
    keep = settings.model_copy(update={"retention_days": 0})
    assert purge_due(keep, sessions, now=NOW).studies == 0
    assert not purged(sessions, made)


def test_the_due_query_is_one_indexed_read(settings: Settings, sessions) -> None:
    from sqlalchemy import event

    seen: list[tuple[str, tuple]] = []
    with sessions() as session:
        connection = session.connection()
        capture = lambda *args: seen.append((args[2], args[3]))  # noqa: E731
        event.listen(connection, "before_cursor_execute", capture)
        session.scalars(due_studies(NOW)).all()
        event.remove(connection, "before_cursor_execute", capture)
        statement, values = seen[-1]
        plan = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", values).all()
    text = " ".join(str(row[-1]) for row in plan)
    assert "ix_studies_purged_last_arrival" in text, text


def test_the_retention_thread_runs_a_pass_per_interval_and_stops(
    settings: Settings, sessions
) -> None:
    import threading

    made = make_study(sessions, settings, last_arrival=utcnow() - timedelta(days=40))
    fast = settings.model_copy(update={"retention_interval_seconds": 0.2})
    stop = threading.Event()
    thread = threading.Thread(target=run_retention, args=(fast, sessions, None, stop))
    thread.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not purged(sessions, made):
        time.sleep(0.1)
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    assert purged(sessions, made)


def test_status_shows_what_retention_removed(settings: Settings, sessions) -> None:
    make_study(sessions, settings)
    purge_due(settings, sessions, now=NOW)
    with sessions() as session:
        summary = collect_status(settings, session=session)  # no broker: workers unknown
    assert (summary.retention.days, summary.retention.purged_studies) == (30, 1)
    line = next(x for x in render_status(summary).splitlines() if x.startswith("retention"))
    assert "files kept 30 days after delivery" in line and "1 studies, 2 instances" in line
    assert "2 outputs" in line and "10 KiB" in line and "last 2026-06-01T12:00:00" in line


def test_on_postgresql_the_same_pass_locks_and_purges_only_what_is_due(
    tmp_path: Path, pg_admin_url: str
) -> None:
    from services import fresh_database

    with fresh_database(pg_admin_url) as url:
        settings = Settings(data_dir=tmp_path / "data", database_url=url, retention_days=30)
        engine = make_engine(url)
        try:
            upgrade(engine)
            sessions = make_sessionmaker(engine)
            due = make_study(sessions, settings)
            pending = make_study(
                sessions,
                settings,
                jobs=((JobState.done, OLD, ((OutputState.pending, OLD),)),),
            )
            assert purge_due(settings, sessions, now=NOW).studies == 1
            assert purged(sessions, due) and not purged(sessions, pending)
        finally:
            engine.dispose()


def test_each_study_retention_removes_is_a_study_deleted_audit_record(
    settings: Settings, sessions
) -> None:
    from cxrnode.audit.files import AuditFiles

    made = make_study(sessions, settings)
    kept = make_study(sessions, settings, last_arrival=RECENT)
    purge_due(settings, sessions, now=NOW)
    records = list(AuditFiles(settings.data_dir / "audit").records())
    deleted = [r for r in records if 'csd-code="110105"' in r]
    assert len(deleted) == 1 and f'ParticipantObjectID="{made.uid}"' in deleted[0]
    assert 'EventActionCode="D"' in deleted[0] and kept.uid not in deleted[0]
