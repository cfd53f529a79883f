"""The outbox sender: deliver recorded outputs (SRs, SC, PDF) to each destination, with retries.

The database is the truth (docs/dicom.md, promise 2). Every object to send is an
:class:`~cxrnode.db.Output` row; this module claims due rows, sends them and records what
happened on each row. A lost task message, a killed worker or a restarted node therefore
loses nothing: the scheduler finds the rows again.

Policy, after dcm4chee-arc and the lessons of MONAI's gateway (docs/dicom.md, "Sending"):

- **One association per study and destination** carries all of that study's due objects,
  the report before its picture and older versions before newer ones.
- **Outcomes.** Success (0x0000) → ``delivered``. A warning status (0xB000 family, and the
  general warnings 0x0001/0x0107/0x0116) → ``delivered_warning``: the peer kept the object.
  A permanent association reject (A-ASSOCIATE-RJ result 1, e.g. "called AE title not
  recognised"), a rejected presentation context and the refusals 0x0122 (SOP class not
  supported) and 0x0124 (not authorised) go to the dead-letter state at once: retrying
  cannot help until a person fixes the configuration, and looping on them is how other
  gateways stormed their PACS. Everything else (no connection, a timeout, an abort, a
  transient reject, any other failure status, an HTTP 5xx) is retried.
- **Backoff.** ``base * 2**(tries - 1)`` seconds, capped (default 30 s doubling to 10 min),
  at most ``send_max_attempts`` tries (default 10), then dead. ``cxrnode resend`` revives
  dead outputs.
- **Claiming.** :func:`due_outputs` pushes ``next_try_at`` of the rows it hands out ahead by
  a lease and marks them in flight, so the scheduler's next tick does not enqueue them again;
  if the task is lost, the lease expires and they are handed out again.

Destinations (``DESTINATIONS``): ``AET@host:port`` (DICOM C-STORE), ``dicom-tls://AET@host:port``
(C-STORE over DICOM TLS, verified against ``send_tls_ca``, optionally with a client
certificate) and ``http(s)://…`` DICOMweb base URLs (STOW-RS, one request per study).
``HL7_DESTINATIONS`` holds ``mllp://host:port`` entries: the HL7 ORU drafts (kind ``hl7``) go
there over MLLP (:mod:`cxrnode.hl7.sender`), one connection per study, and the receiver's
ACK decides: AA delivered, AE retried, AR dead.
"""

from __future__ import annotations

import enum
import logging
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cxrnode.db import Job, Output, OutputState, Study, utcnow
from cxrnode.logs import expected_network_failures
from cxrnode.outputs import states as output_states
from cxrnode.settings import Settings, parse_destination

__all__ = [
    "HL7_KIND",
    "KIND_ORDER",
    "LEGACY_SR_KIND",
    "Destination",
    "Outcome",
    "RetryPolicy",
    "SendBatch",
    "Verdict",
    "apply_outcome",
    "association_outcome",
    "configured_for",
    "due_outputs",
    "lease_seconds",
    "next_due",
    "claimed_before",
    "release_claims",
    "resend",
    "retarget",
    "send_batch",
    "status_outcome",
]

log = logging.getLogger(__name__)

#: ``kind`` of the rows made before the text-report SR existed: the TID 1500 SR (air_sr).
LEGACY_SR_KIND = "sr"
#: The order objects travel in within one association: the text report first (what the
#: radiologist opens), then the structured SR, the picture and the PDF.
KIND_ORDER = {"text_sr": 0, "air_sr": 1, LEGACY_SR_KIND: 1, "sc": 2, "pdf": 3}

WARNING_STATUSES = frozenset({0x0001, 0x0107, 0x0116})
PERMANENT_STATUSES = {
    0x0122: "SOP class not supported",
    0x0124: "not authorised",
}
TLS_SCHEME = "dicom-tls"
MLLP_SCHEME = "mllp"
#: The outbox kind of the HL7 ORU draft; it goes to HL7_DESTINATIONS, the others to DESTINATIONS.
HL7_KIND = "hl7"

