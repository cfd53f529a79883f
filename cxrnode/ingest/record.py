"""The source image as every output copies it: one typed record of checked values.

Ingest records the header of each arriving instance as DICOM JSON (``instances.header``,
:func:`cxrnode.ingest.header.recorded_header`) exactly as the source wrote it. The outputs
(text-report SR, TID 1500 SR, Secondary Capture, Encapsulated PDF, HL7 ORU) copy the
patient and study identity from it; what they copy must be valid, or our object is invalid
too (dciodvfy: "Value invalid for this VR - (0x0010,0x1010) AS Patient's Age" for a source's
age ``62``). :class:`SourceRecord` is that copy, checked once: each recorded attribute is
checked against its VR and multiplicity (:mod:`cxrnode.ingest.vr`); a valid one is kept, an
invalid one is left out, with one warning line naming the attribute and the SOP Instance
UID (never the value: it may be patient data). Every builder takes the same record, so the
objects of one draft agree on what they say about the patient.

Why the check runs when the record is made from the recorded header, not at ingest:

- the C-STORE handler stays as fast as it is, and records what the PACS sent, unchanged;
  a later release with a better rule (or a lenient reading) re-decides from the original;
- rows recorded by earlier releases are read through the same check, with no migration;
- the deliver step makes the record once per draft and hands it to every builder, so a
  bad value is logged once per draft, not once per arriving instance.

The node's own use of a value may be lenient where its meaning is clear: the age-aware
prompt reads Patient's Age ``62`` as 62 years (:func:`cxrnode.ingest.header.age_years`),
while the record leaves it out of every object.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.valuerep import DSfloat

from cxrnode.ingest.header import RECORDED_KEYWORDS, recorded_header
from cxrnode.ingest.vr import check_attribute
from cxrnode.uids import is_valid_uid

__all__ = ["IDENTITY_KEYWORDS", "RecordedValue", "SourceRecord"]

log = logging.getLogger(__name__)

#: The UIDs every output needs from its source: the study it joins, the image it references.
IDENTITY_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")

# Not copied: our outputs declare their own character set (the values are Unicode already).
_NOT_COPIED = frozenset({"SpecificCharacterSet", *IDENTITY_KEYWORDS})
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


@dataclass(frozen=True)
class RecordedValue:
    """One attribute's checked values (empty: present without a value, as Type 2 allows)."""

    vr: str
    values: tuple[str | int | float, ...] = ()

    @property
    def text(self) -> str:
        """The values as one string (several joined by a backslash, as DICOM writes them)."""
        return "\\".join(str(value) for value in self.values)


