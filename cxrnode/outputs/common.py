"""What every output object shares: who made it, how it is marked, which study it joins.

The text-report SR, the structured (TID 1500) SR, the Secondary Capture and the
Encapsulated PDF each build their object in their own module; the parts that must read the
same in all of them live here, so that a radiologist or an archive sees one identity:

- **Identity of the algorithm.** Manufacturer "cxrnode", the model's short name as
  Manufacturer's Model Name, software versions (pipeline and model hash), and a Contributing
  Equipment item with the Device UID derived from the model hash (it changes exactly when
  the model does, as IHE AI Results asks). Purpose of reference DCM 109102 "Processing
  Equipment": IHE AIR writes (Newcode1, 99IHE, "Processing Algorithm"), a placeholder
  awaiting a DICOM code that DICOM's CID 7005 still lacks; a standard code keeps every
  receiver's validator quiet, and the Device UID carries the AIR information.
- **Draft marking.** Series descriptions "AI DRAFT <what it is> - NOT FOR DIAGNOSTIC USE"
  (what it is comes early, so a viewer that cuts the description still tells the two SRs
  apart), and the notices the documents print.
- **Study context.** Only the patient and study attributes come from the source image, and
  only from its checked record (:class:`~cxrnode.ingest.record.SourceRecord`: a value
  invalid for its VR is left out). Every object carries the same set of them
  (:data:`PATIENT_AND_STUDY`, :func:`copy_patient_and_study`), whatever highdicom's class
  for it copies on its own; the source's acquisition equipment, which highdicom would list
  as contributing equipment, is left out (:func:`drop_acquisition_equipment`).
- **Coded findings.** The finding concepts and the Present/Absent/Undetermined values are
  the same in both SRs (see :data:`FINDING_CONCEPTS`).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from cxrnode.ingest.record import SourceRecord
from cxrnode.outputs.text import multi_line, one_line
from cxrnode.uids import OutputKind, OutputUIDs, device_uid, is_valid_uid, output_uids
from model.contracts import ModelResult

__all__ = [
    "ALGORITHM_FAMILY",
    "BANNER_RGB",
    "BANNER_TEXT",
    "CHARACTER_SET",
    "DIFFERENTIAL_DIAGNOSIS",
    "DRAFT_NOTICE",
    "EMPTY_REPORT_NOTE",
    "FINDING_CONCEPTS",
    "MANUFACTURER",
    "PAEDIATRIC_NOTE",
    "PATIENT_AND_STUDY",
    "SERIES_NUMBERS",
    "STATE_VALUES",
    "PriorDocument",
    "ai_contributing_equipment",
    "coded_findings_summary",
    "copy_patient_and_study",
    "drop_acquisition_equipment",
    "font_path",
    "long_string",
    "mark_containers_separate",
    "model_name",
    "previous_versions",
    "series_description",
    "short_hash",
    "software_versions",
    "source_record",
    "source_view",
    "without_name_warnings",
]

MANUFACTURER = "cxrnode"
ALGORITHM_FAMILY = "CXR-LLaVA"
CHARACTER_SET = "ISO_IR 192"  # UTF-8: model text may hold any character (é, —, ≥, ...)

#: Series Number of each kind's series: the text report first, as a viewer sorts them.
SERIES_NUMBERS: dict[OutputKind, int] = {
    OutputKind.TEXT_SR: 9901,
    OutputKind.SC: 9902,
    OutputKind.AIR_SR: 9903,
    OutputKind.PDF: 9904,
}
#: What each series holds, first in its description: viewers cut long descriptions (OHIF's
#: study browser shows about 24 characters), so the words that tell the series apart come
#: right after "AI DRAFT", and "NOT FOR DIAGNOSTIC USE" follows.
_SERIES_CONTENT: dict[OutputKind, str] = {
    OutputKind.TEXT_SR: "REPORT (TEXT)",
    OutputKind.AIR_SR: "FINDINGS (STRUCTURED)",
    OutputKind.SC: "IMAGE",
    OutputKind.PDF: "REPORT (PDF)",
}

# Coding decisions (checked against pydicom's copy of PS3.16 and public SNOMED tables):
# values from DICOM CID 240 "Present-Absent" (the spec's draft suggested 2667000 and
# 82334004; CID 240 is the DICOM value set for exactly this question). Findings: SNOMED CT
# where it has the concept; lung opacity and "no finding" as the DICOM chest CAD concepts.
# Cardiomegaly: DICOM's CID 12248 lists 287272002, which PS3.16 also names "Enlarged septal
# foramen of heart"; we use the unambiguous 8186001.
FINDING_CONCEPTS: dict[str, Code] = {
    "atelectasis": Code("46621007", "SCT", "Atelectasis"),
    "cardiomegaly": Code("8186001", "SCT", "Cardiomegaly"),
    "consolidation": Code("95436008", "SCT", "Lung consolidation"),
    "edema": Code("19242006", "SCT", "Pulmonary edema"),
    "pleural_effusion": Code("60046008", "SCT", "Pleural effusion"),
    "pneumothorax": Code("36118008", "SCT", "Pneumothorax"),
    "pneumonia": Code("233604007", "SCT", "Pneumonia"),
    "lung_opacity": Code("112033", "DCM", "Abnormal opacity"),
    "no_finding": Code("111286", "DCM", "No abnormality"),
}
#: The concept of the differential diagnosis text in both SRs (no CID 7001 heading has it).
DIFFERENTIAL_DIAGNOSIS = Code("111023", "DCM", "Differential Diagnosis/Impression")
STATE_VALUES: dict[str, Code] = {  # DICOM CID 240 "Present-Absent"
    "present": Code("52101004", "SCT", "Present"),
    "absent": Code("272519000", "SCT", "Absent"),
    "uncertain": Code("373068000", "SCT", "Undetermined"),
}

#: The banner over the SC and every page of the PDF: white on red.
BANNER_TEXT = "AI DRAFT — NOT VERIFIED — NOT FOR DIAGNOSTIC USE"
BANNER_RGB = (200, 0, 0)

DRAFT_NOTICE = (
    "AI-generated DRAFT report (CXR-LLaVA). Not verified by a radiologist. "
    "Not for diagnostic use until reviewed and signed by a physician."
)
PAEDIATRIC_NOTE = "The paediatric (age-aware) prompt variant was used for this study."
EMPTY_REPORT_NOTE = "The model returned no report text for this image."

_SYSTEM_FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")

#: What every output copies from its source (Patient, General Study and Patient Study
#: modules), keyword -> Type 2 (present, empty when the source has no valid value) or not
#: (left out then). Nothing else of the source reaches an output.
PATIENT_AND_STUDY: dict[str, bool] = {
    "PatientName": True,
    "PatientID": True,
    "IssuerOfPatientID": False,
    "PatientBirthDate": True,
    "PatientSex": True,
    "StudyDate": True,
    "StudyTime": True,
    "AccessionNumber": True,
    "StudyID": True,
    "ReferringPhysicianName": True,
    "StudyDescription": False,
    "PatientAge": False,
    "PatientSize": False,
    "PatientWeight": False,
}


@dataclass(frozen=True)
class PriorDocument:
    """The SR a new version replaces (its UIDs, as recorded when it was sent)."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str

    def __post_init__(self) -> None:
        for name in (
            "sop_class_uid",
            "sop_instance_uid",
            "series_instance_uid",
            "study_instance_uid",
        ):
            value = getattr(self, name)
            if not is_valid_uid(value):
                raise ValueError(f"PriorDocument.{name} must be a valid DICOM UID; got {value!r}")

    @classmethod
    def from_dataset(cls, ds: Dataset) -> PriorDocument:
        """Take the UIDs of a previously built or received SR."""
        return cls(
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            study_instance_uid=str(ds.StudyInstanceUID),
        )

    def as_dataset(self) -> Dataset:
        ds = Dataset()
        ds.SOPClassUID = self.sop_class_uid
        ds.SOPInstanceUID = self.sop_instance_uid
        ds.SeriesInstanceUID = self.series_instance_uid
        ds.StudyInstanceUID = self.study_instance_uid
        return ds


