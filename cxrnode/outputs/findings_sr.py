"""The AI draft report as a DICOM Comprehensive SR (TID 1500 Measurement Report).

Why this shape (specs/dicom-io.md, research/dicom-anchors.md §4):

- **IOD**: Comprehensive SR, the SR class PACS accept most widely (Comprehensive 3D SR is
  newer and less supported; we have no 3D coordinates).
- **Template**: TID 1500 "Imaging Measurement Report" built with highdicom. One image-level
  measurement group (TID 1501) references the source image and holds one qualitative
  evaluation per finding: the finding concept (SNOMED CT, or DCM where DICOM has the
  concept) with the value Present / Absent / Undetermined.
- **Narrative**: the findings text, the impression (when the report labels one), the
  differential diagnosis, the recommendation and our comments are TEXT items in TID 1500's
  document-level "Qualitative Evaluations" container (C0034375, UMLS), which TID 1500
  defines for CODE and TEXT evaluations. That keeps the whole document one standard
  template; highdicom has no class for it, so :func:`_narrative_container` builds it.
- **Draft marking**: VerificationFlag UNVERIFIED and PreliminaryFlag PRELIMINARY (a machine
  never verifies), CompletionFlag COMPLETE (the draft is a whole document, not a fragment
  awaiting more content), SeriesDescription "AI DRAFT - NOT FOR DIAGNOSTIC USE ...", and a
  comment item saying the same.
- **Observer and equipment**: the observer is a device (TID 1004) whose Device Observer UID
  is derived from the model hash, so it changes exactly when the model does; Contributing
  Equipment names the algorithm (manufacturer "cxrnode", model, software versions, Device
  UID), as IHE AI Results asks.

Coding decisions (checked against pydicom's copy of PS3.16 and public SNOMED mapping tables):

- Values come from DICOM CID 240 "Present-Absent": Present (52101004), Absent (272519000),
  Undetermined (373068000) for an "uncertain" label. The spec's draft suggested 2667000 and
  82334004; CID 240 is the DICOM value set for exactly this question, so we use it.
- Findings: atelectasis 46621007, cardiomegaly 8186001, lung consolidation 95436008,
  pulmonary edema 19242006 (CID 3700), pleural effusion 60046008 (CID 645), pneumothorax
  36118008 (CID 6102), pneumonia 233604007 (SNOMED CT); lung opacity as DCM 112033
  "Abnormal opacity" and "no finding" as DCM 111286 "No abnormality" (the DICOM chest CAD
  concepts). Cardiomegaly: DICOM's CID 12248 lists 287272002, which PS3.16 itself also
  names "Enlarged septal foramen of heart"; we use the unambiguous 8186001.
- **Not-mentioned findings are omitted**, not coded. A coded item asserts something about
  the patient; the report's silence is not an observation, and no Present-Absent value
  means "not mentioned". Consumers read a missing finding as "no statement".
- Contributing Equipment purpose: DCM 109102 "Processing Equipment" (CID 7005). IHE AIR
  Rev 1.1 writes (Newcode1, 99IHE, "Processing Algorithm"), but "Newcode1" is a placeholder
  awaiting a DICOM code, and DICOM's CID 7005 still has none; a standard code keeps the
  object valid for every receiver. The Device UID and software versions carry the AIR
  information.

Copying from the source: only what the IOD needs. highdicom copies the Patient and Study
modules (Type 2 attributes the source lacks are sent empty), references the source image
in the evidence and content tree, and nothing else; the source's acquisition equipment,
which highdicom would add as contributing equipment (institution, station name, serial
number), is left out.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from cxrnode.outputs.draft import DraftReport
from cxrnode.uids import OutputKind, device_uid, is_valid_uid, output_uids, uid_from_key

__all__ = [
    "FINDING_CONCEPTS",
    "MANUFACTURER",
    "SR_SERIES_NUMBER",
    "STATE_VALUES",
    "PriorDocument",
    "ai_contributing_equipment",
    "build_sr",
    "clean_text",
    "series_description",
    "short_hash",
    "software_versions",
    "source_view",
    "without_name_warnings",
]

MANUFACTURER = "cxrnode"
ALGORITHM_FAMILY = "CXR-LLaVA"
SR_SERIES_NUMBER = 9901
CHARACTER_SET = "ISO_IR 192"  # UTF-8: model text may hold any character (é, —, ≥, ...)

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
STATE_VALUES: dict[str, Code] = {  # DICOM CID 240 "Present-Absent"
    "present": Code("52101004", "SCT", "Present"),
    "absent": Code("272519000", "SCT", "Absent"),
    "uncertain": Code("373068000", "SCT", "Undetermined"),
}
PROCEDURE_REPORTED = Code("36554-4", "LN", "XR Chest Single view")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
DIFFERENTIAL_DIAGNOSIS = Code("111023", "DCM", "Differential Diagnosis/Impression")

DRAFT_NOTICE = (
    "AI-generated DRAFT report (CXR-LLaVA). Not verified by a radiologist. "
    "Not for diagnostic use until reviewed and signed by a physician."
)
PAEDIATRIC_NOTE = "The paediatric (age-aware) prompt variant was used for this study."
EMPTY_REPORT_NOTE = "The model returned no report text for this image."

# Attributes never copied from the source into the evidence view (pixel data and friends).
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_TYPE2_FROM_SOURCE = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


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


def clean_text(text: str) -> str:
    """Model text made safe for a DICOM text value: control characters other than tab and
    line breaks removed, line ends normalised, outer whitespace stripped."""
    return _CONTROL_CHARS.sub("", text.replace("\r\n", "\n").replace("\r", "\n")).strip()


def series_description(kind: OutputKind | str) -> str:
    """SeriesDescription of an output series: says "AI draft, not for diagnostic use"."""
    suffix = {OutputKind.SR: "REPORT", OutputKind.SC: "IMAGE"}[OutputKind(kind)]
    return f"AI DRAFT - NOT FOR DIAGNOSTIC USE - {ALGORITHM_FAMILY} {suffix}"


def short_hash(model_hash: str) -> str:
    """The first 16 hex digits of the model hash (an ``algo:`` prefix dropped), for
    fields too short for the whole hash; the SR's Algorithm Version holds all of it."""
    return model_hash.rsplit(":", 1)[-1][:16]


