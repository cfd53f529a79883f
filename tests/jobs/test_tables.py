"""The output and study transition tables: every move taken only when the table allows it,
stale writes refused, each refusal logged once."""

from __future__ import annotations

import itertools
import logging
from datetime import timedelta

import pytest
from sqlalchemy import insert, text

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
from cxrnode.db.migrate import downgrade, upgrade
from cxrnode.jobs.states import STUDY_ALLOWED, move_study
from cxrnode.outputs import states as output_states
from cxrnode.outputs.outbox import Outcome, RetryPolicy, Verdict, apply_outcome

O = OutputState  # noqa: E741


def output(state: OutputState) -> Output:
    row = Output.pending(
        job_id=1,
        kind="text_sr",
        destination="PACS@pacs:104",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.11",
        sop_instance_uid="1.2.3",
        path="x.dcm",
        now=utcnow(),
    )
    row.id, row.state, row.attempts = 7, state, 0
    return row


@pytest.mark.parametrize(("source", "target"), list(itertools.product(list(O), list(O))))
def test_every_output_move_is_taken_only_when_the_table_allows_it(
    source: OutputState, target: OutputState, caplog: pytest.LogCaptureFixture
) -> None:
    row = output(source)
    with caplog.at_level(logging.INFO, logger="cxrnode"):
        moved = output_states.move(row, target, now=utcnow(), last_error="why")
    assert moved == ((source, target) in output_states.ALLOWED)
    assert row.state == (target if moved else source)
    assert (row.last_error == "why") == moved, "a refused write changes nothing"
    assert len(caplog.records) == (0 if moved else 1)


def test_the_output_table_sends_every_row_somewhere_final_and_lets_an_admin_resend() -> None:
    assert (O.pending, O.in_flight) in output_states.ALLOWED
    finals = {O.delivered, O.delivered_warning, O.dead, O.superseded}
    assert all((O.in_flight, final) in output_states.ALLOWED for final in finals)
    assert not any(src in finals and dst != O.pending for src, dst in output_states.ALLOWED)
    assert (O.pending, O.delivered) not in output_states.ALLOWED, "only a send delivers"


def test_an_outcome_for_a_row_no_longer_in_flight_is_refused() -> None:
    """An admin resent the row while its send was under way: the late outcome is stale."""
    row = output(O.pending)
    policy = RetryPolicy(base_seconds=1, max_seconds=2, max_attempts=3)
    assert not apply_outcome(row, Outcome(Verdict.dead, "0x0122", "refused"), policy, utcnow())
    assert (row.state, row.attempts, row.last_status) == (O.pending, 0, None)


def test_a_failed_try_goes_back_to_pending_with_its_delay_and_the_last_one_is_dead() -> None:
    row = output(O.in_flight)
    policy = RetryPolicy(base_seconds=1, max_seconds=2, max_attempts=2)
    now = utcnow()
    failure = Outcome(Verdict.retry, "no-connection", "cannot connect")
    assert apply_outcome(row, failure, policy, now)
    assert (row.state, row.attempts, row.next_try_at) == (O.pending, 1, now + timedelta(seconds=1))
    assert output_states.move(row, O.in_flight, now=now)  # claimed again
    assert apply_outcome(row, failure, policy, now)
    assert (row.state, row.attempts) == (O.dead, 2) and row.last_error.startswith("gave up")


@pytest.mark.parametrize(
    ("source", "target"), list(itertools.product(list(StudyState), list(StudyState)))
)
def test_every_study_move_is_taken_only_when_the_table_allows_it(
    source: StudyState, target: StudyState
) -> None:
    study = Study(id=3, state=source, skip_reason="old")
    moved = move_study(study, target, skip_reason="only lateral views")
    assert moved == ((source, target) in STUDY_ALLOWED)
    assert study.state == (target if moved else source)
    assert study.skip_reason == ("only lateral views" if moved else "old")


def test_a_study_that_changed_since_it_was_read_is_not_settled() -> None:
    study = Study(id=3, state=StudyState.receiving)
    study.state = StudyState.skipped  # someone else decided first
    assert not move_study(study, StudyState.settled, expect=(StudyState.receiving,))
    assert study.state == StudyState.skipped


def test_migration_0004a_moves_claimed_rows_into_in_flight_and_back(tmp_path) -> None:  # noqa: ANN001
    """Rows claimed by the release before (``pending`` + "in flight") are ``in_flight`` after
    the upgrade; a row waiting for a retry stays ``pending``; downgrade restores the old form."""
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    upgrade(engine, "0004c")
    with make_sessionmaker(engine)() as session:
        study = Study(study_instance_uid="1.2.3", state=StudyState.settled, settle_at=utcnow())
        session.add(study)
        session.flush()
        # Core inserts of the columns of that revision (the models have later columns)
        session.execute(
            insert(Instance.__table__).values(
                id=1,
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
        )
        session.execute(
            insert(Job.__table__).values(
                id=1, study_id=study.id, instance_id=1, state=JobState.done
            )
        )
        rows = [output(O.pending) for _ in range(2)]
        for row, status in zip(rows, ("in flight", "no-connection"), strict=True):
            row.id, row.job_id, row.last_status = None, 1, status
            session.add(row)
        session.commit()

    def states() -> list[tuple[str, str | None]]:
        with engine.connect() as conn:
            query = text("SELECT state, last_status FROM outputs ORDER BY id")
            return [tuple(r) for r in conn.execute(query)]

    upgrade(engine)
    assert states() == [("in_flight", None), ("pending", "no-connection")]
    downgrade(engine, "0004c")
    assert states() == [("pending", "in flight"), ("pending", "no-connection")]
    engine.dispose()