# ------------------------------------------------------------------------------ destinations


class DestinationKind(enum.StrEnum):
    dimse = "dimse"
    stow = "stow"
    mllp = "mllp"


@dataclass(frozen=True)
class Destination:
    """A parsed ``DESTINATIONS`` entry; ``entry`` is the text as configured."""

    entry: str
    kind: DestinationKind
    ae_title: str = ""
    host: str = ""
    port: int = 0
    tls: bool = False
    url: str = ""

    @classmethod
    def parse(cls, entry: str) -> Destination:
        """Parse ``AET@host:port``, ``dicom-tls://AET@host:port``, a DICOMweb URL or
        ``mllp://host:port`` (HL7 v2 over MLLP).

        Raises
        ------
        ValueError
            When the entry is none of these, naming the expected forms.
        """
        text = entry.strip()
        scheme, sep, rest = text.partition("://")
        if sep and scheme.lower() in ("http", "https"):
            parts = urlsplit(text)
            if not parts.hostname:
                raise ValueError(
                    f"destination {entry!r} is not a DICOMweb base URL; expected e.g. "
                    "https://pacs.example/dicom-web"
                )
            return cls(text, DestinationKind.stow, host=parts.hostname, url=text.rstrip("/"))
        if sep and scheme.lower() == MLLP_SCHEME:
            host, colon, port = rest.rstrip("/").rpartition(":")
            if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(
                    f"destination {entry!r} is not of the form mllp://host:port "
                    "(e.g. mllp://ris.example:2575)"
                )
            return cls(text, DestinationKind.mllp, host=host.strip("[]"), port=int(port))
        if sep and scheme.lower() not in ("dicom", TLS_SCHEME):
            raise ValueError(
                f"destination {entry!r} has the unknown scheme {scheme!r}; expected "
                f"AET@host:port, {TLS_SCHEME}://AET@host:port, an http(s):// DICOMweb URL or "
                f"{MLLP_SCHEME}://host:port"
            )
        aet, host, port = parse_destination(rest if sep else text)
        return cls(
            text,
            DestinationKind.dimse,
            ae_title=aet,
            host=host,
            port=port,
            tls=sep != "" and scheme.lower() == TLS_SCHEME,
        )

    @property
    def address(self) -> tuple[str, str, int | str]:
        """Where the destination is, without the AE title: what identifies the same peer
        after an admin corrects a called AE title."""
        if self.kind == DestinationKind.stow:
            return ("stow", self.url, "")
        if self.kind == DestinationKind.mllp:
            return ("mllp", self.host.lower(), self.port)
        return ("dimse-tls" if self.tls else "dimse", self.host.lower(), self.port)


def configured_for(kind: str, settings: Settings) -> list[str]:
    """The configured destinations of an output kind: HL7_DESTINATIONS for the HL7 draft,
    DESTINATIONS for the DICOM objects."""
    return list(settings.hl7_destinations if kind == HL7_KIND else settings.destinations)


def retarget(entry: str, configured: Sequence[str]) -> str:
    """The configured destination an output recorded for ``entry`` should now go to.

    ``entry`` itself when it is still configured; otherwise a configured entry at the same
    address (host and port, or URL), which is how a corrected AE title takes effect on
    outputs recorded before the correction; otherwise ``entry`` unchanged.
    """
    if entry in configured:
        return entry
    try:
        address = Destination.parse(entry).address
    except ValueError:
        return entry
    for candidate in configured:
        try:
            if Destination.parse(candidate).address == address:
                return candidate
        except ValueError:
            continue
    return entry


