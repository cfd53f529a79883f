"""Destination health: which destinations are down, and sending again as soon as one answers.

The outbox retries a failed send with exponential backoff (30 s doubling to 10 min by
default). On its own that makes a destination that returns just after a failed try wait for
the next step: down 102 s meant delivered 114 s after it returned. So while outputs wait
for a destination after a failed try, the node **probes** it every
``DESTINATION_PROBE_SECONDS`` (C-ECHO for DICOM, an HTTP request to the base URL for
STOW-RS, a TCP connect for MLLP) and, as soon as it answers, makes those outputs due at once:
delivery resumes within about one probe interval of the destination's return, whatever the
outage length.

Only outputs whose last try failed to *reach* the destination (:data:`UNREACHABLE`) are made
due by a probe. A destination that answers C-ECHO but refuses the objects (out of resources,
an HTTP 4xx) keeps its backoff: probing it cannot tell when that will change, and sending on
every probe would storm it.

**Down** is read from the database, the truth: a destination is down while it has outputs
waiting after a failed try (pending, tried at least once, not in flight). The prober adds
what the database does not hold to a small hash in the broker's Redis (:data:`HEALTH_KEY`):
since when it was seen down, the last probe's answer and the next probe. The summary
(`cxrnode status`, ``/api/v1/summary``, the dashboard) and ``/metrics`` show both; without
the broker they still show what the database knows.

The prober runs in ``cxrnode serve`` (a thread); with two node hosts both probe, which is
harmless (a C-ECHO each) and keeps probing alive when one host dies.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from cxrnode.db import Output, OutputState, utcnow
from cxrnode.destination import Destination, DestinationKind
from cxrnode.jobs.broker import wake_scheduler
from cxrnode.settings import Settings

log = logging.getLogger(__name__)

#: Redis hash: destination entry -> JSON {since, probe_ok, probe_detail, probed, next_probe}.
HEALTH_KEY = "cxrnode:destinations"
#: ``last_status`` values of a try that did not reach the destination at all (see
#: ``cxrnode.outputs.outbox``): a probe that gets an answer makes such outputs due at once.
UNREACHABLE = frozenset(
    {"no-connection", "no-response", "aborted", "rejected-transient", "error", "not-acknowledged"}
)
#: ``last_status`` values that are not a try's outcome.
NOT_A_FAILURE = ("in flight", "message lost")
#: Most probes in flight at once (each bounded by its timeout).
PROBE_THREADS = 8


def unreachable(status: str | None) -> bool:
    """Whether a recorded send status means the destination did not answer (an HTTP 5xx,
    a timeout or refused connection), rather than answered with a refusal."""
    if status is None:
        return False
    if status in UNREACHABLE:
        return True
    return status.startswith("HTTP 5") or status in ("HTTP 408", "HTTP 429", "HTTP 0")


class DestinationDown(BaseModel):
    """A destination with outputs waiting after a failed try."""

    destination: str
    since: datetime = Field(description="When it was first seen failing (UTC).")
    waiting: int = Field(description="Outputs waiting for it.")
    last_status: str | None = Field(None, description="Status of the last failed try.")
    last_error: str | None = Field(None, description="What the last failed try or probe found.")
    next_probe_at: datetime | None = Field(
        None, description="When the node checks it again (outputs are sent as soon as it answers)."
    )
    next_send_at: datetime | None = Field(
        None, description="When the outbox's backoff tries it next without a probe."
    )
    probe_ok: bool | None = Field(
        None,
        description="The last probe's answer: False unreachable, True it answers (but refused "
        "the last objects), None not probed yet.",
    )


@dataclass(frozen=True)
class Waiting:
    """What the database says about one destination's waiting outputs."""

    destination: str
    count: int
    first_failed_at: datetime
    next_try_at: datetime
    last_status: str | None
    last_error: str | None
    unreachable: bool


def _waiting_filter() -> Any:
    return and_(
        Output.state == OutputState.pending,
        Output.attempts > 0,
        Output.last_status.is_not(None),
        Output.last_status.not_in(NOT_A_FAILURE),
    )


def waiting_destinations(session: Session) -> dict[str, Waiting]:
    """Destinations with outputs waiting after a failed try (read-only; two small queries)."""
    rows = session.execute(
        select(
            Output.destination,
            func.count(),
            func.min(Output.updated_at),
            func.min(Output.next_try_at),
            func.max(Output.updated_at),
        )
        .where(_waiting_filter())
        .group_by(Output.destination)
    ).all()
    found: dict[str, Waiting] = {}
    for destination, count, first, next_try, last in rows:
        latest = session.execute(
            select(Output.last_status, Output.last_error)
            .where(_waiting_filter(), Output.destination == destination, Output.updated_at == last)
            .limit(1)
        ).first()
        status, error = (latest[0], latest[1]) if latest else (None, None)
        found[destination] = Waiting(
            destination, int(count), first, next_try, status, error, unreachable(status)
        )
    return found


