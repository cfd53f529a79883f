"""`cxrnode serve`: the supervisor of one node.

It applies migrations, starts the embedded broker (unless BROKER_URL names one), the DICOM
listener processes (sharing the port), the admin web app (:mod:`cxrnode.web`, on HTTP_PORT),
optionally the Celery workers, prints the start-up summary (:func:`startup_summary`)
and runs the scheduler (:mod:`cxrnode.jobs.scheduler`) in the main thread. Children die with
the supervisor (PR_SET_PDEATHSIG) and say in ``ps`` what they are (:mod:`cxrnode.process`);
the workers run at a lower CPU priority than the listeners (WORKER_NICENESS), so a burst of
images is acknowledged at the speed of the receive path. A watcher thread restarts a child
that exits unexpectedly and says when an inference worker reports its model; a retention
thread removes delivered studies' files after RETENTION_DAYS (:mod:`cxrnode.retention`); the
monitor (final reports over HL7 MLLP when HL7_PORT is set, and the agreement sweep) runs in a
thread of its own, not a process: it is a few database writes a minute. Before any child
starts, the Prometheus multiprocess directory is emptied and named in the environment the
children inherit (:mod:`cxrnode.net.metrics`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from cxrnode.compat.pynetdicom import startup_problem as pynetdicom_problem
from cxrnode.db import make_engine, make_sessionmaker
from cxrnode.db.migrate import upgrade
from cxrnode.ingest.reconcile import reconcile_files
from cxrnode.ingest.storage import clean_tmp
from cxrnode.jobs.broker import EmbeddedBroker, broker_url, is_embedded, redis_client
from cxrnode.jobs.lease import Lease
from cxrnode.jobs.scheduler import Scheduler
from cxrnode.jobs.tracking import WorkerInfo, live_workers
from cxrnode.monitor.service import run_monitor_thread
from cxrnode.net.cap import AssociationCap
from cxrnode.net.listener import run_listener
from cxrnode.net.metrics import prepare_metrics_dir
from cxrnode.outputs.probe import Prober
from cxrnode.process import die_with_parent, set_title, spawn_context, supervised_child
from cxrnode.retention import run_retention
from cxrnode.settings import Settings
from cxrnode.web.exposure import exposure_problem
from cxrnode.web.server import run_web

log = logging.getLogger(__name__)

#: embedded mode: one node-side worker and one inference worker
WORKER_QUEUES = ("prepare,outputs,send", "infer")
#: embedded mode without MODEL: one worker, whose infer tasks find no model and park their
#: jobs in waiting_model (an inference process of its own would do only that, for ~140 MB;
#: a model is named in the settings, so it comes with a restart and its own process then)
WORKER_QUEUES_NO_MODEL = ("prepare,outputs,send,infer",)


def worker_queues(settings: Settings) -> tuple[str, ...]:
    """The workers `serve` starts: one per entry, consuming the queues it names."""
    return WORKER_QUEUES if settings.model else WORKER_QUEUES_NO_MODEL


#: seconds between two looks at the children
WATCH_SECONDS = 2.0
#: seconds the start-up summary waits for the DICOM port to accept connections
LISTEN_WAIT_SECONDS = 120.0
#: seconds between two looks for a model reported by an inference worker's heartbeat
MODEL_WATCH_SECONDS = 15.0
#: Celery prints a multi-line warning when a worker runs as root. The filter (a PYTHONWARNINGS
#: entry matching the start of its message) silences it; `serve` and `worker` say it in one
#: line instead, or not at all with ALLOW_ROOT (:func:`root_note`).
CELERY_ROOT_WARNING_FILTER = "ignore:You're running the worker with superuser privileges"


def prepare_data_dir(settings: Settings) -> None:
    for directory in (
        settings.instances_dir,
        settings.outputs_dir,
        settings.prepared_dir,
        settings.tmp_dir,
    ):
        directory.mkdir(parents=True, exist_ok=True)
    removed = clean_tmp(settings.tmp_dir)
    if removed:
        log.info("removed %d partial files left by an earlier crash", removed)


def running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def root_note(settings: Settings) -> str | None:
    """One line for a process running as root without ALLOW_ROOT; None otherwise."""
    if not running_as_root() or settings.allow_root:
        return None
    return (
        "running as root: better as its own user (docs/operations.md); "
        "CXRNODE_ALLOW_ROOT=true hides this"
    )


#: Set in the environment of the workers `serve` starts: its summary already said the rest.
SUPERVISED_ENV = "_CXRNODE_SUPERVISED"


def worker_environment(
    base: Mapping[str, str] | None = None, *, supervised: bool = False
) -> dict[str, str]:
    """The environment of a worker process: ``base`` (default: ours) with Celery's root
    warning filtered (see :data:`CELERY_ROOT_WARNING_FILTER`)."""
    env = dict(os.environ if base is None else base)
    if supervised:
        env[SUPERVISED_ENV] = "1"
    filters = [f for f in env.get("PYTHONWARNINGS", "").split(",") if f]
    if CELERY_ROOT_WARNING_FILTER not in filters:
        filters.append(CELERY_ROOT_WARNING_FILTER)
    env["PYTHONWARNINGS"] = ",".join(filters)
    return env


class WorkerProcess:
    """A `cxrnode worker` subprocess, with the same interface as multiprocessing's."""

    def __init__(self, queues: str) -> None:
        self.queues = queues
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("cxrnode")), "worker", "--queues", queues],
            preexec_fn=die_with_parent,
            env=worker_environment(supervised=True),
        )

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def exitcode(self) -> int | None:
        return self.proc.poll()

    def terminate(self) -> None:
        self.proc.terminate()

    def kill(self) -> None:
        self.proc.kill()

    def join(self, timeout: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)