@dataclass(frozen=True)
class SourceRecord:
    """The source image's identity and the recorded attributes whose values are valid.

    Attributes
    ----------
    sop_class_uid, sop_instance_uid, study_instance_uid, series_instance_uid
        The source image's UIDs; valid UIDs, or the record cannot be made.
    attributes
        Keyword -> :class:`RecordedValue` for every other recorded attribute whose VR
        and values passed their checks.
    left_out
        Keywords of the recorded attributes that did not (their values are not kept).
    """

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    attributes: Mapping[str, RecordedValue] = field(default_factory=dict)
    left_out: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for keyword, value in zip(IDENTITY_KEYWORDS, self._uids(), strict=True):
            if not is_valid_uid(value):
                raise ValueError(
                    f"the source's {keyword} is missing or not a valid UID; the AI outputs "
                    "must reference the source image and join its study, so it is required"
                )
        object.__setattr__(self, "attributes", MappingProxyType(dict(self.attributes)))

    def _uids(self) -> tuple[str, str, str, str]:
        return (
            self.sop_class_uid,
            self.sop_instance_uid,
            self.study_instance_uid,
            self.series_instance_uid,
        )

    # ------------------------------------------------------------------ making one

    @classmethod
    def from_recorded(cls, recorded: Mapping[str, Any]) -> SourceRecord:
        """The record of a header as ingest recorded it (DICOM JSON, PS3.18 F.2).

        Logs one warning per attribute left out. Raises ``ValueError`` when a UID the
        outputs need is missing or invalid.
        """
        uids = [_first_text(recorded, keyword) for keyword in IDENTITY_KEYWORDS]
        attributes: dict[str, RecordedValue] = {}
        left_out: list[str] = []
        for keyword in RECORDED_KEYWORDS:
            if keyword in _NOT_COPIED:
                continue
            element = recorded.get(_tag(keyword))
            if not isinstance(element, Mapping):
                continue
            value, reason = _checked(keyword, element)
            if value is None:
                left_out.append(keyword)
                log.warning(
                    "source %s: %s left out of the outputs: %s",
                    uids[1] or "(no SOP Instance UID)",
                    keyword,
                    reason,
                )
                continue
            attributes[keyword] = value
        return cls(*uids, attributes=attributes, left_out=tuple(left_out))

    @classmethod
    def from_dataset(cls, ds: Dataset) -> SourceRecord:
        """The record of a source dataset (its header as ingest would record it)."""
        return cls.from_recorded(recorded_header(ds))

    # ------------------------------------------------------------------ reading one

    def get(self, keyword: str) -> RecordedValue | None:
        """The checked value of ``keyword``; ``None`` when absent or left out."""
        return self.attributes.get(keyword)

    def text(self, keyword: str) -> str:
        """``keyword``'s value as text, stripped; ``""`` when absent, empty or left out."""
        if keyword in IDENTITY_KEYWORDS:
            return self._uids()[IDENTITY_KEYWORDS.index(keyword)]
        value = self.attributes.get(keyword)
        return value.text.strip() if value is not None else ""

    def dataset(self) -> Dataset:
        """The record as a pydicom Dataset, for the libraries that copy from one
        (highdicom): the identity UIDs and every kept attribute, nothing else."""
        ds = Dataset()
        for keyword, uid in zip(IDENTITY_KEYWORDS, self._uids(), strict=True):
            setattr(ds, keyword, uid)
        for keyword, recorded in self.attributes.items():
            ds.add_new(tag_for_keyword(keyword), recorded.vr, _pydicom_value(recorded))
        return ds


def _tag(keyword: str) -> str:
    return f"{tag_for_keyword(keyword):08X}"


def _first_text(recorded: Mapping[str, Any], keyword: str) -> str:
    element = recorded.get(_tag(keyword))
    values = element.get("Value") if isinstance(element, Mapping) else None
    return str(values[0]).strip() if values else ""


def _pn_text(value: Any) -> str:
    """A PN value of DICOM JSON ({"Alphabetic": ..., "Ideographic": ...}) as DICOM text."""
    if not isinstance(value, Mapping):
        return str(value)
    groups = [str(value.get(group) or "") for group in _PN_GROUPS]
    return "=".join(groups).rstrip("=")


def _checked(keyword: str, element: Mapping[str, Any]) -> tuple[RecordedValue | None, str]:
    """The attribute's :class:`RecordedValue`, or None and why it is left out."""
    vr = str(element.get("vr") or "")
    allowed = dictionary_VR(tag_for_keyword(keyword)).split(" or ")
    if vr not in allowed:
        return None, f"recorded with VR {vr or '(none)'} where the dictionary says {allowed[0]}"
    raw = element.get("Value") or []
    if not isinstance(raw, list):
        return None, "its recorded value is not a list of values"
    values = [_pn_text(v) for v in raw] if vr == "PN" else list(raw)
    if any(v is None for v in values):
        return None, "an empty value among several"
    reason = check_attribute(keyword, vr, values)
    if reason is not None:
        return None, f"not valid for VR {vr} ({reason})"
    return RecordedValue(vr, tuple(values)), ""


def _pydicom_value(recorded: RecordedValue) -> Any:
    """The values as pydicom takes them; DS re-formatted to fit its 16 characters (the
    recorded JSON holds numbers, and ``str(0.1 + 0.2)`` alone would be 19)."""
    values: list[Any] = list(recorded.values)
    if recorded.vr == "DS":
        values = [DSfloat(v, auto_format=True) for v in values]
    if not values:
        return None
    return values[0] if len(values) == 1 else values