# ---------------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with a cap and a bounded number of tries."""

    base_seconds: float = 30.0
    max_seconds: float = 600.0
    max_attempts: int = 10

    def __post_init__(self) -> None:
        if self.base_seconds <= 0 or self.max_seconds < self.base_seconds:
            raise ValueError(
                f"retry delays must satisfy 0 < base ({self.base_seconds}) <= max "
                f"({self.max_seconds}); check SEND_RETRY_BASE_SECONDS and SEND_RETRY_MAX_SECONDS"
            )
        if self.max_attempts < 1:
            raise ValueError(f"send_max_attempts must be at least 1; got {self.max_attempts}")

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            settings.send_retry_base_seconds,
            settings.send_retry_max_seconds,
            settings.send_max_attempts,
        )

    def delay(self, tries: int) -> float:
        """Seconds to wait after the ``tries``-th failed try (1, 2, ...)."""
        if tries < 1:
            raise ValueError(f"tries counts failed tries and starts at 1; got {tries}")
        exponent = min(tries - 1, 64)  # 2**64 * base is past any cap
        return min(self.max_seconds, self.base_seconds * 2.0**exponent)


def lease_seconds(settings: Settings) -> float:
    """How long a claimed output is left to its send task before it is handed out again.

    Ten send timeouts (default 300 s): a connect, an association and a few C-STOREs are each
    bounded by one, with room for the task to wait in the queue. Only a lost task makes
    anyone wait for it.
    """
    return 10.0 * settings.send_timeout


class Verdict(enum.StrEnum):
    delivered = "delivered"
    delivered_warning = "delivered_warning"
    retry = "retry"
    dead = "dead"


@dataclass(frozen=True)
class Outcome:
    """What one try did for one object: the verdict, a short status and an explanation."""

    verdict: Verdict
    status: str  # e.g. "0x0000", "0xB007", "rejected-permanent", "no-connection", "HTTP 503"
    detail: str | None = None


def status_outcome(status: int | None) -> Outcome:
    """Classify a C-STORE response status (``None``: no response arrived)."""
    if status is None:
        return Outcome(
            Verdict.retry,
            "no-response",
            "no C-STORE response (the association was aborted or timed out)",
        )
    text = f"0x{status:04X}"
    if status == 0x0000:
        return Outcome(Verdict.delivered, text)
    if 0xB000 <= status <= 0xBFFF or status in WARNING_STATUSES:
        return Outcome(Verdict.delivered_warning, text, f"stored with warning status {text}")
    if status in PERMANENT_STATUSES:
        return Outcome(
            Verdict.dead,
            text,
            f"refused with {text} ({PERMANENT_STATUSES[status]}); fix the destination's "
            "configuration, then `cxrnode resend --dead`",
        )
    if 0xA700 <= status <= 0xA7FF:
        return Outcome(Verdict.retry, text, f"the destination is out of resources ({text})")
    return Outcome(Verdict.retry, text, f"the destination answered the failure status {text}")


def association_outcome(assoc: Any, destination: str) -> Outcome:
    """Classify an association that was not established (pynetdicom ``Association``)."""
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        why = (
            f"association rejected by {destination}: {primitive.result_str}, source "
            f"{primitive.source_str}, reason {primitive.reason_str}"
        )
        if primitive.result == 0x01:
            return Outcome(
                Verdict.dead,
                "rejected-permanent",
                why + "; fix DESTINATIONS or the destination's configuration, then "
                "`cxrnode resend --dead`",
            )
        return Outcome(Verdict.retry, "rejected-transient", why)
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        classes = sorted({str(cx.abstract_syntax) for cx in assoc.rejected_contexts})
        return Outcome(
            Verdict.dead,
            "contexts-rejected",
            f"{destination} accepted none of the proposed presentation contexts {classes}",
        )
    if assoc.acceptor.primitive is None:
        return Outcome(
            Verdict.retry,
            "no-connection",
            f"cannot connect to {destination} (refused, unreachable, TLS failure or timeout)",
        )
    return Outcome(Verdict.retry, "aborted", f"{destination} aborted the association request")