def previous_versions(
    predecessor: PriorDocument | Dataset | None, sop_instance_uid: str
) -> list[Dataset] | None:
    """highdicom's ``previous_versions`` argument for an SR that replaces ``predecessor``.

    Raises
    ------
    ValueError
        If the predecessor is the very instance being built (same version number).
    """
    if predecessor is None:
        return None
    prior = (
        predecessor
        if isinstance(predecessor, PriorDocument)
        else PriorDocument.from_dataset(predecessor)
    )
    if prior.sop_instance_uid == sop_instance_uid:
        raise ValueError(
            f"the predecessor is this very SR ({prior.sop_instance_uid}); a replacement "
            "needs a higher version number than the SR it replaces"
        )
    return [prior.as_dataset()]


def font_path() -> Path:
    """DejaVu Sans for the SC and the PDF: Debian's fonts-dejavu-core file if installed,
    else the copy bundled in ``cxrnode/outputs/assets`` (Bitstream Vera licence)."""
    if _SYSTEM_FONT.is_file():
        return _SYSTEM_FONT
    return Path(str(resources.files("cxrnode.outputs") / "assets" / "DejaVuSans.ttf"))


def coded_findings_summary(draft: ModelResult) -> list[str]:
    """The coded findings as the SC and the PDF print them, one line per state:
    "Present: Cardiomegaly, Pleural effusion" (the SR's code meanings for the findings and for
    their values, so the SC, the PDF and the SR name an unsure finding alike: Undetermined)."""
    lines = []
    for state in ("present", "absent", "uncertain"):
        label = STATE_VALUES[state].meaning
        names = [
            FINDING_CONCEPTS[n].meaning for n, value in draft.findings.items() if value == state
        ]
        if names:
            lines.append(f"{label}: {', '.join(names)}")
    return lines


