"""Lost messages are told from slow work by what the broker holds (a real Redis)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from datetime import timedelta

import pytest
from jobcore import Node
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
    utcnow,
)
from cxrnode.jobs import tracking
from cxrnode.jobs.broker import celery_app, queue_depths
from cxrnode.jobs.dispatch import Dispatcher
from cxrnode.jobs.messages import STAGE_QUEUES, host_queue
from cxrnode.jobs.scheduler import Scheduler
from cxrnode.outputs.outbox import SendBatch

GRACE = tracking.HEARTBEAT_TTL


@pytest.fixture
def dispatcher(node: Node, redis, redis_url: str) -> Dispatcher:
    settings = node.settings.model_copy(update={"broker_url": redis_url + "/0"})
    return Dispatcher(settings, celery=celery_app(settings), redis=redis)


def own_queue(dispatcher: Dispatcher, queue: str) -> str:
    """This node host's copy of a host-bound queue (where its own messages go)."""
    return host_queue(queue, dispatcher.settings.node_host)


def age_marks(redis, seconds: float) -> None:
    """Make every waiting mark look ``seconds`` old."""
    for key, value in redis.hgetall(tracking.WAITING_KEY).items():
        stage, when = json.loads(value)
        redis.hset(tracking.WAITING_KEY, key, json.dumps([stage, when - seconds]))


def test_a_published_message_is_waiting_and_stays_so_while_it_is_in_its_queue(
    dispatcher: Dispatcher, redis
) -> None:
    dispatcher.prepare_image(7, 1)
    marks = tracking.waiting(redis)
    assert list(marks) == ["7"] and marks["7"][0] == "prepare_image"
    age_marks(redis, GRACE + 5)  # a long backlog: still in the queue
    kept, orphans = tracking.verify_waiting(
        redis, tracking.waiting(redis), set(), STAGE_QUEUES, GRACE
    )
    assert list(kept) == ["7"] and orphans == {}


def test_a_message_in_another_node_hosts_queue_is_waiting(dispatcher: Dispatcher, redis) -> None:
    """Two node hosts: the reconciler on one finds the other's messages in its queues."""
    dispatcher.prepare_image(6, 1, "node-b")
    assert redis.llen("prepare.node-b") == 1 and redis.llen("prepare") == 0
    age_marks(redis, GRACE + 5)
    kept, _ = tracking.verify_waiting(redis, tracking.waiting(redis), set(), STAGE_QUEUES, GRACE)
    assert list(kept) == ["6"]


def test_a_queues_depth_counts_every_node_hosts_copy(dispatcher: Dispatcher, redis) -> None:
    dispatcher.prepare_image(3, 1, "node-a")
    dispatcher.prepare_image(4, 1, "node-b")
    dispatcher.prepare_image(5, 1)  # this host's
    depths = queue_depths(dispatcher.settings)
    assert depths["prepare"] == 3 and depths["send"] == 0


def test_a_mark_whose_message_is_in_no_queue_is_not_waiting(dispatcher: Dispatcher, redis) -> None:
    dispatcher.prepare_image(8, 1)
    redis.delete(own_queue(dispatcher, "prepare"))  # taken by a worker that died before it said so
    age_marks(redis, GRACE + 5)
    kept, _ = tracking.verify_waiting(redis, tracking.waiting(redis), set(), STAGE_QUEUES, GRACE)
    assert kept == {}


def test_a_young_mark_is_trusted_without_looking_at_the_queue(
    dispatcher: Dispatcher, redis
) -> None:
    dispatcher.prepare_image(9, 1)
    redis.delete(own_queue(dispatcher, "prepare"))
    kept, _ = tracking.verify_waiting(redis, tracking.waiting(redis), set(), STAGE_QUEUES, GRACE)
    assert list(kept) == ["9"]


def test_an_unacknowledged_message_no_live_worker_holds_is_an_orphan(
    dispatcher: Dispatcher, redis
) -> None:
    dispatcher.send_outputs([SendBatch("PACS@pacs:104", "1.2.3", [11, 12], "node-a")])
    (raw,) = redis.lrange("send.node-a", 0, -1)  # the queue of the host holding the files
    redis.delete("send.node-a")  # what kombu does when it hands the message to a consumer:
    redis.hset(tracking.UNACKED, "tag-1", json.dumps([json.loads(raw), "", "send"]))
    redis.zadd(tracking.UNACKED_INDEX, {"tag-1": time.time() - GRACE - 5})
    age_marks(redis, GRACE + 5)
    kept, orphans = tracking.verify_waiting(
        redis, tracking.waiting(redis), set(), STAGE_QUEUES, GRACE
    )
    assert kept == {} and set(orphans) == {"out:11", "out:12"}
    # held by a live worker, the same message is simply work in progress
    _, orphans = tracking.verify_waiting(redis, {}, {"out:11", "out:12"}, STAGE_QUEUES, GRACE)
    assert orphans == {}
    tracking.forget(redis, ["out:11", "out:12"], [b"tag-1"])
    assert redis.hlen(tracking.UNACKED) == 0 and redis.hlen(tracking.WAITING_KEY) == 0


