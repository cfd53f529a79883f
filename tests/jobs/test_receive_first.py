"""Receive first: while instances keep arriving, the scheduler holds settled studies back
(their prepare, inference and outputs would take the listeners' disk and CPU), until the node
has been quiet for RECEIVE_HOLD_SECONDS, and never longer than RECEIVE_HOLD_MAX_SECONDS.

In-process: real SQLite, real ingest, the scheduler's own pass; a real Redis for the
dispatcher's messages."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from jobcore import Node
from sqlalchemy import select

from cxrnode.db import Job, Study, StudyState, utcnow
from cxrnode.jobs.broker import celery_app
from cxrnode.jobs.dispatch import Dispatcher
from cxrnode.jobs.scheduler import Scheduler


@pytest.fixture
def scheduler(node: Node, redis, redis_url: str) -> Scheduler:
    settings = node.settings.model_copy(
        update={
            "broker_url": redis_url + "/0",
            "receive_hold_seconds": 1.5,
            "receive_hold_max_seconds": 30.0,
        }
    )
    dispatcher = Dispatcher(settings, celery=celery_app(settings), redis=redis)
    return Scheduler(settings, node.sessions, node.readers, dispatcher)


def jobs(node: Node) -> int:
    with node.sessions() as session:
        return len(session.scalars(select(Job)).all())


def test_a_study_due_while_others_still_arrive_waits_for_the_quiet(
    node: Node, scheduler: Scheduler
) -> None:
    node.receive()  # settle_seconds is 0: due at once, but it has only just arrived
    wait = scheduler.run_once()  # a whole pass, as the scheduler's loop runs it
    assert jobs(node) == 0, "settled while instances were still arriving"
    assert 0.5 < wait <= 1.5, "the scheduler looks again when the quiet period is over"
    time.sleep(1.6)
    scheduler.settle_studies()
    assert jobs(node) == 1


def test_a_steady_stream_holds_work_back_no_longer_than_the_limit(
    node: Node, scheduler: Scheduler
) -> None:
    node.receive()
    scheduler.settle_studies()
    assert jobs(node) == 0
    # the first wait began 31 s ago and instances are still arriving: serve the stream
    assert scheduler._held_since is not None
    scheduler._held_since = utcnow() - timedelta(seconds=31)
    node.receive()
    scheduler.settle_studies()
    assert jobs(node) == 2
    with node.sessions() as session:
        states = {s.state for s in session.scalars(select(Study))}
    assert states == {StudyState.settled}


def test_no_hold_when_turned_off(node: Node, scheduler: Scheduler) -> None:
    scheduler.settings = scheduler.settings.model_copy(update={"receive_hold_seconds": 0})
    node.receive()
    scheduler.settle_studies()
    assert jobs(node) == 1