def apply_outcome(row: Output, outcome: Outcome, policy: RetryPolicy, now: datetime) -> bool:
    """Record one try on an outbox row in flight (read locked): its new state, status, error
    and next try. Returns False (and changes nothing) when the row is no longer in flight:
    an admin resent it meanwhile, or a duplicate message already recorded this try."""
    attempts = (row.attempts or 0) + 1
    error, next_try_at = outcome.detail, now
    if outcome.verdict in (Verdict.delivered, Verdict.delivered_warning):
        to = OutputState(outcome.verdict.value)
    elif outcome.verdict == Verdict.dead:
        to = OutputState.dead
    elif attempts >= policy.max_attempts:
        to = OutputState.dead
        error = f"gave up after {attempts} tries; last: {outcome.detail}"
    else:
        to = OutputState.pending
        next_try_at = now + timedelta(seconds=policy.delay(attempts))
    return output_states.move(
        row,
        to,
        now=now,
        expect={OutputState.in_flight},
        attempts=attempts,
        last_status=outcome.status,
        last_error=error,
        next_try_at=next_try_at,
    )


# ---------------------------------------------------------------------------------- claiming


class SendBatch(NamedTuple):
    """The due outputs of one study for one destination: one association's worth."""

    destination: str
    study_uid: str
    output_ids: list[int]


def due_outputs(
    session: Session,
    now: datetime | None = None,
    *,
    lease_seconds: float = 300.0,
    only: Iterable[int] | None = None,
    limit: int = 500,
) -> list[SendBatch]:
    """Claim the outputs whose next try is due, grouped by destination and study: the one
    query that decides what is sent next (and in which order).

    Due are ``pending`` rows whose ``next_try_at`` has come, and ``in_flight`` rows whose
    claim's lease ran out (their message was lost and nobody noticed sooner). Each claimed
    row moves to ``in_flight`` and its ``next_try_at`` moves ``lease_seconds`` ahead, so
    calling this again (the next scheduler tick) does not hand it out twice; the send task
    then records the real outcome. Rows are taken oldest due first; within a batch they
    travel by :func:`batch_order`. Commits.

    Parameters
    ----------
    only
        Restrict the claim to these output ids (the finish task claims the rows it made).
    """
    now = now or utcnow()
    query = (
        select(Output, Study.study_instance_uid, Job.version)
        .join(Job, Output.job_id == Job.id)
        .join(Study, Job.study_id == Study.id)
        .where(Output.state.in_(sorted(output_states.OPEN)), Output.next_try_at <= now)
    )
    if only is not None:
        query = query.where(Output.id.in_(list(only)))
    query = (
        query.order_by(Output.next_try_at, Output.id)
        .limit(limit)
        .with_for_update(of=Output, skip_locked=True)
    )
    claimed = session.execute(query).all()
    until = now + timedelta(seconds=lease_seconds)
    groups: dict[tuple[str, str], list[tuple[tuple[int, int, int], int]]] = {}
    for row, study_uid, version in claimed:
        if not output_states.move(row, OutputState.in_flight, now=now, next_try_at=until):
            continue
        key = (row.destination, study_uid)
        groups.setdefault(key, []).append((batch_order(row, version), row.id))
    session.commit()
    return [
        SendBatch(destination, study_uid, [output_id for _, output_id in sorted(items)])
        for (destination, study_uid), items in groups.items()
    ]


def batch_order(row: Output, version: int) -> tuple[int, int, int]:
    """The order of one study's objects in their association: older draft versions first,
    then by :data:`KIND_ORDER` (the text report before the picture)."""
    return (version, KIND_ORDER.get(row.kind, 9), row.id)


def claimed_before(session: Session, before: datetime) -> list[int]:
    """Outputs claimed for sending (in flight) since before ``before``: candidates for a lost
    send message (the reconciler checks them against the broker's records)."""
    return list(
        session.scalars(
            select(Output.id).where(
                Output.state == OutputState.in_flight, Output.updated_at < before
            )
        )
    )