NOTHING_CODED = "None of the tracked findings was mentioned."


def printed_sections(draft: ModelResult) -> list[tuple[str, str]]:
    """(heading, text) in reading order for the objects that print the draft (the SC and the
    PDF): the coded findings, then each non-empty section of the report."""
    findings, impression = (multi_line(part) for part in draft.sections)
    sections = [("Coded findings", "\n".join(coded_findings_summary(draft)) or NOTHING_CODED)]
    for heading, text in (
        ("Findings", findings),
        ("Impression", impression),
        ("Differential diagnosis", multi_line(draft.differential)),
        ("Recommendation", multi_line(draft.recommendation)),
    ):
        if text:
            sections.append((heading, text))
    return sections


def long_string(text: str) -> str:
    """A value for an LO attribute (64 characters, one line): see :mod:`cxrnode.outputs.text`."""
    return one_line(text, 64)


def model_name(draft: ModelResult) -> str:
    """The model's short name as an LO value (Manufacturer's Model Name and friends)."""
    return long_string(draft.model_name) or ALGORITHM_FAMILY


def series_description(kind: OutputKind | str) -> str:
    """SeriesDescription of an output series, e.g. "AI DRAFT REPORT (TEXT) - NOT FOR
    DIAGNOSTIC USE" (LO: at most 64 characters, which a test checks for every kind)."""
    return f"AI DRAFT {_SERIES_CONTENT[OutputKind(kind)]} - NOT FOR DIAGNOSTIC USE"


def short_hash(model_hash: str) -> str:
    """The first 16 characters of the model hash (an ``algo:`` prefix dropped), for
    fields too short for the whole hash; the SR's Algorithm Version holds all of it."""
    return model_hash.rsplit(":", 1)[-1][:16]


def software_versions(draft: ModelResult) -> list[str]:
    """SoftwareVersions values (LO, 64 characters each): pipeline and model hash."""
    return [
        long_string(f"cxrnode {draft.pipeline_version}"),
        long_string(f"model {short_hash(draft.model_hash)}"),
    ]


