"""The node's scheduler: settles studies, hands new jobs and due outputs to the broker, and
re-sends work the broker lost. It sleeps until something is due.

Nothing here polls on a fixed tick. Each pass computes the next moment something becomes
due (a study's quiet period ends, an output's retry or claim runs out, the next
reconciliation) and then blocks on the broker's wake-up channel until that moment or until
someone publishes there: the listener after each readable arrival, a send task after it
scheduled a retry. An idle node therefore wakes once per reconcile interval, runs two
indexed read-only queries, and sleeps again.

Settling and reconciling are singletons: where several nodes share a PostgreSQL database only
the holder of the lease (:mod:`cxrnode.jobs.lease`) runs them; the others send due outputs
and look for the lease every few seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy import func, select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import sessionmaker

from cxrnode import notify
from cxrnode.db import Study, StudyState, utcnow
from cxrnode.ingest.header import header_dataset, study_context
from cxrnode.jobs import states, tracking
from cxrnode.jobs.broker import WAKE_CHANNEL
from cxrnode.jobs.dispatch import Dispatcher
from cxrnode.jobs.grouping import next_settle_at, settle_due_studies
from cxrnode.jobs.lease import CHECK_SECONDS as LEASE_CHECK_SECONDS
from cxrnode.jobs.lease import Lease
from cxrnode.jobs.messages import STAGE_QUEUES, InferReport, infer_message
from cxrnode.outputs import outbox
from cxrnode.prepare.images import load_model_input
from cxrnode.settings import Settings

log = logging.getLogger(__name__)

#: The longest the scheduler blocks without looking at its stop flag.
STOP_CHECK_SECONDS = 2.0
#: After a failed pass, how long the scheduler waits for a stop before calling it a failure.
STOP_GRACE_SECONDS = 1.0
#: Failures that mean the broker or the database is away for a moment (a restart, a
#: failover, a partition): logged in one line, not with a traceback.
OUTAGES = (RedisConnectionError, RedisTimeoutError, OperationalError, InterfaceError)


class Scheduler:
    """One pass (:meth:`run_once`) and the loop around it (:meth:`run`)."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker,
        readers: sessionmaker,
        dispatcher: Dispatcher | None = None,
        lease: Lease | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.readers = readers
        self.dispatch = dispatcher or Dispatcher(settings)
        self.lease = lease or Lease(settings.effective_database_url)
        self._next_reconcile = 0.0
        self._started = False
        self._held_since: datetime | None = None  # receive first: when settling began to wait
        self._hold_until: datetime | None = None

    # ------------------------------------------------------------------------------ one pass
    def run_once(self, now_monotonic: float | None = None) -> float:
        """Do everything due now; return the seconds until the next thing is due."""
        now_monotonic = time.monotonic() if now_monotonic is None else now_monotonic
        leads = self.lease.held()  # settling and reconciling: one node at a time
        if leads:
            self.settle_studies()
            if not self._started:
                self.queue_new_jobs()  # jobs a previous run made and did not hand out
                self._started = True
        self.send_due_outputs()
        self.send_due_notifications()
        if leads and now_monotonic >= self._next_reconcile:
            self.reconcile()
            self._next_reconcile = now_monotonic + self.settings.reconcile_interval
        wait = self.seconds_until_due(now_monotonic)
        return wait if leads else min(wait, LEASE_CHECK_SECONDS)

    def settle_studies(self) -> None:
        """Settle the studies whose quiet period is over and hand their new jobs to the
        broker: one transaction makes and queues them, then the messages are published."""
        with self.readers() as session:
            due, last = session.execute(
                select(func.min(Study.settle_at), func.max(Study.settle_at)).where(
                    Study.state == StudyState.receiving
                )
            ).one()
        now = utcnow()
        if due is None or due > now:
            return  # read-only check first: no write lock when nothing is due
        if self._holding(now, last):
            return
        with self.sessions() as session:
            settle_due_studies(session, commit=False)
            taken = states.take_pending(session)  # commits the new jobs as queued
        for work in taken:
            self.dispatch.prepare_image(work.job_id, work.version, work.node_host)

    def _holding(self, now: datetime, last_settle_at: datetime | None) -> bool:
        """Receive first: whether settling waits because instances are still arriving.

        A study's ``settle_at`` is its last arrival plus SETTLE_SECONDS, so the latest one
        tells when the node last received anything. Settling (and the prepare, inference
        and outputs work it starts) waits until RECEIVE_HOLD_SECONDS passed without an
        arrival, so a burst is acknowledged at the speed of the receive path; never longer
        than RECEIVE_HOLD_MAX_SECONDS from the first wait, so a steady stream is served.
        """
        quiet = timedelta(seconds=self.settings.receive_hold_seconds)
        self._hold_until = None
        if not quiet or last_settle_at is None:
            self._held_since = None
            return False
        last_arrival = last_settle_at - timedelta(seconds=self.settings.settle_seconds)
        if now >= last_arrival + quiet:
            self._held_since = None
            return False
        self._held_since = self._held_since or now
        limit = self._held_since + timedelta(seconds=self.settings.receive_hold_max_seconds)
        if now >= limit:
            return False  # the stream goes on: serve it (the hold starts again once quiet)
        self._hold_until = min(last_arrival + quiet, limit)
        return True

    def queue_new_jobs(self) -> None:
        with self.sessions() as session:
            for work in states.take_pending(session):
                self.dispatch.prepare_image(work.job_id, work.version, work.node_host)

    def send_due_outputs(self) -> None:
        """Hand outputs whose next try is due to the send queue, one task per study and
        destination; the claim moves their next try ahead by a lease, so they are handed
        out once."""
        with self.readers() as session:
            due = outbox.next_due(session)
        if due is None or due > utcnow():
            return
        with self.sessions() as session:
            batches = outbox.due_outputs(session, lease_seconds=outbox.lease_seconds(self.settings))
        self.dispatch.send_outputs(batches)

    def send_due_notifications(self) -> None:
        """Send urgent-draft announcements that are due (new ones the outputs task did not
        send, and retries)."""
        with self.readers() as session:
            due = notify.next_due(session)
        if due is None or due > utcnow():
            return
        notify.send_due(self.sessions, self.settings)

    def reconcile(self) -> None:
        """The database is the truth: re-send jobs, and give back outputs claimed for sending,
        whose message is neither waiting in a queue nor held by a live worker (see
        :mod:`cxrnode.jobs.tracking`)."""
        redis = self.dispatch.redis
        held = tracking.held_keys(tracking.live_workers(redis))
        waiting, orphans = tracking.verify_waiting(
            redis, tracking.waiting(redis), held, STAGE_QUEUES, tracking.HEARTBEAT_TTL
        )
        log.debug("reconcile: waiting %s, held %s", sorted(waiting), sorted(held))
        tracked = set(waiting) | held
        with self.sessions() as session:
            resend, failed = states.find_lost(
                session,
                waiting={int(k): v for k, v in waiting.items() if k.isdigit()},
                held=tracking.job_ids(held),
                grace_seconds=tracking.LOST_GRACE_SECONDS,
                deadline_seconds=self.settings.job_deadline_seconds,
            )
        now = utcnow()
        with self.readers() as session:
            claimed = outbox.claimed_before(
                session, now - timedelta(seconds=tracking.HEARTBEAT_TTL)
            )
        lost_sends = [i for i in claimed if tracking.output_key(i) not in tracked]
        if lost_sends:
            with self.sessions() as session:
                released = outbox.release_claims(session, lost_sends, now)
            log.warning("%d outputs' send message was lost; they are due again", released)
        lost_keys = [tracking.job_key(item.job_id) for item in resend]
        lost_keys += [tracking.job_key(job_id) for job_id in failed]
        lost_keys += [tracking.output_key(i) for i in lost_sends]
        tracking.forget(
            redis, lost_keys, [tag for key in lost_keys for tag in orphans.get(key, [])]
        )
        for job_id in failed:
            log.error("job %d failed: its work was lost %d times", job_id, states.MAX_ATTEMPTS)
        for item in resend:
            log.warning(
                "job %d: its %s message was lost; sending it again", item.job_id, item.task.__name__
            )
            self.resend(item)

    def resend(self, item: states.Resend) -> None:
        """Publish a lost job's message again, to the queues of the job's node host (this
        node may be another one: the singletons run on the lease holder)."""
        host = item.node_host or self.settings.node_host
        if item.task is not InferReport:
            self.dispatch.publish(item.task(item.job_id, item.version), node_host=host)
            return
        with self.readers() as session:
            work = states.prepare_work(session, item.job_id, item.version)
        if work is None:
            return
        image = None
        if host == self.settings.node_host:  # the kept input is on this host's disk
            image = load_model_input(self.settings, work.study_instance_uid, work.sop_instance_uid)
        if image is None:  # the kept input is gone, or on the other host: prepare again there
            self.dispatch.prepare_image(item.job_id, item.version, host)
            return
        context = study_context(header_dataset(work.header))
        self.dispatch.publish(
            infer_message(self.settings, item.job_id, item.version, image, context, host)
        )

    def seconds_until_due(self, now_monotonic: float) -> float:
        with self.readers() as session:
            moments = [next_settle_at(session), outbox.next_due(session), notify.next_due(session)]
        wall_now = utcnow()
        until = self._next_reconcile - now_monotonic
        if self._hold_until is not None:  # settling waits for the burst: look again then
            moments[0] = self._hold_until
        for moment in moments:
            if moment is not None:
                until = min(until, _seconds_between(wall_now, moment))
        return max(0.0, until)

    # ------------------------------------------------------------------------------ the loop
    def run(self, stop: threading.Event) -> None:
        """Run passes until ``stop`` is set, sleeping on the wake-up channel in between."""
        pubsub: Any = None
        while not stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self.dispatch.redis.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(WAKE_CHANNEL)
                wait = self.run_once()
                self._sleep(pubsub, wait, stop)
            except Exception as exc:  # the scheduler must outlive a bad moment of the DB or broker
                pubsub = _close(pubsub)
                # A stop by signal can reach the broker or database first (systemd's SIGTERM to
                # the whole unit, Ctrl-C to the process group): the failure is then the stop
                # itself, not worth a traceback.
                if stop.wait(STOP_GRACE_SECONDS):
                    log.info("scheduler stopped (%s while stopping)", type(exc).__name__)
                    break
                if isinstance(exc, OUTAGES):  # a broker or database failover: one line
                    log.warning(
                        "scheduler pass failed: %s (%s); retrying in a few seconds",
                        "the broker does not answer"
                        if isinstance(exc, RedisError)
                        else "the database does not answer",
                        type(exc).__name__,
                    )
                else:
                    log.exception("scheduler pass failed; retrying in a few seconds")
                stop.wait(3.0)
        _close(pubsub)

    def _sleep(self, pubsub: Any, seconds: float, stop: threading.Event) -> None:
        deadline = time.monotonic() + seconds
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            message = pubsub.get_message(timeout=min(remaining, STOP_CHECK_SECONDS))
            if message is not None:
                # drain a burst of wake-ups (one per arrival) into a single pass
                while pubsub.get_message(timeout=0.0) is not None:
                    pass
                return


def _seconds_between(now: datetime, moment: datetime) -> float:
    return (moment - now).total_seconds()


def _close(pubsub: Any) -> None:
    if pubsub is not None:
        try:
            pubsub.close()
        except Exception:
            log.debug("closing the wake-up subscription failed", exc_info=True)
    return None