def release_claims(session: Session, output_ids: Iterable[int], now: datetime) -> int:
    """Give lost sends' outputs back to the outbox, due at once (not counted as a try: the
    message was lost, the destination never saw it). Commits; returns how many."""
    ids = list(output_ids)
    if not ids:
        return 0
    rows = session.scalars(
        select(Output)
        .where(Output.id.in_(ids), Output.state == OutputState.in_flight)
        .with_for_update(skip_locked=True)
    ).all()
    released = sum(
        output_states.move(
            row,
            OutputState.pending,
            now=now,
            expect={OutputState.in_flight},
            next_try_at=now,
            last_status="message lost",
        )
        for row in rows
    )
    session.commit()
    return released


def next_due(session: Session) -> datetime | None:
    """When the next output is due (a retry, or a claim whose lease runs out)."""
    return session.scalar(
        select(func.min(Output.next_try_at)).where(Output.state.in_(sorted(output_states.OPEN)))
    )


# ----------------------------------------------------------------------------------- sending


@dataclass(frozen=True)
class _Item:
    output_id: int
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    path: Path


def send_batch(
    session: Session,
    settings: Settings,
    destination: str,
    output_ids: Sequence[int],
) -> dict[int, Outcome]:
    """Send outputs of one study to one destination in one association (or one STOW-RS
    request), and record the outcome on each row.

    Only rows still pending for ``destination`` and claimed by :func:`due_outputs` (in
    flight) are sent; the claim is not renewed here (it covers the wait in the queue and the
    send). A duplicate task arriving after the first recorded its outcome finds nothing in
    flight and sends nothing. No database transaction is open while the network is in use:
    ``session`` is read, rolled back, and written (committed) after the sending.

    Returns
    -------
    dict[int, Outcome]
        The outcome of each output sent, by output id (empty when nothing was to be sent).
    """
    policy = RetryPolicy.from_settings(settings)
    rows = session.execute(
        select(Output, Study.study_instance_uid, Job.version)
        .join(Job, Output.job_id == Job.id)
        .join(Study, Job.study_id == Study.id)
        .where(
            Output.id.in_(list(output_ids)),
            Output.destination == destination,
            Output.state == OutputState.in_flight,
        )
    ).all()
    rows.sort(key=lambda r: batch_order(r[0], r[2]))
    items = [
        _Item(
            row.id,
            row.kind,
            row.sop_class_uid,
            row.sop_instance_uid,
            settings.outputs_dir / row.path,
        )
        for row, _, _ in rows
    ]
    study_uid = rows[0][1] if rows else ""
    session.rollback()
    if not items:
        return {}

    try:
        target = Destination.parse(destination)
    except ValueError as exc:
        outcomes = {
            item.output_id: Outcome(Verdict.dead, "bad-destination", str(exc)) for item in items
        }
    else:
        transport = {
            DestinationKind.stow: _send_stow,
            DestinationKind.mllp: _send_mllp,
        }.get(target.kind, _send_dimse)
        try:
            with expected_network_failures():  # each failure is an outcome, logged below
                outcomes = transport(settings, target, items)
        except Exception as exc:  # a bug or a library surprise must not strand the rows
            log.exception("sending to %s failed unexpectedly", destination)
            failure = Outcome(Verdict.retry, "error", f"unexpected error while sending: {exc!r}")
            outcomes = {item.output_id: failure for item in items}
        failed = [o for o in outcomes.values() if o.verdict in (Verdict.retry, Verdict.dead)]
        (log.warning if failed else log.info)(
            "study %s to %s: %s%s",
            study_uid,
            destination,
            ", ".join(f"{item.kind} {outcomes[item.output_id].status}" for item in items),
            f" ({failed[0].detail})" if failed else "",
        )

    recorded_at = utcnow()
    for output_id, outcome in outcomes.items():
        row = session.get(Output, output_id, with_for_update=True, populate_existing=True)
        if row is None or not apply_outcome(row, outcome, policy, recorded_at):
            continue
        if row.state == OutputState.dead:
            log.warning("output %d to %s is dead: %s", output_id, destination, row.last_error)
    session.commit()
    return outcomes


