"""The delivery history (``output_attempts``) is written by the database itself, on SQLite and
PostgreSQL, for every try the outbox records and every resend; and it migrates both ways."""

from __future__ import annotations

from sqlalchemy import select

from cxrnode.db import (
    Instance,
    InstanceState,
    Job,
    JobState,
    Output,
    OutputAttempt,
    OutputState,
    Study,
    StudyState,
    make_engine,
    make_sessionmaker,
    utcnow,
)
from cxrnode.db.migrate import current_revision, downgrade, head_revision, upgrade
from cxrnode.outputs.outbox import Outcome, RetryPolicy, Verdict, apply_outcome, resend
from cxrnode.settings import Settings


def one_output(session) -> Output:  # noqa: ANN001
    study = Study(study_instance_uid="1.2.3", state=StudyState.settled, settle_at=utcnow())
    session.add(study)
    session.flush()
    instance = Instance(
        sop_instance_uid="1.2.3.4",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.5",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path="x.dcm",
        size_bytes=1,
        calling_aet="PACS",
        state=InstanceState.stored,
        study_id=study.id,
    )
    session.add(instance)
    session.flush()
    job = Job(study_id=study.id, instance_id=instance.id, state=JobState.done)
    session.add(job)
    session.flush()
    output = Output.pending(
        job_id=job.id,
        kind="sr",
        destination="PACS@127.0.0.1:104",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.11",
        sop_instance_uid="1.2.3.6",
        path="sr.dcm",
        now=utcnow(),
    )
    session.add(output)
    session.commit()
    return output


def test_every_try_and_resend_of_an_output_is_in_its_history(database_url: str, tmp_path) -> None:  # noqa: ANN001
    engine = make_engine(database_url)
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    sessions = make_sessionmaker(engine)
    policy = RetryPolicy(base_seconds=1, max_seconds=2, max_attempts=2)
    with sessions() as session:
        output = one_output(session)
        failure = Outcome(Verdict.retry, "no-connection", "cannot connect")
        output.state = OutputState.in_flight  # each try follows a claim (not recorded)
        assert apply_outcome(output, failure, policy, utcnow())
        session.commit()
        output.state = OutputState.in_flight
        assert apply_outcome(output, failure, policy, utcnow())  # second try: out of tries
        session.commit()
        resend(session, Settings(data_dir=tmp_path), output_id=output.id)
        output.state = OutputState.in_flight  # a claim: not a try, not recorded
        session.commit()
        assert apply_outcome(output, Outcome(Verdict.delivered, "0x0000"), policy, utcnow())
        session.commit()
        history = [
            (a.attempt, a.state, a.status)
            for a in session.scalars(select(OutputAttempt).order_by(OutputAttempt.id))
        ]
    assert history == [
        (1, OutputState.pending.value, "no-connection"),
        (2, OutputState.dead.value, "no-connection"),
        (0, OutputState.pending.value, "no-connection"),
        (1, OutputState.delivered.value, "0x0000"),
    ]

    downgrade(engine, "0003c")  # the revision before the attempts table
    assert current_revision(engine) == "0003c"
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    engine.dispose()
