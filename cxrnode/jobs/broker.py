"""The broker: one Redis in both modes, and the Celery configuration shared by node and workers.

Queues (each message class in :mod:`cxrnode.jobs.messages` names its task and queue; the
node publishes messages and never imports the task code in ``worker/tasks.py``):

==========  =================  ==========================================================
queue       message            what its step does
==========  =================  ==========================================================
prepare     ``PrepareImage``   DICOM pixels → display image (kept) + 512² model input
infer       ``InferReport``    the model (GPU side: needs only the broker)
outputs     ``RecordResult``   record the answer, build and record SR/SC/...
            ``RecordProblem``  a DB-less worker reports waiting_model / failed
            ``BuildOutputs``   rebuild the outputs of a recorded result (recovery)
send        ``SendOutputs``    deliver one study's outputs to one destination
==========  =================  ==========================================================

``prepare``, ``outputs`` and ``send`` read or write a node host's DATA_DIR: each node host has
its own copy of them (``prepare.<NODE_HOST>``, ...; :func:`cxrnode.jobs.messages.host_queue`),
which its node-side worker consumes with the plain ones. ``infer`` is one queue for all.

**Embedded mode** (no ``BROKER_URL``): ``cxrnode serve`` starts and owns a ``redis-server``
child listening only on a unix socket in DATA_DIR (no TCP port), with an append-only file in
DATA_DIR/broker, and restarts it if it dies. **Distributed mode**: ``BROKER_URL=redis://…``.
Both run the same kombu transport, whose consumers block in ``BRPOP`` and wake when work
arrives: no polling. The database stays the truth; the broker is transport (a reconciler
re-sends what the broker loses, see :mod:`cxrnode.jobs.tracking`).

**High availability**: ``BROKER_URL=sentinel://h1:26379;sentinel://h2:26379;sentinel://h3:26379``
with ``BROKER_SENTINEL_MASTER=<name>`` (Celery's own form): Celery's transport and every
client below ask the Sentinels for the master and follow a failover (docs/operations.md).

Besides Celery's queues the node keeps three small things in the same Redis: worker
heartbeats and held jobs (:mod:`cxrnode.jobs.tracking`) and the scheduler's wake-up channel
(:data:`WAKE_CHANNEL`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import redis

from cxrnode.jobs import messages, tracking
from cxrnode.settings import Settings

if TYPE_CHECKING:  # Celery itself is imported by what makes an app: listeners never do
    from celery import Celery

log = logging.getLogger(__name__)

QUEUES = ("prepare", "infer", "outputs", "send")

#: The queue of each task (declared with its message class).
TASK_QUEUES = messages.TASK_QUEUES

#: Pub/sub channel on which anything that creates due work wakes the scheduler.
WAKE_CHANNEL = "cxrnode:wake"

#: Above the longest task (a batch of 64 three-turn studies on a slow GPU): only after this
#: does Redis hand an unacknowledged message out again. Lost work is found much sooner by the
#: reconciler (heartbeats and held jobs), so this is a last resort.
VISIBILITY_TIMEOUT = 2 * 3600

#: Seconds an idle consumer's BRPOP blocks before it is re-issued (kombu's default is 1):
#: work still wakes it at once; this bounds idle wake-ups, and a stopping worker waits for
#: the outstanding BRPOP's answer when it closes its channel, so it also bounds shutdown.
BRPOP_TIMEOUT = 2

_UNIX_PATH_MAX = 100  # sun_path is 108 bytes on Linux; leave room


# ----------------------------------------------------------------------------- addresses


def socket_path(settings: Settings) -> Path:
    """The embedded broker's unix socket: in DATA_DIR/run, or in the temp dir when that path
    is too long for a unix socket (the same for every process of one DATA_DIR)."""
    path = settings.data_dir / "run" / "redis.sock"
    if len(str(path)) <= _UNIX_PATH_MAX:
        return path
    digest = hashlib.sha256(str(settings.data_dir.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"cxrnode-{digest}" / "redis.sock"


def broker_url(settings: Settings) -> str:
    """The Celery (kombu) URL: BROKER_URL, or the embedded Redis's socket."""
    if settings.broker_url:
        return settings.broker_url
    return f"redis+socket://{socket_path(settings)}"