def software_versions(draft: DraftReport) -> list[str]:
    """SoftwareVersions values (LO, 64 characters each): pipeline and model hash."""
    return [f"cxrnode {draft.pipeline_version}"[:64], f"model {short_hash(draft.model_hash)}"]


def ai_contributing_equipment(draft: DraftReport) -> hd.ContributingEquipment:
    """Contributing Equipment item that identifies the AI algorithm (IHE AI Results).

    Purpose DCM 109102 "Processing Equipment" (see the module docstring), plus the Device
    UID derived from the model hash, which highdicom's class does not take as an argument.
    """
    item = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=draft.model_name[:64],
        software_versions=software_versions(draft),
        contribution_description=(f"{ALGORITHM_FAMILY} draft report generation (AI, unverified)"),
    )
    item.DeviceUID = device_uid(draft.model_hash)
    return item


def source_view(source: Dataset) -> Dataset:
    """The source without its pixel data, with empty Type 2 patient/study attributes added
    where the source lacks them.

    highdicom reads these attributes unconditionally; a PACS may legitimately omit Type 2
    attributes, and the SR must not fail for it. Pixel data is dropped so that a source read
    with deferred or without pixel data works and nothing large is copied.

    Raises
    ------
    ValueError
        If the source lacks a UID the outputs must reference.
    """
    missing = [
        keyword
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        if not str(source.get(keyword, "") or "")
    ]
    if missing:
        raise ValueError(
            f"the source dataset lacks {missing}; the AI outputs must reference the source "
            "image and join its study, so these UIDs are required"
        )
    view = Dataset()
    for element in source:
        if element.keyword not in _PIXEL_KEYWORDS:
            view.add(element)
    for keyword in _TYPE2_FROM_SOURCE:
        if keyword not in view:
            setattr(view, keyword, None)
    return view