def test_a_heartbeat_holds_what_its_worker_received_until_it_finishes(redis) -> None:
    redis.hset(tracking.WAITING_KEY, "5", json.dumps(["infer_report", time.time()]))
    beat = tracking.Heartbeat(redis, "infer-1@host", ["infer"]).start()
    beat.hold(["5"])
    beat.hold(["5"])  # a second message of the same job (a re-send)
    assert tracking.waiting(redis) == {}
    (worker,) = tracking.live_workers(redis)
    assert worker.held == {"5"} and worker.queues == ("infer",)
    beat.release(["5"])
    assert tracking.held_keys(tracking.live_workers(redis)) == {"5"}
    beat.release(["5"])
    assert tracking.held_keys(tracking.live_workers(redis)) == set()
    beat.stop()
    assert tracking.live_workers(redis) == []


def test_a_local_worker_whose_process_is_gone_is_dropped_at_once(redis) -> None:
    """kill -9 of a worker on the node's machine: its heartbeat is not waited out (30 s)."""
    host, pidns = socket.gethostname(), tracking.pid_namespace()
    proc = subprocess.Popen(["sleep", "60"])

    def beat(name: str, pid: int, host: str = host) -> None:
        info = tracking.WorkerInfo(name, ("infer",), host, pid, frozenset({"9"}), pidns=pidns)
        redis.set(tracking.WORKER_PREFIX + name, info.to_json(), ex=tracking.HEARTBEAT_TTL)

    beat("infer-a@here", proc.pid)
    beat("infer-b@elsewhere", proc.pid, host="another-host")  # its PID means nothing here
    assert [w.name for w in tracking.live_workers(redis)] == ["infer-a@here", "infer-b@elsewhere"]
    proc.kill()
    time.sleep(0.2)  # not reaped yet: a zombie is gone too
    assert [w.name for w in tracking.live_workers(redis)] == ["infer-b@elsewhere"]
    assert redis.get(tracking.WORKER_PREFIX + "infer-a@here") is None
    proc.wait()
    assert tracking.held_keys(tracking.live_workers(redis)) == {"9"}  # the remote one, till TTL


# ------------------------------------------------------------------------- lost sends


def claimed_output(node: Node, claimed_seconds_ago: float) -> int:
    """An outbox row claimed for sending ``claimed_seconds_ago`` (its message then lost)."""
    now = utcnow()
    with node.sessions() as session:
        study = Study(study_instance_uid="1.2.3", state=StudyState.settled, settle_at=now)
        session.add(study)
        session.flush()
        instance = Instance(
            sop_instance_uid="1.2.3.4",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
            study_instance_uid="1.2.3",
            series_instance_uid="1.2.3.5",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            path="x",
            size_bytes=1,
            calling_aet="T",
            state=InstanceState.stored,
            study_id=study.id,
        )
        session.add(instance)
        session.flush()
        job = Job(study_id=study.id, instance_id=instance.id, version=1, state=JobState.done)
        session.add(job)
        session.flush()
        row = Output.pending(
            job_id=job.id,
            kind="text_sr",
            destination="PACS@pacs:104",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.88.33",
            sop_instance_uid="2.25.1",
            path="y",
            now=now,
        )
        row.state = OutputState.in_flight
        row.updated_at = now - timedelta(seconds=claimed_seconds_ago)
        row.next_try_at = now + timedelta(seconds=300)  # the claim's lease
        session.add(row)
        session.commit()
        return row.id


def scheduler(node: Node, dispatcher: Dispatcher) -> Scheduler:
    return Scheduler(node.settings, node.sessions, node.readers, dispatcher)


def row_of(node: Node, output_id: int) -> Output:
    with node.sessions() as session:
        return session.scalars(select(Output).where(Output.id == output_id)).one()


def test_an_output_whose_send_message_was_lost_is_due_again_long_before_its_lease_ends(
    node: Node, dispatcher: Dispatcher, redis
) -> None:
    output_id = claimed_output(node, GRACE + 5)
    scheduler(node, dispatcher).reconcile()
    row = row_of(node, output_id)
    assert row.state == OutputState.pending and row.last_status == "message lost"
    assert row.next_try_at <= utcnow() and row.attempts == 0, "not a try: nothing was sent"


def test_an_output_being_sent_by_a_live_worker_keeps_its_claim(
    node: Node, dispatcher: Dispatcher, redis
) -> None:
    output_id = claimed_output(node, GRACE + 5)
    beat = tracking.Heartbeat(redis, "send-1@host", ["send"]).start()
    beat.hold([tracking.output_key(output_id)])  # a slow PACS, still answering
    scheduler(node, dispatcher).reconcile()
    assert row_of(node, output_id).state == OutputState.in_flight
    beat.stop()


def test_an_output_claimed_just_now_is_given_its_grace_period(
    node: Node, dispatcher: Dispatcher, redis
) -> None:
    output_id = claimed_output(node, 2)
    scheduler(node, dispatcher).reconcile()
    assert row_of(node, output_id).state == OutputState.in_flight
