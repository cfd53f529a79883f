"""Logging setup shared by every cxrnode process.

Log lines carry UIDs, AE titles, statuses and reasons; never patient names, IDs or dates.

Where lines go is a setting (``LOG_TARGETS``): stderr, and for the node's long-running
processes (``serve``, its listener and monitor children, the workers) a rotating file per
process under ``DATA_DIR/logs`` (``serve.log``, ``listener-0.log``, ``worker-infer.log``...).
One file per process because Python's rotating handler is safe within one process only: two
processes rotating one file lose each other's lines. ``LOG_FORMAT=json`` writes one JSON
object a line (time, level, process, pid, logger, message, and the exception when there is one).

Expected network failures are one line: :func:`expected_network_failures` silences
pynetdicom's own ERROR lines (and its tracebacks) in this process while a send whose
failures the caller classifies and logs itself is under way. Process-wide, not per thread:
pynetdicom connects and logs from the association's own thread; the processes that send
(the node-side worker) use pynetdicom for nothing else.

A lost broker is one line too: when Redis goes away (a Sentinel failover, a restart), Celery
logs the error that stops a worker, and kombu's failures while closing the dead connection,
with every chained traceback (a hundred lines for one event). :class:`_BrokerLossFilter`
keeps such a record to its message and the connection error under it; the node restarts
the worker and its reconciler re-sends what the broker lost. ``LOG_LEVEL=DEBUG`` keeps the
tracebacks. An error with no lost connection under it keeps its traceback at any level.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cxrnode.settings import Settings

__all__ = ["JsonFormatter", "expected_network_failures", "process_role", "setup_logging"]

#: Roles of the processes that write a log file (short CLI commands log to stderr only).
FILE_ROLES = ("serve", "listener", "monitor", "web", "worker")

_quiet_lock = threading.Lock()
_quiet_sends = 0


@contextlib.contextmanager
def expected_network_failures() -> Iterator[None]:
    """While the block runs, pynetdicom's records in this process are dropped: the caller
    turns every failure into an outcome and logs one line for it."""
    global _quiet_sends
    with _quiet_lock:
        _quiet_sends += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_sends -= 1


class _QuietNetworkFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (_quiet_sends and record.name.startswith("pynetdicom"))


def _lost_connection(exc: BaseException | None) -> BaseException | None:
    """The connection error in ``exc``'s chain (its causes and contexts), if there is one."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, RedisConnectionError)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


class _BrokerLossFilter(logging.Filter):
    """Celery's error records caused by a lost broker connection, as one line each."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.exc_info
            and record.exc_info[1] is not None
            and record.levelno >= logging.ERROR
            and record.name.startswith(("celery", "kombu"))
            and logging.getLogger().getEffectiveLevel() > logging.DEBUG
        ):
            lost = _lost_connection(record.exc_info[1])
            if lost is not None:
                record.msg = f"{record.getMessage()} (broker connection lost: {lost})"
                record.args = None
                record.exc_info = None
                record.exc_text = None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line; an exception becomes a ``exception`` string field."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "process": self.role,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def process_role(argv: list[str] | None = None) -> str:
    """A short name of this process for its log file: ``listener-0`` and ``monitor`` (children
    of ``serve``, by their multiprocessing name), ``worker-<queues>``, or the CLI command."""
    name = multiprocessing.current_process().name
    if name != "MainProcess":
        return name
    args = list(sys.argv if argv is None else argv)
    if len(args) >= 1 and Path(args[0]).parent.name == "worker":  # python -m worker
        queues = args[args.index("--queues") + 1] if "--queues" in args[:-1] else "all"
        return "worker-" + queues.replace(",", "-")
    command = next((a for a in args[1:] if not a.startswith("-")), "cxrnode")
    if command == "worker":
        return "worker"
    return command


def _handlers(settings: Settings | None, role: str) -> list[logging.Handler]:
    targets = settings.log_targets if settings is not None else ["stderr"]
    handlers: list[logging.Handler] = []
    if "stderr" in targets:
        handlers.append(logging.StreamHandler(sys.stderr))
    if settings is not None and "file" in targets and role.startswith(FILE_ROLES):
        directory = settings.data_dir / "logs"
        directory.mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.RotatingFileHandler(
                directory / f"{role}.log",
                maxBytes=settings.log_file_max_mb * 1024 * 1024,
                backupCount=settings.log_file_backups,
                encoding="utf-8",
            )
        )
    if not handlers:  # a CLI command with LOG_TARGETS=file: its messages still show
        handlers.append(logging.StreamHandler(sys.stderr))
    return handlers


def _settings_or_none() -> Settings | None:
    from cxrnode.settings import get_settings

    try:
        return get_settings()
    except Exception:  # invalid settings: the caller reports them; log to stderr meanwhile
        return None


def setup_logging(level: str = "INFO", settings: Settings | None = None) -> None:
    """Configure the root logger once per process (idempotent).

    ``settings`` gives the targets and format; without it the process's own settings
    (environment and CXRNODE_CONFIG) are read.
    """
    root = logging.getLogger()
    if getattr(root, "_cxrnode_configured", False):
        return
    settings = settings if settings is not None else _settings_or_none()
    role = process_role()
    if settings is not None and settings.log_format == "json":
        formatter: logging.Formatter = JsonFormatter(role)
    else:
        formatter = logging.Formatter(
            f"%(asctime)s %(levelname)s [{role} {os.getpid()}] %(name)s: %(message)s"
        )
    quiet, broker_loss = _QuietNetworkFilter(), _BrokerLossFilter()
    handlers = _handlers(settings, role)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(quiet)
        handler.addFilter(broker_loss)
    root.handlers[:] = handlers
    root.setLevel(level.upper())
    # pynetdicom logs every PDU at INFO/DEBUG; keep it quiet unless asked for.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))
    # highdicom logs each module it copies from the source (at INFO), with its UIDs
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, root.level))
    # torchao (the optional quantization extra, imported by transformers whenever installed)
    # warns about every CUDA kernel library it cannot load on a CPU host, and torch about
    # torchao's enums: noise in an inference worker's log, not news
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(max(logging.ERROR, root.level))
    root._cxrnode_configured = True  # type: ignore[attr-defined]
