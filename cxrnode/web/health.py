"""Liveness and readiness: what /healthz and /readyz answer.

``/healthz`` says the web process answers (nothing else is asked: a slow database must not
get a live node restarted). ``/readyz`` runs every check below and answers 200 only when all
pass, 503 otherwise; each check is named in the answer with what it found.

========  ======================================================================
check     passes when
========  ======================================================================
database  a read answers
broker    the broker's Redis answers PING
data_dir  a file can be written and fsynced in DATA_DIR/tmp, and free space is above
          MIN_FREE_DISK_MB (below it the listener refuses C-STOREs)
scp       the DICOM port accepts a TCP connection
workers   every queue (prepare, infer, outputs, send) has a worker with a live heartbeat
model     an inference worker has its model loaded (a worker loads it as soon as it
          starts); while it is still loading, or when loading failed on every inference
          worker, the check fails and says which, with the loader's error
========  ======================================================================
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.orm import sessionmaker

from cxrnode.jobs.broker import QUEUES
from cxrnode.jobs.tracking import live_workers
from cxrnode.settings import Settings


class Check(BaseModel):
    ok: bool
    detail: str
    seconds: float


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, Check]


def _timed(probe: Callable[[], tuple[bool, str]]) -> Check:
    started = time.perf_counter()
    try:
        ok, detail = probe()
    except Exception as exc:  # a check that breaks is a failed check, with its reason
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    return Check(ok=ok, detail=detail, seconds=round(time.perf_counter() - started, 4))


def readiness(settings: Settings, readers: sessionmaker, redis: Any) -> Readiness:
    checks: dict[str, Check] = {"database": _timed(lambda: _database(readers))}
    checks["broker"] = _timed(lambda: _broker(redis))
    checks["data_dir"] = _timed(lambda: _data_dir(settings))
    checks["scp"] = _timed(lambda: _scp(settings))
    workers: list[Any] | None = None

    def fetch_workers() -> tuple[bool, str]:
        nonlocal workers
        workers = live_workers(redis)
        return _workers(workers)

    checks["workers"] = _timed(fetch_workers)
    checks["model"] = _timed(lambda: _model(workers))
    return Readiness(ready=all(c.ok for c in checks.values()), checks=checks)


def _database(readers: sessionmaker) -> tuple[bool, str]:
    with readers() as session:
        session.execute(text("SELECT 1"))
        session.rollback()
    return True, "answers"


def _broker(redis: Any) -> tuple[bool, str]:
    return bool(redis.ping()), "answers PING"


def _data_dir(settings: Settings) -> tuple[bool, str]:
    directory = settings.tmp_dir
    probe = directory / f".readyz-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"ready?")
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            probe.unlink()
    free = shutil.disk_usage(settings.data_dir).free
    reserve = settings.min_free_disk_mb * 1024 * 1024
    mib = f"{free / 2**20:.0f} MiB free, reserve {settings.min_free_disk_mb} MiB"
    if free < reserve:
        return False, f"writable but below the reserve: {mib}; C-STOREs are refused"
    return True, f"writable, {mib}"


def _scp(settings: Settings) -> tuple[bool, str]:
    host = settings.dicom_host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    with socket.create_connection((host, settings.dicom_port), timeout=2):
        pass
    return True, f"listening on port {settings.dicom_port}"


def _workers(workers: list[Any]) -> tuple[bool, str]:
    counts = {queue: sum(queue in w.queues for w in workers) for queue in QUEUES}
    missing = [queue for queue, count in counts.items() if count == 0]
    summary = ", ".join(f"{queue} {count}" for queue, count in counts.items())
    if missing:
        return False, f"no live worker for {', '.join(missing)} (live: {summary})"
    return True, f"live: {summary}"


def _model(workers: list[Any] | None) -> tuple[bool, str]:
    if workers is None:
        return False, "unknown: the broker cannot be asked"
    inference = [w for w in workers if "infer" in w.queues]
    if not inference:
        return False, "no live inference worker"
    loaded = [w for w in inference if w.state.get("model") == "loaded"]
    if loaded:
        first = loaded[0].state
        return True, (
            f"loaded on {len(loaded)} of {len(inference)} inference workers "
            f"({first.get('model_id')} on {first.get('device')})"
        )
    failed = [w for w in inference if w.state.get("model") == "unavailable"]
    if len(failed) == len(inference):
        return False, f"not loadable: {failed[0].state.get('model_error') or 'unknown error'}"
    loading = len(inference) - len(failed)
    return False, (
        f"loading on {loading} of {len(inference)} inference workers: drafts start once it is "
        "loaded" + (f" (failed elsewhere: {failed[0].state.get('model_error')})" if failed else "")
    )