@contextmanager
def without_name_warnings() -> Iterator[None]:
    """Silence highdicom's warning about single-component person names.

    The warning quotes the name (patient or referring physician) and would put personal
    data into the logs (DESIGN.md, invariant 5); the value is the source's and is copied
    unchanged either way.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"The string .* is unlikely to represent the intended person name",
            category=UserWarning,
        )
        yield


def build_sr(
    source: Dataset,
    draft: DraftReport,
    *,
    version: int = 1,
    predecessor: PriorDocument | Dataset | None = None,
    institution_name: str | None = None,
) -> hd.sr.ComprehensiveSR:
    """Build the AI draft report SR for ``source`` (the image the model read).

    Parameters
    ----------
    source
        The source image's dataset; pixel data may be absent or deferred.
    draft
        The validated draft.
    version
        1 for the first draft of the study, 2, 3, ... for replacements; goes into the
        deterministic SOP Instance UID and the InstanceNumber.
    predecessor
        The SR this one replaces (Predecessor Documents Sequence), e.g. after a late image.
    institution_name
        Optional InstitutionName of the node's site (General Equipment).

    Returns
    -------
    highdicom.sr.ComprehensiveSR
        A pydicom ``Dataset``; ``save_as`` writes it as a DICOM file.

    Raises
    ------
    ValueError
        If the source lacks required UIDs, ``version`` is invalid, or the predecessor is
        this very instance.
    """
    view = source_view(source)
    uids = output_uids(
        study_instance_uid=str(view.StudyInstanceUID),
        source_sop_instance_uid=str(view.SOPInstanceUID),
        model_hash=draft.model_hash,
        pipeline_version=draft.pipeline_version,
        kind=OutputKind.SR,
        version=version,
    )
    previous: list[Dataset] | None = None
    if predecessor is not None:
        prior = (
            predecessor
            if isinstance(predecessor, PriorDocument)
            else PriorDocument.from_dataset(predecessor)
        )
        if prior.sop_instance_uid == uids.sop_instance_uid:
            raise ValueError(
                f"the predecessor is this very SR ({prior.sop_instance_uid}); a replacement "
                "needs a higher version number than the SR it replaces"
            )
        previous = [prior.as_dataset()]

    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(draft),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=[_findings_group(view, draft, uids.sop_instance_uid)],
    )
    report[0].ContentSequence.append(_narrative_container(draft))
    _mark_containers_separate(report[0])

    with without_name_warnings():
        sr = hd.sr.ComprehensiveSR(
            evidence=[view],
            content=report[0],
            series_instance_uid=uids.series_instance_uid,
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=uids.sop_instance_uid,
            instance_number=version,
            manufacturer=MANUFACTURER,
            is_complete=True,
            is_final=False,
            is_verified=False,
            institution_name=institution_name,
            previous_versions=previous,
            contributing_equipment=[ai_contributing_equipment(draft)],
            series_description=series_description(OutputKind.SR),
            manufacturer_model_name=draft.model_name[:64],
            software_versions=software_versions(draft),
            specific_character_set=CHARACTER_SET,
        )
    drop_acquisition_equipment(sr)
    return sr


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


def _mark_containers_separate(item: Dataset) -> None:
    """Set ContinuityOfContent SEPARATE on every container (highdicom writes CONTINUOUS).

    CONTINUOUS means "read the children as one running text"; viewers such as dcmtk's then
    print the values without their concept names ("Present Absent ..."). Our containers
    hold separate observations.
    """
    if item.ValueType == "CONTAINER":
        item.ContinuityOfContent = "SEPARATE"
    for child in item.get("ContentSequence", []):
        _mark_containers_separate(child)


def _observation_context(draft: DraftReport) -> hd.sr.ObservationContext:
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(draft.model_hash),
            name=f"{MANUFACTURER} {ALGORITHM_FAMILY} draft reporter",
            manufacturer_name=MANUFACTURER,
            model_name=draft.model_name,
        ),
    )
    return hd.sr.ObservationContext(observer_device_context=device)


def _findings_group(
    view: Dataset, draft: DraftReport, sop_instance_uid: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    evaluations = [
        hd.sr.QualitativeEvaluation(name=FINDING_CONCEPTS[name], value=STATE_VALUES[state])
        for name, state in draft.findings.items()
        if state != "not_mentioned"
    ]
    parameters = [f"prompt {turn}={variant}" for turn, variant in sorted(draft.prompts.items())]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uid_from_key("tracking", sop_instance_uid),
            identifier="AI draft chest radiograph findings",
        ),
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=draft.model_name,
            version=f"pipeline {draft.pipeline_version}; model sha256 {draft.model_hash}",
            parameters=parameters or None,
            manufacturer=MANUFACTURER,
        ),
        qualitative_evaluations=evaluations or None,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(view)],
    )


def _narrative_container(draft: DraftReport) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(_narrative_items(draft))
    return container


def _narrative_items(draft: DraftReport) -> list[hd.sr.TextContentItem]:
    findings, impression = (clean_text(part) for part in draft.sections)
    sections: Sequence[tuple[Code, str]] = [
        (codes.DCM.Finding, findings),
        (codes.DCM.Impression, impression),
        (DIFFERENTIAL_DIAGNOSIS, clean_text(draft.differential)),
        (codes.DCM.Recommendation, clean_text(draft.recommendation)),
        (codes.DCM.Comment, DRAFT_NOTICE),
        (codes.DCM.Comment, PAEDIATRIC_NOTE if draft.paediatric_prompt else ""),
        (codes.DCM.Comment, EMPTY_REPORT_NOTE if not findings and not impression else ""),
    ]
    return [
        hd.sr.TextContentItem(
            name=name, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        for name, text in sections
        if text
    ]