class Supervisor:
    """Owns the child processes and the scheduler of a node."""

    def __init__(self, settings: Settings, *, workers: bool = True) -> None:
        self.settings = settings
        self.workers = workers
        self.stop = threading.Event()
        self.context = spawn_context()
        self.monitor: threading.Thread | None = None
        self.children: dict[str, Any] = {}
        self.engine = make_engine(settings.effective_database_url)
        self.reader = make_engine(settings.effective_database_url, read_only=True)
        self.broker: EmbeddedBroker | None = None
        self._models_seen: dict[str, str] = {}  # worker name -> model hash it reported
        self._next_model_watch = 0.0
        # one cap for all listener processes (MAX_ASSOCIATIONS is node-wide)
        self.cap = AssociationCap(
            settings.max_associations, settings.effective_scp_processes, self.context
        )

    def _start_listener(self, index: int) -> None:
        name = f"listener-{index}"
        self.cap.reset(index)  # a dead listener's associations died with it
        process = self.context.Process(
            target=supervised_child,
            args=(run_listener, self.settings, self.cap, index),
            name=name,
            daemon=True,
        )
        process.start()
        self.children[name] = process

    def _start_monitor(self) -> None:
        self.monitor = threading.Thread(
            target=run_monitor_thread, args=(self.settings, self.stop), name="monitor", daemon=True
        )
        self.monitor.start()

    def _start_web(self) -> None:
        process = self.context.Process(
            target=supervised_child, args=(run_web, self.settings), name="web", daemon=True
        )
        process.start()
        self.children["web"] = process

    def _check_web(self) -> None:
        """Refuse to start (exit 2) when the web app may not or cannot listen."""
        settings = self.settings
        problem = exposure_problem(settings)
        if problem is None:
            try:
                family = socket.AF_INET6 if ":" in settings.http_host else socket.AF_INET
                with socket.socket(family, socket.SOCK_STREAM) as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind((settings.http_host, settings.http_port))
            except OSError as exc:
                problem = (
                    f"the admin web app cannot listen on {settings.http_host}:"
                    f"{settings.http_port} ({exc.strerror}); choose another CXRNODE_HTTP_PORT"
                )
        if problem:
            log.error("%s", problem)
            raise SystemExit(2)

    def start(self) -> None:
        self._check_web()
        problem = pynetdicom_problem()  # the listeners cannot run without these internals
        if problem:
            log.error("%s", problem)
            raise SystemExit(2)
        prepare_data_dir(self.settings)
        upgrade(self.engine)
        reconcile_files(self.settings, make_sessionmaker(self.engine))  # before listening
        prepare_metrics_dir(self.settings)  # before any child: they inherit its name
        if is_embedded(self.settings):
            self.broker = EmbeddedBroker(self.settings, preexec_fn=die_with_parent).start()
        processes = self.settings.effective_scp_processes
        for index in range(processes):
            self._start_listener(index)
        self._start_monitor()
        self._start_web()
        if self.workers:
            for queues in worker_queues(self.settings):
                self.children[f"worker-{queues}"] = WorkerProcess(queues)
        log.info(
            "cxrnode %s listening on %s:%d with %d processes; admin web app on http://%s:%d",
            self.settings.ae_title,
            self.settings.dicom_host,
            self.settings.dicom_port,
            processes,
            self.settings.http_host,
            self.settings.http_port,
        )
        threading.Thread(target=self._announce, name="announce", daemon=True).start()

    def _announce(self) -> None:
        """Print the start-up summary once the DICOM port accepts connections (spawning the
        listener processes takes seconds on a busy machine: a newcomer who reads the summary
        and sends at once must not be refused)."""
        host = self.settings.dicom_host
        host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
        deadline = time.monotonic() + LISTEN_WAIT_SECONDS
        listening = False
        while not self.stop.is_set() and time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection((host, self.settings.dicom_port), timeout=1),
            ):
                listening = True
                break
            self.stop.wait(0.2)
        if self.stop.is_set():
            return
        workers = self._live_workers()
        self._note_models(workers or [], announce=False)
        summary = startup_summary(
            self.settings, self.workers, self.settings.effective_scp_processes, workers
        )
        if not listening:
            summary += (
                f"\n  (the DICOM port did not accept a connection within "
                f"{LISTEN_WAIT_SECONDS:.0f} s: see the log above)"
            )
        sys.stdout.write(summary + "\n")
        sys.stdout.flush()

    def _live_workers(self) -> list[WorkerInfo] | None:
        """Workers alive now (None: the broker does not answer)."""
        try:
            client = redis_client(self.settings, timeout=2)
            try:
                return live_workers(client)
            finally:
                client.close()
        except Exception:
            return None

    def _note_models(self, workers: Sequence[WorkerInfo], *, announce: bool = True) -> None:
        """Say once per worker which model it loaded (and again if that changes)."""
        for worker in workers:
            model_hash = worker.state.get("model_hash")
            if not model_hash or self._models_seen.get(worker.name) == model_hash:
                continue
            self._models_seen[worker.name] = str(model_hash)
            if announce:
                log.info(
                    "model ready: %s, hash %s, on %s (worker %s)",
                    worker.state.get("model_id") or self.settings.model,
                    model_hash,
                    worker.state.get("device") or "?",
                    worker.name,
                )

    def _watch_children(self) -> None:
        if self.broker is not None and not self.broker.is_alive():
            log.error("the embedded broker exited with %s; restarting it", self.broker.exitcode)
            self.broker.start()
        if self.monitor is not None and not self.monitor.is_alive() and not self.stop.is_set():
            log.error("the monitor thread ended; restarting it")
            self._start_monitor()
        for name, process in list(self.children.items()):
            if process.is_alive():
                continue
            log.error("%s exited with %s; restarting it", name, process.exitcode)
            if name.startswith("listener-"):
                self._start_listener(int(name.split("-")[1]))
            elif name == "web":
                self._start_web()
            elif isinstance(process, WorkerProcess):
                self.children[name] = WorkerProcess(process.queues)

    def _watch(self) -> None:
        while not self.stop.wait(WATCH_SECONDS):
            try:
                self._watch_children()
            except Exception:
                log.exception("restarting a child failed; trying again")
            if time.monotonic() >= self._next_model_watch:
                self._next_model_watch = time.monotonic() + MODEL_WATCH_SECONDS
                self._note_models(self._live_workers() or [])

    def run(self) -> None:
        set_title(f"serve {self.settings.ae_title} (supervisor, scheduler)")
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        self.start()
        watcher = threading.Thread(target=self._watch, name="watcher", daemon=True)
        watcher.start()
        audit_stop = threading.Event()  # its own: set once Application Stop is written
        audit_forwarder = start_audit(self.settings, audit_stop)
        # the singletons (settling, reconciling, retention) run on one node host at a time
        lease = Lease(self.settings.effective_database_url)
        retention = threading.Thread(
            target=run_retention,
            args=(
                self.settings,
                make_sessionmaker(self.engine),
                make_sessionmaker(self.reader),
                self.stop,
                lease.held,
            ),
            name="retention",
            daemon=True,
        )
        retention.start()
        prober = Prober(
            self.settings,
            make_sessionmaker(self.engine),
            make_sessionmaker(self.reader),
            lambda: redis_client(self.settings, timeout=5),
        )
        threading.Thread(target=prober.run, args=(self.stop,), name="probe", daemon=True).start()
        try:
            scheduler = Scheduler(
                self.settings,
                make_sessionmaker(self.engine),
                make_sessionmaker(self.reader),
                lease=lease,
            )
            scheduler.run(self.stop)
        finally:
            self.stop.set()
            self.shutdown()
            stop_audit(self.settings)
            audit_stop.set()
            if audit_forwarder is not None:
                audit_forwarder.join(15)  # its last round sends what the stop added

    def shutdown(self) -> None:
        children = list(self.children.values())
        for process in children:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + 10
        for process in children:
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
        if self.monitor is not None:
            self.monitor.join(10)
        if self.broker is not None:  # last: the workers acknowledge through it
            self.broker.terminate()
            self.broker.join(10)
            self.broker.kill()
        self.engine.dispose()
        self.reader.dispose()
        log.info("cxrnode stopped")