def _read(items: Sequence[_Item]) -> tuple[list[tuple[_Item, Dataset]], dict[int, Outcome]]:
    readable, outcomes = [], {}
    for item in items:
        try:
            readable.append((item, pydicom.dcmread(item.path)))
        except (OSError, InvalidDicomError) as exc:
            outcomes[item.output_id] = Outcome(
                Verdict.dead,
                "file-missing",
                f"the output file {item.path} cannot be read ({exc}); rerun the study to "
                "rebuild it",
            )
    return readable, outcomes


def client_ssl_context(settings: Settings) -> ssl.SSLContext:
    """TLS client context for ``dicom-tls://`` destinations: verifies the peer against
    ``send_tls_ca`` (or the system CAs) and offers ``send_tls_cert`` when set."""
    ca = settings.send_tls_ca
    cert = settings.send_tls_cert
    key = settings.send_tls_key
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    if cert:
        context.load_cert_chain(str(cert), str(key) if key else None)
    return context


def _syntaxes(ds: Dataset) -> list[str]:
    own = str(ds.file_meta.TransferSyntaxUID)
    # Uncompressed objects can be re-encoded by pynetdicom in either little-endian syntax.
    extra = [ExplicitVRLittleEndian, ImplicitVRLittleEndian] if not UID(own).is_compressed else []
    return list(dict.fromkeys([own, *extra]))


