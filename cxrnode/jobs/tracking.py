"""Which work is where: messages waiting in a queue, work held by a live worker, and the rest.

The database says what state each job and each outgoing object is in; the broker only carries
messages, and may lose them (a worker killed with its prefetched messages, Redis restarted
empty). To notice a lost message in about a minute without re-running work that is merely
slow, the node keeps two small records in the broker's Redis. Both name work by a *key*:
a job's id (``"42"``) for the job's messages, ``"out:<id>"`` for each outgoing object a send
message carries.

- **waiting**: a hash ``cxrnode:waiting`` of key → (stage, when). The node writes the entries
  just before it publishes a task message (which names its keys in a header); the worker that
  *receives* the message removes them (Celery's ``task_received`` signal, so prefetched
  messages count as held).
- **held**: every worker process publishes a heartbeat ``cxrnode:worker:<name>`` every
  :data:`HEARTBEAT_SECONDS`, expiring after :data:`HEARTBEAT_TTL`, naming its queues, its
  state (e.g. which model it has loaded) and the keys it holds (received, not yet finished).

Work in flight is then either waiting, or held by a worker whose heartbeat is alive, or lost.
A waiting mark older than the grace period is checked against the broker itself
(:func:`verify_waiting`): a worker killed in the instant between taking a message and
reporting it leaves a mark whose message is in no queue, or only in kombu's unacknowledged
set with no live worker holding its job.
A worker killed with ``kill -9`` stops heartbeating; its key expires after
:data:`HEARTBEAT_TTL` seconds and the reconciler re-sends its jobs. A worker on the node's
own machine (same host name and PID namespace) is known dead sooner: when its process is
gone, :func:`live_workers` drops its heartbeat at once, so its work is re-sent at the next
reconcile instead of after the TTL. A Redis restarted empty
loses both records along with the messages, so everything in flight is re-sent once (the
job state machine makes a late duplicate harmless). A slow batch keeps its worker
heartbeating, so it is left alone; only the hard ``JOB_DEADLINE_SECONDS`` bounds it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

WAITING_KEY = "cxrnode:waiting"
WORKER_PREFIX = "cxrnode:worker:"
#: Seconds between two heartbeats of a worker.
HEARTBEAT_SECONDS = 10.0
#: A worker whose heartbeat is older than this is gone (three missed beats).
HEARTBEAT_TTL = 30
#: A job must have been in its state this long before the reconciler may call its message
#: lost: the moment between committing a state and marking its message waiting.
LOST_GRACE_SECONDS = 10


def pid_namespace() -> str:
    """This process's PID namespace ("" where there is no /proc): two processes with the
    same host name and namespace see each other's PIDs."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def process_gone(pid: int) -> bool:
    """``pid`` has exited (no such process, or a zombie its parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[-1].split()
    except FileNotFoundError:
        # gone, or hidden from this user (/proc mounted with hidepid): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # EPERM: it exists, under another user
            pass
        return False
    except OSError:
        return False
    return bool(fields) and fields[0] in (b"Z", b"X")


@dataclass(frozen=True)
class WorkerInfo:
    """One live worker process, as its last heartbeat describes it."""

    name: str
    queues: tuple[str, ...]
    host: str
    pid: int
    held: frozenset[str] = frozenset()  # keys: job ids ("42") and outputs ("out:7")
    state: dict[str, Any] = field(default_factory=dict)  # e.g. {"model": "loaded", ...}
    seen_at: float = 0.0  # time.time() of the heartbeat
    pidns: str = ""  # the worker's PID namespace (pid_namespace)

    def is_local(self, host: str, pidns: str) -> bool:
        """Runs where ``host`` and ``pidns`` say, so its PID can be looked up here."""
        return bool(self.pidns) and self.host == host and self.pidns == pidns

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "queues": list(self.queues),
                "host": self.host,
                "pid": self.pid,
                "held": sorted(self.held),
                "state": self.state,
                "seen_at": self.seen_at,
                "pidns": self.pidns,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> WorkerInfo:
        data = json.loads(raw)
        return cls(
            name=str(data["name"]),
            queues=tuple(data.get("queues") or ()),
            host=str(data.get("host", "")),
            pid=int(data.get("pid", 0)),
            held=frozenset(str(key) for key in data.get("held") or ()),
            state=dict(data.get("state") or {}),
            seen_at=float(data.get("seen_at", 0.0)),
            pidns=str(data.get("pidns") or ""),
        )


# ------------------------------------------------------------------------------ node side


def job_key(job_id: int) -> str:
    return str(job_id)


def output_key(output_id: int) -> str:
    return f"out:{output_id}"


def job_ids(keys: Iterable[str]) -> set[int]:
    """The job ids among ``keys``."""
    return {int(key) for key in keys if key.isdigit()}


def output_ids(keys: Iterable[str]) -> set[int]:
    """The output ids among ``keys``."""
    return {int(key[4:]) for key in keys if key.startswith("out:") and key[4:].isdigit()}


def mark_waiting(client: Any, keys: Iterable[str], stage: str) -> None:
    """Record that a message for ``keys`` is about to be published (call before sending)."""
    now = time.time()
    mapping = {key: json.dumps([stage, now]) for key in keys}
    if mapping:
        client.hset(WAITING_KEY, mapping=mapping)


#: The message header that names a task message's keys (searchable in the raw message).
KEYS_HEADER = "cxrnode_keys"
_KEYS_IN_MESSAGE = re.compile(rb'"cxrnode_keys":\s*\[([^\]]*)\]')
_KEY = re.compile(rb'"([^"]+)"')
# kombu's Redis transport: a queue's messages are in the list <queue> (and <queue>\x06\x16<n>
# for priorities 3, 6, 9); messages handed to a consumer and not yet acknowledged are in the
# hash "unacked" (delivery tag -> [message, exchange, routing key]) with their hand-out time
# in the sorted set "unacked_index".
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")
UNACKED, UNACKED_INDEX = "unacked", "unacked_index"


def _keys_in(raw: bytes | None) -> list[str]:
    match = _KEYS_IN_MESSAGE.search(raw or b"")
    return [key.decode() for key in _KEY.findall(match.group(1))] if match else []


def verify_waiting(
    client: Any,
    marks: dict[str, tuple[str, float]],
    held: set[str],
    queues: dict[str, str],
    grace_seconds: float,
    now: float | None = None,
) -> tuple[dict[str, tuple[str, float]], dict[str, list[bytes]]]:
    """Keep only the waiting marks whose message the broker really has.

    Marks younger than ``grace_seconds``, and marks of held keys, are kept as they are. For
    older ones the queue of their stage (``queues``: stage -> queue, as
    :data:`cxrnode.jobs.messages.STAGE_QUEUES`), every node host's copy of it
    (``<queue>.<host>``, :func:`cxrnode.jobs.messages.host_queue`) and kombu's
    unacknowledged set are searched for a message naming the key. Returns the marks still
    waiting, and the delivery tags of unacknowledged messages whose keys no live worker holds
    (orphans of a dead worker: the caller re-sends the work and may drop these).
    """
    now = time.time() if now is None else now
    old = {
        key: mark
        for key, mark in marks.items()
        if now - mark[1] > grace_seconds and key not in held
    }
    if not old:
        return marks, {}
    queued: set[str] = set()
    for queue in {queues.get(stage, stage) for stage, _ in old.values()}:
        lists = [queue + suffix for suffix in _PRIORITY_SUFFIXES]
        lists += host_copies(client, queue)
        for name in lists:
            for raw in client.lrange(name, 0, -1):
                queued.update(_keys_in(raw))
    orphans: dict[str, list[bytes]] = {}
    stale_tags = client.zrangebyscore(UNACKED_INDEX, "-inf", now - grace_seconds)
    if stale_tags:
        for tag, raw in zip(stale_tags, client.hmget(UNACKED, stale_tags), strict=True):
            for key in _keys_in(raw):
                if key not in held:
                    orphans.setdefault(key, []).append(tag)
    kept = {key: mark for key, mark in marks.items() if key not in old or key in queued}
    return kept, orphans


def host_copies(client: Any, queue: str) -> list[str]:
    """The broker's lists of every node host's copy of ``queue`` (``prepare.node-a``, ...;
    :func:`cxrnode.jobs.messages.host_queue`), with their priority lists."""
    return list(client.scan_iter(match=f"{queue}.*", count=100))


def forget(client: Any, keys: Iterable[str], orphan_tags: Iterable[bytes] = ()) -> None:
    """Drop the waiting marks of ``keys`` and the given unacknowledged messages (their work
    was re-sent, so kombu must not hand them out again after its visibility timeout)."""
    keys = list(keys)
    tags = list(dict.fromkeys(orphan_tags))
    with client.pipeline(transaction=False) as pipe:
        if keys:
            pipe.hdel(WAITING_KEY, *keys)
        if tags:
            pipe.zrem(UNACKED_INDEX, *tags)
            pipe.hdel(UNACKED, *tags)
        pipe.execute()


def waiting(client: Any) -> dict[str, tuple[str, float]]:
    """Keys whose message is in a queue: key → (stage, when it was published)."""
    out: dict[str, tuple[str, float]] = {}
    for key, value in client.hgetall(WAITING_KEY).items():
        stage, when = json.loads(value)
        out[key.decode() if isinstance(key, bytes) else str(key)] = (str(stage), float(when))
    return out


def live_workers(client: Any) -> list[WorkerInfo]:
    """Every worker whose heartbeat has not expired, less those on this machine whose
    process is gone (their heartbeat is deleted: kill -9, an OOM kill, the node killed)."""
    keys = list(client.scan_iter(match=WORKER_PREFIX + "*", count=100))
    if not keys:
        return []
    host, pidns = socket.gethostname(), pid_namespace()
    workers, dead = [], []
    for key, raw in zip(keys, client.mget(keys), strict=True):
        if raw is None:  # expired between SCAN and MGET
            continue
        try:
            worker = WorkerInfo.from_json(raw)
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring an unreadable worker heartbeat")
            continue
        if worker.is_local(host, pidns) and process_gone(worker.pid):
            dead.append((key, worker))
        else:
            workers.append(worker)
    for key, worker in dead:
        log.warning(
            "worker %s (pid %d) is gone; the work it held is due again", worker.name, worker.pid
        )
        client.delete(key)
    return sorted(workers, key=lambda w: w.name)


def held_keys(workers: Iterable[WorkerInfo]) -> set[str]:
    held: set[str] = set()
    for worker in workers:
        held |= worker.held
    return held


# ------------------------------------------------------------------------------ worker side


class Heartbeat:
    """The heartbeat of one worker process, and the set of jobs it holds.

    ``hold``/``release`` are called from Celery signal handlers (any thread); each change is
    published at once, and a background thread re-publishes every :data:`HEARTBEAT_SECONDS`.
    """

    def __init__(self, client: Any, name: str, queues: Iterable[str]) -> None:
        self.client = client
        self.name = name
        self.queues = tuple(queues)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.pidns = pid_namespace()
        self.state: dict[str, Any] = {}
        self._held: dict[str, int] = {}  # key -> how many of its messages this worker holds
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    @property
    def key(self) -> str:
        return WORKER_PREFIX + self.name

    def start(self) -> Heartbeat:
        self.publish()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):  # the broker may be gone already
            self.client.delete(self.key)

    def hold(self, keys: Iterable[str]) -> None:
        """This worker received a message for ``keys``: they are no longer waiting."""
        keys = list(keys)
        if not keys:
            return
        with self._lock:
            for key in keys:
                self._held[key] = self._held.get(key, 0) + 1
        self.publish()
        try:
            self.client.hdel(WAITING_KEY, *keys)
        except Exception:
            log.warning("cannot clear the waiting marks %s (broker unreachable)", keys)

    def release(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        if not keys:
            return
        with self._lock:
            for key in keys:
                count = self._held.get(key, 0) - 1
                if count > 0:
                    self._held[key] = count
                else:
                    self._held.pop(key, None)
        self.publish()

    def set_state(self, **state: Any) -> None:
        with self._lock:
            self.state.update(state)
        self.publish()

    def info(self) -> WorkerInfo:
        with self._lock:
            return WorkerInfo(
                name=self.name,
                queues=self.queues,
                host=self.host,
                pid=self.pid,
                held=frozenset(self._held),
                state=dict(self.state),
                seen_at=time.time(),
                pidns=self.pidns,
            )

    def publish(self) -> None:
        try:
            self.client.set(self.key, self.info().to_json(), ex=HEARTBEAT_TTL)
        except Exception:  # a broker outage must not break the task; the next beat retries
            log.debug("heartbeat not published", exc_info=True)

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            self.publish()