def start_audit(settings: Settings, stop: threading.Event) -> threading.Thread | None:
    """Application Start in the audit trail, and the thread forwarding the audit files to
    AUDIT_SYSLOG when one is set (cxrnode.audit.syslog)."""
    from cxrnode.audit.dicom import application

    application(settings, started=True)
    if not settings.audit_syslog:
        return None
    from cxrnode.audit import auditor
    from cxrnode.audit.syslog import SyslogForwarder

    forwarder = SyslogForwarder(settings, auditor(settings).files)
    thread = threading.Thread(target=forwarder.run, args=(stop,), name="audit", daemon=True)
    thread.start()
    return thread


def stop_audit(settings: Settings) -> None:
    """Application Stop in the audit trail."""
    from cxrnode.audit.dicom import application

    application(settings, started=False)


# ------------------------------------------------------------------------ start-up summary


def startup_summary(
    settings: Settings,
    workers: bool,
    processes: int,
    live: Sequence[WorkerInfo] | None = None,
) -> str:
    """The first screen of `cxrnode serve`: who the node is, where it listens and keeps its
    data, which mode it runs in, where drafts go, the model's state and the web URL.

    Pure: it reads the settings, the model directory's file names and the workers' heartbeats
    given in ``live``; it imports no model code (the node never loads the model).
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("cxrnode")
    except PackageNotFoundError:
        release = "(source tree)"
    callers = ", ".join(settings.allowed_calling_aets) or "any calling AE title"
    called = "called AE title checked" if settings.require_called_aet else "any called AE title"
    listeners = f"{processes} listener process" + ("es" if processes != 1 else "")
    if settings.tls_only:
        dicom = f"TLS only: {settings.dicom_host}:{settings.tls_port}, {listeners}"
    else:
        dicom = f"{settings.dicom_host}:{settings.dicom_port}, {listeners}"
        if settings.tls_port:
            dicom += f"; DICOM TLS on {settings.tls_port}"
    if settings.tls_port and settings.tls_client_ca:
        dicom += " (mutual TLS)"
    rows = [
        ("AE title", f"{settings.ae_title} ({called}; callers: {callers})"),
        ("DICOM", dicom),
        ("data dir", str(settings.data_dir)),
        ("mode", _mode_line(settings)),
        ("workers", _workers_line(settings, workers)),
        ("outputs", _outputs_line(settings)),
        (
            "HL7",
            f"final reports in on MLLP {settings.hl7_host}:{settings.hl7_port}"
            if settings.hl7_port
            else "no MLLP listener (HL7_PORT unset); final reports come in as SR by C-STORE",
        ),
        ("model", _model_line(settings, workers, live)),
        ("web", _web_url(settings)),
        (
            "retention",
            f"files removed {settings.retention_days:g} days after delivery"
            if settings.retention_days > 0
            else "off: files are kept forever",
        ),
    ]
    note = root_note(settings)
    if note:
        rows.append(("note", note))
    width = max(len(name) for name, _ in rows) + 2
    lines = [
        f"cxrnode {release}: AI draft chest radiograph reports (unverified, not for diagnosis)"
    ]
    lines += [f"  {name:<{width}}{value}" for name, value in rows]
    lines.append(
        f"  {'try it':<{width}}cxrnode demo --send   (a synthetic chest radiograph; then "
        "cxrnode status)"
    )
    return "\n".join(lines)


def _safe_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return re.sub(r"//([^:/@]+):[^@/]+@", r"//\1:***@", url)


def _mode_line(settings: Settings) -> str:
    if is_embedded(settings) and not settings.database_url:
        socket_file = Path(broker_url(settings).split("://", 1)[1])
        where = (
            "both in the data dir"
            if socket_file.is_relative_to(settings.data_dir)
            else f"redis socket {socket_file}"
        )
        return f"embedded: SQLite cxrnode.db and a redis-server of its own, {where}"
    if settings.database_url:
        database = _safe_url(settings.database_url)
    else:
        database = f"SQLite {settings.data_dir / 'cxrnode.db'}"
    broker = (
        "redis-server started here"
        if is_embedded(settings)
        else _safe_url(settings.broker_url or "")
    )
    return f"distributed: database {database}; broker {broker}"


def _workers_line(settings: Settings, workers: bool) -> str:
    if workers:
        if not settings.model:
            return f"started here: one for {WORKER_QUEUES_NO_MODEL[0]} (no model to serve yet)"
        return "started here: " + " and ".join(WORKER_QUEUES)
    return (
        "none here (--no-workers): run `cxrnode worker --queues prepare,outputs,send` "
        "and, per GPU, `--queues infer`"
    )


def _outputs_line(settings: Settings) -> str:
    kinds = ", ".join(settings.outputs)
    if not settings.destinations:
        return f"{kinds}; no DESTINATIONS: drafts are kept in the data dir, not sent"
    return f"{kinds} -> {', '.join(settings.destinations)}"


def _model_line(settings: Settings, workers: bool, live: Sequence[WorkerInfo] | None) -> str:
    reported = [w for w in live or () if w.state.get("model_hash")]
    if reported:
        first = reported[0]
        return (
            f"{first.state.get('model_id') or settings.model}: loaded by {len(reported)} "
            f"inference worker(s), hash {first.state['model_hash']}"
        )
    if not settings.model:
        return (
            "not set: images are stored, jobs wait in waiting_model until CXRNODE_MODEL "
            "names a checkpoint"
        )
    path = Path(settings.model).expanduser()
    later = "hash once a worker has loaded it"
    if path.is_dir():
        found = [n for n in ("config.json", "model.safetensors.index.json") if (path / n).is_file()]
        shards = len(list(path.glob("*.safetensors")))
        if "config.json" not in found:
            return f"{path}: no config.json there; jobs will wait in waiting_model"
        return f"{path} (config.json, {shards} safetensors file(s)); {later}"
    if path.exists():
        return f"{path} is a file, not a checkpoint directory; jobs will wait in waiting_model"
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?", settings.model):
        return f"hub id {settings.model}: downloaded by the inference worker; {later}"
    where = "here" if workers else "on this host (inference workers elsewhere may have it)"
    return f"{path}: not found {where}; jobs wait in waiting_model until it appears"


def _web_url(settings: Settings) -> str:
    host = settings.http_host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if settings.http_tls_cert else "http"
    return f"{scheme}://{host}:{settings.http_port}/ (admin web app)"