def _send_dimse(
    settings: Settings, target: Destination, items: Sequence[_Item]
) -> dict[int, Outcome]:
    from pynetdicom import AE

    from cxrnode.net.requestor import associate

    readable, outcomes = _read(items)
    if not readable:
        return outcomes
    timeout = settings.send_timeout
    ae = AE(ae_title=settings.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    contexts: dict[str, list[str]] = {}
    for _, ds in readable:
        syntaxes = contexts.setdefault(str(ds.SOPClassUID), [])
        syntaxes.extend(s for s in _syntaxes(ds) if s not in syntaxes)
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, syntaxes)

    tls_args = None
    if target.tls:
        try:
            tls_args = (client_ssl_context(settings), target.host)
        except (OSError, ssl.SSLError) as exc:
            failure = Outcome(
                Verdict.dead,
                "tls-config",
                f"the TLS client settings cannot be used ({exc}); fix SEND_TLS_CA/CERT/KEY, "
                "then `cxrnode resend --dead`",
            )
            return outcomes | {item.output_id: failure for item, _ in readable}

    assoc = associate(ae, target.host, target.port, ae_title=target.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        failure = association_outcome(assoc, target.entry)
        return outcomes | {item.output_id: failure for item, _ in readable}
    try:
        for item, ds in readable:
            if not assoc.is_established:
                outcomes[item.output_id] = Outcome(
                    Verdict.retry, "aborted", "the association ended before this object was sent"
                )
                continue
            if not any(cx.abstract_syntax == ds.SOPClassUID for cx in assoc.accepted_contexts):
                outcomes[item.output_id] = Outcome(
                    Verdict.dead,
                    "context-rejected",
                    f"{target.entry} rejected the presentation context for "
                    f"{UID(ds.SOPClassUID).name} ({ds.SOPClassUID})",
                )
                continue
            try:
                response = assoc.send_c_store(ds)
            except ValueError as exc:  # no accepted context can carry the dataset's encoding
                outcomes[item.output_id] = Outcome(Verdict.dead, "context-rejected", str(exc))
                continue
            code = response.get("Status") if response else None
            outcomes[item.output_id] = status_outcome(None if code is None else int(code))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


def _send_mllp(
    settings: Settings, target: Destination, items: Sequence[_Item]
) -> dict[int, Outcome]:
    """HL7 drafts over MLLP (one connection), classified by the receiver's ACK."""
    from cxrnode.hl7.sender import send_messages

    outcomes: dict[int, Outcome] = {}
    messages: list[tuple[int, bytes]] = []
    for item in items:
        try:
            messages.append((item.output_id, item.path.read_bytes()))
        except OSError as exc:
            outcomes[item.output_id] = Outcome(
                Verdict.dead,
                "file-missing",
                f"the output file {item.path} cannot be read ({exc}); rerun the study to "
                "rebuild it",
            )
    if not messages:
        return outcomes
    answers = send_messages(target.host, target.port, messages, timeout=settings.send_timeout)
    for output_id, answer in answers.items():
        outcomes[output_id] = Outcome(Verdict(answer.verdict), answer.status, answer.detail)
    return outcomes


def _send_stow(
    settings: Settings, target: Destination, items: Sequence[_Item]
) -> dict[int, Outcome]:
    import requests
    from dicomweb_client import DICOMwebClient

    readable, outcomes = _read(items)
    if not readable:
        return outcomes
    session = requests.Session()
    ca, cert, key = (
        getattr(settings, name) for name in ("send_tls_ca", "send_tls_cert", "send_tls_key")
    )
    if ca:
        session.verify = str(ca)
    if cert:
        session.cert = (str(cert), str(key)) if key else str(cert)
    client = DICOMwebClient(url=target.url, session=session, timeout=settings.send_timeout)
    client.set_http_retry_params(retry=False)  # the outbox retries, with its own backoff
    try:
        response = client.store_instances([ds for _, ds in readable])
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else 0
        body = _stow_body(exc.response)
        if code == 409 and body is not None:  # some instances failed: the body says which
            return outcomes | _stow_outcomes(body, readable)
        verdict = Verdict.retry if code >= 500 or code in (408, 429) else Verdict.dead
        detail = f"STOW-RS to {target.url} answered HTTP {code}"
        if verdict == Verdict.dead:
            detail += "; fix the URL or the server's configuration, then `cxrnode resend --dead`"
        return outcomes | {
            item.output_id: Outcome(verdict, f"HTTP {code}", detail) for item, _ in readable
        }
    except (requests.RequestException, OSError) as exc:
        failure = Outcome(Verdict.retry, "no-connection", f"STOW-RS to {target.url} failed: {exc}")
        return outcomes | {item.output_id: failure for item, _ in readable}
    finally:
        session.close()
    return outcomes | _stow_outcomes(response, readable)


def _stow_body(response: Any) -> Dataset | None:
    if response is None or not response.content:
        return None
    try:
        return Dataset.from_json(response.json())
    except (KeyError, TypeError, ValueError):  # not DICOM JSON, e.g. a server's error page
        return None


def _stow_outcomes(
    response: Dataset, readable: Sequence[tuple[_Item, Dataset]]
) -> dict[int, Outcome]:
    """Per-instance outcomes from a STOW-RS response (PS3.18 Table 10.5.3-1)."""
    failed = {
        str(entry.get("ReferencedSOPInstanceUID", "")): int(entry.get("FailureReason", 0x0110))
        for entry in response.get("FailedSOPSequence", [])
    }
    stored = {
        str(entry.get("ReferencedSOPInstanceUID", "")): entry.get("WarningReason")
        for entry in response.get("ReferencedSOPSequence", [])
    }
    outcomes = {}
    for item, _ in readable:
        uid = item.sop_instance_uid
        if uid in failed:
            outcomes[item.output_id] = status_outcome(failed[uid])
        elif uid in stored and stored[uid] is not None:
            outcomes[item.output_id] = status_outcome(int(stored[uid]))
        elif uid in stored or not (failed or stored):
            outcomes[item.output_id] = Outcome(Verdict.delivered, "0x0000")
        else:
            outcomes[item.output_id] = Outcome(
                Verdict.retry,
                "not-acknowledged",
                "the STOW-RS response does not list this instance",
            )
    return outcomes


# ------------------------------------------------------------------------------------ resend


def resend(
    session: Session,
    settings: Settings,
    *,
    study_uid: str | None = None,
    output_id: int | None = None,
    dead: bool = False,
    now: datetime | None = None,
) -> list[int]:
    """Queue outputs again: one study's current draft, one output, or every dead output.

    Chosen rows go back to ``pending`` with their tries reset and are due at once; the
    running node's scheduler picks them up within a tick. A row whose destination is no
    longer configured follows a configured destination at the same address (see
    :func:`retarget`), so correcting a called AE title and resending is enough. For a study,
    configured destinations that never had a row for its objects get one. Commits.

    Returns
    -------
    list[int]
        Ids of the rows now pending.

    Raises
    ------
    ValueError
        When not exactly one selection is given.
    LookupError
        When the selection names nothing that was recorded.
    """
    if sum(x is not None and x is not False for x in (study_uid, output_id, dead)) != 1:
        raise ValueError("choose exactly one of: a study UID, an output id, or all dead outputs")
    now = now or utcnow()
    if output_id is not None:
        row = session.get(Output, output_id)
        if row is None:
            raise LookupError(f"there is no output {output_id} in the outbox")
        rows = [row]
    elif dead:
        rows = list(session.scalars(select(Output).where(Output.state == OutputState.dead)))
    else:
        rows = _current_draft_rows(session, str(study_uid))
        if not rows:
            raise LookupError(
                f"study {study_uid} has no recorded outputs (unknown study, not reported yet, "
                "or no destination was configured when its draft was made)"
            )
    chosen: dict[int, Output] = {}
    for row in rows:
        target = _retargeted(session, row, configured_for(row.kind, settings))
        chosen[target.id] = target
    if study_uid is not None:
        for row in _missing_destinations(session, rows, settings, now):
            chosen[row.id] = row
    for row in chosen.values():
        output_states.move(row, OutputState.pending, now=now, attempts=0, next_try_at=now)
    session.commit()
    return sorted(chosen)


def _current_draft_rows(session: Session, study_uid: str) -> list[Output]:
    rows = session.execute(
        select(Output, Job.version)
        .join(Job, Output.job_id == Job.id)
        .join(Study, Job.study_id == Study.id)
        .where(Study.study_instance_uid == study_uid)
    ).all()
    if not rows:
        return []
    latest = max(version for _, version in rows)
    return [row for row, version in rows if version == latest]


def _retargeted(session: Session, row: Output, configured: Sequence[str]) -> Output:
    target = retarget(row.destination, configured)
    if target == row.destination:
        return row
    twin = session.scalars(
        select(Output).where(
            Output.job_id == row.job_id, Output.kind == row.kind, Output.destination == target
        )
    ).first()
    if twin is not None:  # the object already has a row for the corrected destination
        return twin
    row.last_error = f"was addressed to {row.destination}: {row.last_error or ''}".rstrip(": ")
    row.destination = target
    return row


def _missing_destinations(
    session: Session, rows: Sequence[Output], settings: Settings, now: datetime
) -> list[Output]:
    added = []
    objects = {(row.job_id, row.kind): row for row in rows}
    for (job_id, kind), template in objects.items():
        have = set(
            session.scalars(
                select(Output.destination).where(Output.job_id == job_id, Output.kind == kind)
            )
        )
        for destination in configured_for(kind, settings):
            if destination in have:
                continue
            row = Output.pending(
                job_id=job_id,
                kind=kind,
                destination=destination,
                sop_class_uid=template.sop_class_uid,
                sop_instance_uid=template.sop_instance_uid,
                path=template.path,
                now=now,
            )
            session.add(row)
            added.append(row)
    session.flush()
    return added
