"""The transports that carry one study's outputs to one destination, and how each answer is
classified.

Each transport takes the settings, the parsed :class:`~cxrnode.destination.Destination` and
the items to send, and returns an :class:`~cxrnode.outputs.claim.Outcome` per output; it
never touches the database (:func:`cxrnode.outputs.outbox.send_batch` records the outcomes).

- **DIMSE** (``AET@host:port``, ``dicom-tls://…``): one association per study, the report
  before its picture. Success (0x0000) → delivered; a warning status (0xB000 family, and the
  general warnings 0x0001/0x0107/0x0116) → delivered with a warning: the peer kept the
  object. A permanent association reject (A-ASSOCIATE-RJ result 1, e.g. "called AE title not
  recognised"), a rejected presentation context and the refusals 0x0122 (SOP class not
  supported) and 0x0124 (not authorised) are dead at once: retrying cannot help until a
  person fixes the configuration, and looping on them is how other gateways stormed their
  PACS. Everything else (no connection, a timeout, an abort, a transient reject, any other
  failure status) is retried.
- **STOW-RS** (``http(s)://…``): one request per study; HTTP 5xx, 408 and 429 are retried,
  other HTTP errors are dead; a 409 body says which instances failed.
- **MLLP** (``mllp://host:port``): the HL7 ORU drafts over one connection
  (:mod:`cxrnode.hl7.sender`); the receiver's ACK decides: AA delivered, AE retried, AR dead.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from cxrnode.destination import Destination, DestinationKind
from cxrnode.outputs.claim import Outcome, Verdict
from cxrnode.settings import Settings

__all__ = [
    "TRANSPORTS",
    "SendItem",
    "association_outcome",
    "client_ssl_context",
    "send_dimse",
    "send_mllp",
    "send_stow",
    "status_outcome",
    "transport_for",
]

WARNING_STATUSES = frozenset({0x0001, 0x0107, 0x0116})
PERMANENT_STATUSES = {
    0x0122: "SOP class not supported",
    0x0124: "not authorised",
}


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


@dataclass(frozen=True)
class SendItem:
    """One output to send: its row id, kind, UIDs and file."""

    output_id: int
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    path: Path


def _read(items: Sequence[SendItem]) -> tuple[list[tuple[SendItem, Dataset]], dict[int, Outcome]]:
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


def send_dimse(
    settings: Settings, target: Destination, items: Sequence[SendItem]
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


def send_mllp(
    settings: Settings, target: Destination, items: Sequence[SendItem]
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


def send_stow(
    settings: Settings, target: Destination, items: Sequence[SendItem]
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
    response: Dataset, readable: Sequence[tuple[SendItem, Dataset]]
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


#: The transport of each kind of destination.
TRANSPORTS: dict[
    DestinationKind, Callable[[Settings, Destination, Sequence[SendItem]], dict[int, Outcome]]
] = {
    DestinationKind.dimse: send_dimse,
    DestinationKind.stow: send_stow,
    DestinationKind.mllp: send_mllp,
}


def transport_for(
    target: Destination,
) -> Callable[[Settings, Destination, Sequence[SendItem]], dict[int, Outcome]]:
    """The function that sends to ``target``."""
    return TRANSPORTS[target.kind]