def make_due(session: Session, destination: str, now: datetime | None = None) -> int:
    """Make the outputs waiting for ``destination`` after an unreachable try due now (not
    those in flight, nor those the destination refused). Commits; returns how many."""
    now = now or utcnow()
    result = session.execute(
        update(Output)
        .where(
            _waiting_filter(),
            Output.destination == destination,
            Output.next_try_at > now,
            or_(
                Output.last_status.in_(sorted(UNREACHABLE)),
                Output.last_status.like("HTTP 5%"),
                Output.last_status.in_(("HTTP 408", "HTTP 429", "HTTP 0")),
            ),
        )
        .values(next_try_at=now)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return int(result.rowcount or 0)


# ------------------------------------------------------------------------------ probing


def probe(settings: Settings, entry: str, timeout: float) -> tuple[bool, str]:
    """Ask a destination whether it answers; ``(answers, what was found)``. Never raises."""

    try:
        target = Destination.parse(entry)
    except ValueError as exc:
        return False, str(exc)
    try:
        if target.kind == DestinationKind.stow:
            return _probe_http(settings, target.url, timeout)
        if target.kind == DestinationKind.mllp:
            with socket.create_connection((target.host, target.port), timeout=timeout):
                return True, f"MLLP port {target.host}:{target.port} accepts connections"
        return _probe_echo(settings, target, timeout)
    except Exception as exc:  # a probe that breaks is a destination that did not answer
        return False, f"{type(exc).__name__}: {exc}"


def _probe_echo(settings: Settings, target: Any, timeout: float) -> tuple[bool, str]:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from cxrnode.logs import expected_network_failures
    from cxrnode.net.requestor import associate
    from cxrnode.outputs.outbox import client_ssl_context

    ae = AE(ae_title=settings.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(Verification)
    tls_args = (client_ssl_context(settings), target.host) if target.tls else None
    with expected_network_failures():
        assoc = associate(ae, target.host, target.port, ae_title=target.ae_title, tls_args=tls_args)
        if assoc.is_rejected:
            # it answered: a rejection of the echo says the peer is up (a send outcome
            # decides whether the objects are welcome)
            return True, f"{target.entry} answers (it rejected the C-ECHO association)"
        if not assoc.is_established:
            return False, f"C-ECHO: cannot connect to {target.entry}"
        try:
            status = assoc.send_c_echo()
        finally:
            if assoc.is_established:
                assoc.release()
    code = status.get("Status") if status else None
    if code is None:
        return False, f"C-ECHO to {target.entry}: no answer"
    return True, f"C-ECHO to {target.entry}: 0x{int(code):04X}"


def _probe_http(settings: Settings, url: str, timeout: float) -> tuple[bool, str]:
    import requests

    verify: Any = str(settings.send_tls_ca) if settings.send_tls_ca else True
    cert: Any = None
    if settings.send_tls_cert:
        key = settings.send_tls_key
        cert = (str(settings.send_tls_cert), str(key)) if key else str(settings.send_tls_cert)
    try:
        answer = requests.get(url, timeout=timeout, verify=verify, cert=cert)
    except (requests.RequestException, OSError) as exc:
        return False, f"HTTP check of {url} failed: {type(exc).__name__}"
    if answer.status_code >= 500:
        return False, f"HTTP check of {url}: HTTP {answer.status_code}"
    return True, f"HTTP check of {url}: HTTP {answer.status_code}"


# ------------------------------------------------------------------------------- health


def _timestamp(moment: datetime) -> float:
    return moment.replace(tzinfo=UTC).timestamp() if moment.tzinfo is None else moment.timestamp()


def _moment(value: Any) -> datetime | None:
    if value is None:
        return None
    return datetime.fromtimestamp(float(value), UTC).replace(tzinfo=None)


def read_health(client: Any) -> dict[str, dict[str, Any]]:
    """The prober's notes per destination ({} when the broker does not answer)."""
    try:
        raw = client.hgetall(HEALTH_KEY) if client is not None else {}
    except Exception:
        return {}
    notes = {}
    for key, value in raw.items():
        try:
            notes[key.decode() if isinstance(key, bytes) else str(key)] = json.loads(value)
        except (TypeError, ValueError):
            continue
    return notes


def destinations_down(session: Session, client: Any = None) -> list[DestinationDown]:
    """The destinations that are down now, from the database and the prober's notes."""
    notes = read_health(client)
    down = []
    for destination, waiting in sorted(waiting_destinations(session).items()):
        note = notes.get(destination, {})
        since = _moment(note.get("since")) or waiting.first_failed_at
        error = waiting.last_error
        if note.get("probe_ok") is False and note.get("probe_detail"):
            error = f"{error}; probe: {note['probe_detail']}" if error else note["probe_detail"]
        down.append(
            DestinationDown(
                destination=destination,
                since=min(since, waiting.first_failed_at),
                waiting=waiting.count,
                last_status=waiting.last_status,
                last_error=error,
                next_probe_at=_moment(note.get("next_probe")),
                next_send_at=waiting.next_try_at,
                probe_ok=note.get("probe_ok"),
            )
        )
    return down


class Prober:
    """Probes the destinations outputs wait for and makes their outputs due when they answer.

    ``run_once`` is one pass (tests call it); ``run`` loops until ``stop`` is set.
    """

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker,
        readers: sessionmaker,
        redis_factory: Callable[[], Any],
        probe_fn: Callable[[Settings, str, float], tuple[bool, str]] = probe,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.readers = readers
        self.redis_factory = redis_factory
        self.probe_fn = probe_fn
        self.interval = settings.destination_probe_seconds
        self.timeout = min(settings.send_timeout, max(2.0, self.interval))
        self._redis: Any = None
        self._down: set[str] = set()  # destinations this prober said were down (log once)

    def _client(self) -> Any:
        if self._redis is None:
            self._redis = self.redis_factory()
        return self._redis

    def run_once(self, now: datetime | None = None) -> dict[str, bool]:
        """Probe every destination that outputs wait for; return who answered."""
        now = now or utcnow()
        with self.readers() as session:
            waiting = waiting_destinations(session)
            session.rollback()
        notes = read_health(self._safe_client())
        if not waiting:
            self._forget(notes, set())
            return {}
        with ThreadPoolExecutor(max_workers=min(PROBE_THREADS, len(waiting))) as pool:
            answers = dict(
                zip(
                    waiting,
                    pool.map(lambda d: self.probe_fn(self.settings, d, self.timeout), waiting),
                    strict=True,
                )
            )
        due = 0
        updates: dict[str, str] = {}
        for destination, (ok, detail) in answers.items():
            info = waiting[destination]
            note = notes.get(destination, {})
            since = note.get("since") or _timestamp(info.first_failed_at)
            if ok and info.unreachable:
                with self.sessions() as session:
                    made = make_due(session, destination, now)
                due += made
                self._down.discard(destination)
                log.info(
                    "destination %s answers again: sending its %d waiting outputs now",
                    destination,
                    made,
                )
            elif not ok and destination not in self._down:
                self._down.add(destination)
                log.warning(
                    "destination %s is down (%d outputs waiting): %s",
                    destination,
                    info.count,
                    detail,
                )
            updates[destination] = json.dumps(
                {
                    "since": since,
                    "probe_ok": ok,
                    "probe_detail": detail,
                    "probed": _timestamp(now),
                    "next_probe": _timestamp(now + timedelta(seconds=self.interval)),
                }
            )
        client = self._safe_client()
        if client is not None:
            try:
                client.hset(HEALTH_KEY, mapping=updates)
                if due:
                    wake_scheduler(client)
            except Exception:
                self._redis = None
        self._forget(notes, set(waiting))
        return {destination: ok for destination, (ok, _) in answers.items()}

    def _safe_client(self) -> Any:
        try:
            return self._client()
        except Exception:
            return None

    def _forget(self, notes: dict[str, Any], keep: Iterable[str]) -> None:
        """Drop the notes of destinations nothing waits for any more (delivered, or dead)."""
        gone = [d for d in notes if d not in set(keep)]
        for destination in gone:
            if destination in self._down:
                self._down.discard(destination)
                log.info("destination %s: nothing waits for it any more", destination)
        client = self._safe_client()
        if gone and client is not None:
            try:
                client.hdel(HEALTH_KEY, *gone)
            except Exception:
                self._redis = None

    def run(self, stop: threading.Event) -> None:
        """Probe every ``interval`` seconds until ``stop`` is set (0 disables probing)."""
        if self.interval <= 0:
            return
        while not stop.wait(self.interval):
            try:
                self.run_once()
            except Exception as exc:  # the database or broker is away for a moment
                if stop.is_set():
                    return
                log.warning("destination probe pass failed: %s", type(exc).__name__)
                self._redis = None