def is_embedded(settings: Settings) -> bool:
    return not settings.broker_url


SENTINEL_SCHEME = "sentinel://"


def is_sentinel(settings: Settings) -> bool:
    """BROKER_URL names Redis Sentinels (``sentinel://h1:26379;sentinel://h2:26379;...``)."""
    return bool(settings.broker_url) and str(settings.broker_url).startswith(SENTINEL_SCHEME)


def sentinel_addresses(url: str) -> tuple[list[tuple[str, int]], str | None, str | None, int]:
    """The Sentinels of a ``sentinel://[:password@]host:port;sentinel://...[/db]`` URL (Celery's
    and kombu's own form), the master's username and password (taken from the first entry
    that has one, as kombu does) and the database number (the last path that names one).

    Raises
    ------
    ValueError
        When an entry is not ``sentinel://host:port``.
    """
    sentinels: list[tuple[str, int]] = []
    username = password = None
    db = 0
    for entry in (part.strip() for part in url.split(";")):
        if not entry:
            continue
        parts = urlsplit(entry)
        if parts.scheme != "sentinel" or not parts.hostname:
            raise ValueError(
                f"BROKER_URL entry {entry!r} is not sentinel://host:port; Sentinels are listed "
                "as sentinel://h1:26379;sentinel://h2:26379;sentinel://h3:26379"
            )
        sentinels.append((parts.hostname, parts.port or 26379))
        if parts.password and password is None:
            username, password = parts.username or None, unquote(parts.password)
        if parts.path.strip("/").isdigit():
            db = int(parts.path.strip("/"))
    return sentinels, username, password, db


def _sentinel_master(settings: Settings) -> str:
    if not settings.broker_sentinel_master:
        raise ValueError(
            "BROKER_URL lists Redis Sentinels but CXRNODE_BROKER_SENTINEL_MASTER is not set: "
            "set it to the master's name in the Sentinels' configuration (sentinel monitor NAME)"
        )
    return settings.broker_sentinel_master


def redis_client(settings: Settings, *, timeout: float = 5.0) -> Any:
    """A redis-py client for the broker's Redis (heartbeats, wake-ups, queue depths).

    With Sentinels it is a client of the current master: on a connection error its pool asks
    the Sentinels again, so it follows a failover by itself.
    """
    url = broker_url(settings)
    if url.startswith(SENTINEL_SCHEME):
        from redis.sentinel import Sentinel

        sentinels, username, password, db = sentinel_addresses(url)
        options = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        manager = Sentinel(sentinels, sentinel_kwargs=dict(options), **options)
        return manager.master_for(
            _sentinel_master(settings), db=db, username=username, password=password, **options
        )
    if url.startswith("redis+socket://"):
        return redis.Redis(
            unix_socket_path=url.removeprefix("redis+socket://"), socket_timeout=timeout
        )
    if not url.startswith(("redis://", "rediss://")):
        raise ValueError(
            f"BROKER_URL {url!r} is not a Redis URL; cxrnode's broker is Redis "
            "(redis://host:6379/0, rediss://... or sentinel://h1:26379;sentinel://h2:26379 with "
            "BROKER_SENTINEL_MASTER), or leave it unset for the embedded one"
        )
    parts = urlsplit(url)
    if parts.password:
        # redis-py reads the password from the URL already; unquote keeps %-escapes working
        url = url.replace(parts.password, unquote(parts.password), 1)
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)


# ----------------------------------------------------------------------------- Celery


def celery_app(settings: Settings) -> Celery:
    """A Celery app configured for this node's broker; tasks are registered by ``worker``."""
    from celery import Celery

    app = Celery("cxrnode", broker=broker_url(settings), set_as_current=False)
    transport = {"visibility_timeout": VISIBILITY_TIMEOUT, "polling_interval": BRPOP_TIMEOUT}
    if is_sentinel(settings):
        transport["master_name"] = _sentinel_master(settings)
    app.conf.update(
        task_routes={name: {"queue": queue} for name, queue in TASK_QUEUES.items()},
        task_default_queue="outputs",
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport,
        worker_send_task_events=True,  # Flower
        task_send_sent_event=True,
        enable_utc=True,
    )
    return app


