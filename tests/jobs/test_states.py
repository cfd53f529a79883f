"""The job state machine: every move in the table, and every other move refused."""

from __future__ import annotations

import itertools
from datetime import timedelta

import pytest
from jobcore import Node
from sqlalchemy import select

from cxrnode.db import FINAL_JOB_STATES, Job, JobEvent, JobState, utcnow
from cxrnode.jobs import states
from cxrnode.jobs.grouping import settle_due_studies
from cxrnode.jobs.messages import BuildOutputs, InferReport, JobMessage, PrepareImage
from cxrnode.jobs.states import ALLOWED, RESEND, find_lost, take_pending, transition
from model.contracts import ModelResult

S = JobState


def new_job(node: Node) -> int:
    node.receive()
    with node.sessions() as session:
        (job_id,) = settle_due_studies(session, now=utcnow() + timedelta(seconds=1))
    return job_id


def force(node: Node, job_id: int, state: JobState) -> None:
    """Put a job in ``state`` directly (test set-up only; the code never does this)."""
    with node.sessions() as session:
        session.get(Job, job_id).state = state
        session.commit()


def state_of(node: Node, job_id: int) -> JobState:
    with node.sessions() as session:
        return JobState(session.get(Job, job_id).state)


def result() -> ModelResult:
    return ModelResult(
        report="No acute findings.",
        differential="",
        recommendation="",
        findings={"no_finding": "present"},
        model_id="tiny",
        model_hash="ab" * 32,
    )


def test_the_table_reaches_done_from_pending_and_ends_in_final_states() -> None:
    path = [S.pending, S.queued, S.prepared, S.inferred, S.done]
    assert all(step in ALLOWED for step in itertools.pairwise(path))
    assert not any(src in FINAL_JOB_STATES for src, _ in ALLOWED), "final states are final"
    assert set(RESEND) == {src for src, _ in ALLOWED} - FINAL_JOB_STATES


@pytest.mark.parametrize(
    ("source", "target"), list(itertools.product(list(JobState), list(JobState)))
)
def test_every_move_is_taken_only_when_the_table_allows_it(
    node: Node, source: JobState, target: JobState
) -> None:
    job_id = new_job(node)
    force(node, job_id, source)
    with node.sessions() as session:
        moved = transition(
            session, job_id, target, result=result() if target == S.inferred else None
        )
    assert moved == ((source, target) in ALLOWED)
    assert state_of(node, job_id) == (target if moved else source)


def test_an_accepted_move_is_recorded_in_the_job_history(node: Node) -> None:
    job_id = new_job(node)
    with node.sessions() as session:
        assert transition(session, job_id, S.queued)
        assert transition(session, job_id, S.prepared)
        assert transition(session, job_id, S.failed, error="image cannot be read: no pixels")
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)).all()
    assert [(e.from_state, e.to_state) for e in events] == [
        (None, "pending"),
        ("pending", "queued"),
        ("queued", "prepared"),
        ("prepared", "failed"),
    ]
    assert events[-1].detail == "image cannot be read: no pixels"


def test_a_message_for_another_version_changes_nothing(node: Node) -> None:
    job_id = new_job(node)
    with node.sessions() as session:
        assert not transition(session, job_id, S.queued, version=2)
        assert transition(session, job_id, S.queued, version=1)


def test_a_duplicate_result_is_stored_once(node: Node) -> None:
    job_id = new_job(node)
    force(node, job_id, S.prepared)
    first, second = result(), ModelResult(**{**result().to_dict(), "report": "Different."})
    with node.sessions() as session:
        assert transition(session, job_id, S.inferred, result=first)
        assert not transition(session, job_id, S.inferred, result=second)  # redelivered
        job = session.get(Job, job_id)
        assert job.model_result == first


def test_a_late_answer_for_a_superseded_job_changes_nothing(node: Node) -> None:
    job_id = new_job(node)
    force(node, job_id, S.prepared)
    with node.sessions() as session:
        assert transition(session, job_id, S.superseded)
        assert not transition(session, job_id, S.inferred, result=result())
        assert not transition(session, job_id, S.waiting_model)
    assert state_of(node, job_id) == S.superseded


def test_take_pending_queues_each_new_job_once(node: Node) -> None:
    job_id = new_job(node)
    with node.sessions() as session:
        assert [w.job_id for w in take_pending(session)] == [job_id]
        assert take_pending(session) == []
    assert state_of(node, job_id) == S.queued


# ------------------------------------------------------------------------------ lost work


def aged(node: Node, job_id: int, seconds: float) -> None:
    with node.sessions() as session:
        session.get(Job, job_id).updated_at = utcnow() - timedelta(seconds=seconds)
        session.commit()


def lost(node: Node, *, waiting=(), held=(), grace=30.0, deadline=1800.0):
    with node.sessions() as session:
        return find_lost(
            session,
            waiting={j: ("prepare_image", 0.0) for j in waiting},
            held=set(held),
            grace_seconds=grace,
            deadline_seconds=deadline,
        )


@pytest.mark.parametrize(
    ("state", "task"),
    [
        (S.queued, PrepareImage),
        (S.prepared, InferReport),
        (S.waiting_model, InferReport),
        (S.inferred, BuildOutputs),
    ],
)
def test_a_job_neither_waiting_nor_held_is_re_sent_with_the_message_its_state_needs(
    node: Node, state: JobState, task: type[JobMessage]
) -> None:
    job_id = new_job(node)
    force(node, job_id, state)
    aged(node, job_id, 60)
    resend, failed = lost(node)
    assert [(r.job_id, r.task) for r in resend] == [(job_id, task)] and failed == []
    assert lost(node) == ([], []), "found once per grace period, not on every pass"


def test_a_job_held_by_a_live_worker_is_slow_not_lost(node: Node) -> None:
    job_id = new_job(node)
    force(node, job_id, S.prepared)
    aged(node, job_id, 600)  # a long batch on a slow GPU
    assert lost(node, held=[job_id]) == ([], [])
    assert lost(node, waiting=[job_id]) == ([], [])


def test_a_job_moved_just_now_is_given_its_grace_period(node: Node) -> None:
    job_id = new_job(node)
    force(node, job_id, S.prepared)
    aged(node, job_id, 5)
    assert lost(node) == ([], [])


def test_a_job_held_past_the_hard_deadline_is_re_sent(node: Node) -> None:
    job_id = new_job(node)
    force(node, job_id, S.prepared)
    aged(node, job_id, 4000)
    resend, _ = lost(node, held=[job_id], deadline=1800)
    assert [r.job_id for r in resend] == [job_id]


def test_a_job_lost_again_and_again_fails_with_the_reason(node: Node) -> None:
    job_id = new_job(node)
    force(node, job_id, S.prepared)
    for _ in range(states.MAX_ATTEMPTS):
        aged(node, job_id, 60)
        resend, failed = lost(node)
        assert [r.job_id for r in resend] == [job_id]
    aged(node, job_id, 60)
    assert lost(node) == ([], [job_id])
    with node.sessions() as session:
        job = session.get(Job, job_id)
        assert job.state == S.failed and "lost" in job.error


def test_final_jobs_are_never_re_sent(node: Node) -> None:
    for state in FINAL_JOB_STATES:
        job_id = new_job(node)
        force(node, job_id, state)
        aged(node, job_id, 4000)
    assert lost(node) == ([], [])
