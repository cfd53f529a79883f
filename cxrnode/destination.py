"""Where outputs go: one parsed ``DESTINATIONS`` or ``HL7_DESTINATIONS`` entry.

A leaf module (it imports nothing of cxrnode), so the settings can check every configured
entry when they are read, and the sender, the resend command and the destination probe
share one parser. Forms: ``AET@host:port`` (DICOM C-STORE), ``dicom-tls://AET@host:port``
(C-STORE over DICOM TLS), ``http(s)://…`` (a DICOMweb base URL, STOW-RS) and
``mllp://host:port`` (HL7 v2 over MLLP).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = [
    "MLLP_SCHEME",
    "TLS_SCHEME",
    "Destination",
    "DestinationKind",
    "check_ae_title",
    "parse_destination",
    "retarget",
]

TLS_SCHEME = "dicom-tls"
MLLP_SCHEME = "mllp"
_AET_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash


def check_ae_title(value: str, what: str) -> str:
    """``value`` stripped, if it is a valid AE title; else ValueError naming ``what``."""
    value = value.strip()
    if not _AET_RE.match(value):
        raise ValueError(
            f"{what} {value!r} is not a valid AE title: expected 1-16 printable characters "
            "without a backslash"
        )
    return value


def parse_destination(text: str) -> tuple[str, str, int]:
    """Split ``AET@host:port`` into its parts, saying what is wrong when it does not parse."""
    aet, sep, address = text.strip().partition("@")
    host, colon, port = address.rpartition(":")
    if not sep or not colon or not host or not port.isdigit():
        raise ValueError(
            f"destination {text!r} is not of the form AET@host:port (e.g. ORTHANC@pacs:4242)"
        )
    port_number = int(port)
    if not 1 <= port_number <= 65535:
        raise ValueError(f"destination {text!r}: port {port_number} is outside 1-65535")
    return check_ae_title(aet, "destination AE title"), host.strip("[]"), port_number


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