def wake_scheduler(client: Any) -> None:
    """Tell the scheduler there is new due work (a settle deadline, an output to send).
    Never raises: the scheduler also wakes on its own at least every reconcile interval."""
    with contextlib.suppress(Exception):
        client.publish(WAKE_CHANNEL, b"1")


def queue_depths(settings: Settings) -> dict[str, int | None]:
    """Messages waiting in each queue, every node host's copy of it included (None when the
    broker cannot be asked)."""
    depths: dict[str, int | None] = dict.fromkeys(QUEUES)
    try:
        client = redis_client(settings, timeout=2)
        lists = [(queue, queue) for queue in QUEUES]
        for queue in messages.HOST_QUEUES:  # each node host's copy counts in its queue
            lists += [(queue, name) for name in tracking.host_copies(client, queue)]
        with client.pipeline(transaction=False) as pipe:
            for _, name in lists:
                pipe.llen(name)
            depths.update(dict.fromkeys(QUEUES, 0))
            for (queue, _), depth in zip(lists, pipe.execute(), strict=True):
                depths[queue] = (depths[queue] or 0) + int(depth)
        client.close()
    except Exception:  # status must answer even when the broker is down
        pass
    return depths


# ----------------------------------------------------------------------------- embedded


def redis_server_binary() -> str:
    """Path of ``redis-server``, or a clear error saying how to get one."""
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )
    if not found:
        raise RuntimeError(
            "the embedded broker needs redis-server (Debian package redis-server; scripts/setup "
            "installs it), or set CXRNODE_BROKER_URL=redis://host:6379/0 to use a running Redis"
        )
    return found


class EmbeddedBroker:
    """The ``redis-server`` child of ``cxrnode serve`` in embedded mode.

    It listens only on a unix socket (mode 0700 directory, so other users of the machine
    cannot reach it), keeps an append-only file in DATA_DIR/broker (``appendfsync everysec``:
    the database is the truth, so a lost second of messages is re-sent by the reconciler), and
    dies with its parent.
    """

    def __init__(self, settings: Settings, preexec_fn: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.preexec_fn = preexec_fn
        self.socket = socket_path(settings)
        self.directory = settings.data_dir / "broker"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.socket.parent, 0o700)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()  # left by a killed server
        log_file = self.directory / "redis.log"
        args = [
            redis_server_binary(),
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(log_file),
            "--databases", "1",
            "--hz", "1",  # background tasks once a second, not ten times: an idle node is quiet
            "--dynamic-hz", "no",
        ]  # fmt: skip
        # Its own session: Ctrl-C or a SIGTERM to the node's process group must not stop the
        # broker before the workers have acknowledged through it; the supervisor stops it last.
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=self.preexec_fn,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the embedded broker (redis-server) exited with {self.proc.returncode}; "
                    f"see {log_file}"
                )
            if self.answers():
                return self
            time.sleep(0.05)
        raise RuntimeError(
            f"the embedded broker did not answer on {self.socket} in {timeout:.0f} s"
        )

    def answers(self) -> bool:
        try:
            client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except (redis.RedisError, OSError):
            return False

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def exitcode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def terminate(self) -> None:
        if self.is_alive():
            assert self.proc is not None
            self.proc.terminate()

    def kill(self) -> None:
        if self.is_alive():
            assert self.proc is not None
            self.proc.kill()

    def join(self, timeout: float) -> None:
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)


class Waker:
    """Wakes the scheduler from a busy process without ever making the caller wait.

    :meth:`poke` only sets a flag; a daemon thread publishes on :data:`WAKE_CHANNEL` (one
    message for any number of pokes since the last). A C-STORE answer must never wait for
    the broker, even when the broker is down.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._event = threading.Event()
        self._thread = threading.Thread(target=self._run, name="waker", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        self._event.set()

    def _run(self) -> None:
        client = None
        while True:
            self._event.wait()
            self._event.clear()
            try:
                if client is None:
                    client = redis_client(self.settings, timeout=2)
                client.publish(WAKE_CHANNEL, b"1")
            except Exception:
                client = None  # the broker is down; the scheduler wakes on its own too
                time.sleep(1.0)