def ai_contributing_equipment(draft: ModelResult) -> hd.ContributingEquipment:
    """Contributing Equipment item that identifies the AI algorithm (IHE AI Results):
    purpose DCM 109102 "Processing Equipment" (see the module docstring), plus the Device
    UID derived from the model hash, which highdicom's class does not take as an argument."""
    item = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model_name(draft),
        software_versions=software_versions(draft),
        contribution_description=f"{ALGORITHM_FAMILY} draft report generation (AI, unverified)",
    )
    item.DeviceUID = device_uid(draft.model_hash)
    return item


def source_record(source: SourceRecord | Dataset) -> SourceRecord:
    """The checked record of ``source``; a dataset is checked here (the deliver step makes
    the record once and hands it to every builder, so this is for direct callers)."""
    return source if isinstance(source, SourceRecord) else SourceRecord.from_dataset(source)


def source_view(source: SourceRecord | Dataset) -> Dataset:
    """The source as highdicom copies from it: the record's identity UIDs and checked
    values (no pixel data, nothing left out), with empty Type 2 patient/study attributes
    added where the source has no valid value.

    highdicom reads these attributes unconditionally; a PACS may legitimately omit Type 2
    attributes, and the outputs must not fail for it.

    Raises
    ------
    ValueError
        If the source lacks a UID the outputs must reference.
    """
    view = source_record(source).dataset()
    for keyword, type2 in PATIENT_AND_STUDY.items():
        if type2 and keyword not in view:
            setattr(view, keyword, None)
    return view


def copy_patient_and_study(ds: Dataset, view: Dataset) -> None:
    """Make ``ds`` carry exactly the :data:`PATIENT_AND_STUDY` attributes of ``view`` (a
    :func:`source_view`): highdicom's classes copy different subsets (the SR's the whole
    Patient Study module, the SC's none of it), and the objects of one draft must agree."""
    for keyword in PATIENT_AND_STUDY:
        if keyword in view:
            ds.add(copy.deepcopy(view[keyword]))
        elif keyword in ds:
            delattr(ds, keyword)


def source_and_uids(
    source: SourceRecord | Dataset, draft: ModelResult, kind: OutputKind, version: int
) -> tuple[Dataset, OutputUIDs]:
    """The source as the builders copy it (:func:`source_view`) and the deterministic UIDs
    of the object of ``kind`` and ``version`` made from it for ``draft``."""
    view = source_view(source)
    uids = output_uids(
        study_instance_uid=str(view.StudyInstanceUID),
        source_sop_instance_uid=str(view.SOPInstanceUID),
        model_hash=draft.model_hash,
        pipeline_version=draft.pipeline_version,
        kind=kind,
        version=version,
    )
    return view, uids


@contextmanager
def without_name_warnings() -> Iterator[None]:
    """Silence highdicom's warning about single-component person names.

    The warning quotes the name (patient or referring physician) and would put personal
    data into the logs (docs/dicom.md, promise 5); the value is the source's and is copied
    unchanged either way.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"The string .* is unlikely to represent the intended person name",
            category=UserWarning,
        )
        yield


def drop_acquisition_equipment(ds: Dataset) -> None:
    """Remove the source's acquisition equipment item that highdicom adds on its own.

    It would copy the source's institution, station name and serial number, which the
    output does not need.
    """
    acquisition = hd.sr.CodedConcept.from_code(codes.DCM.AcquisitionEquipment)
    ds.ContributingEquipmentSequence = [
        item
        for item in ds.ContributingEquipmentSequence
        if hd.sr.CodedConcept.from_dataset(item.PurposeOfReferenceCodeSequence[0]) != acquisition
    ]


def mark_containers_separate(item: Dataset) -> None:
    """Set ContinuityOfContent SEPARATE on every container (highdicom writes CONTINUOUS).

    CONTINUOUS means "read the children as one running text"; viewers then print the
    values without their concept names ("Present Absent ..."). Our containers hold separate
    observations.
    """
    if item.ValueType == "CONTAINER":
        item.ContinuityOfContent = "SEPARATE"
    for child in item.get("ContentSequence", []):
        mark_containers_separate(child)
