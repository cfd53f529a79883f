"""A radiologist's signed report as a Basic Text SR, built with pydicom (highdicom has no class
for Basic Text SR): the SR Document General and Content modules with a "Diagnostic imaging
report" container holding one TEXT item per section."""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
SECTION_CODES = {
    "Findings": ("121071", "DCM", "Finding"),
    "Impression": ("121073", "DCM", "Impression"),
    "History": ("121060", "DCM", "History"),
}


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def radiologist_sr(
    path: Path,
    *,
    study_uid: str,
    sections: dict[str, str],
    accession: str = "",
    patient_id: str = "",
    verified: bool = True,
    predecessor: Dataset | None = None,
) -> Path:
    """Write a Basic Text SR report; ``sections`` maps "Findings"/"Impression"/"History" to
    text (empty: a report with no text at all)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID = "DOE^JANE", patient_id
    ds.PatientBirthDate, ds.PatientSex = "19700101", "F"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study_uid, "20261129", "101500"
    ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = "", "1", accession
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "SR", generate_uid(), 700
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.Manufacturer = "ACME RIS"
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = "20261129", "120000"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "VERIFIED" if verified else "UNVERIFIED"
    if verified:
        observer = Dataset()
        observer.VerifyingObserverName = "RADIOLOGIST^ANNA"
        observer.VerificationDateTime = "20261129120000"
        observer.VerifyingOrganization = "Radiology"
        observer.VerifyingObserverIdentificationCodeSequence = Sequence()
        ds.VerifyingObserverSequence = Sequence([observer])
    if predecessor is not None:
        ds.PredecessorDocumentsSequence = Sequence([predecessor])
    ds.PerformedProcedureCodeSequence = Sequence()
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic imaging report")])
    ds.ContinuityOfContent = "SEPARATE"
    items = []
    for name, text in sections.items():
        if not text:
            continue
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = "TEXT"
        item.ConceptNameCodeSequence = Sequence([_code(*SECTION_CODES[name])])
        item.TextValue = text
        items.append(item)
    ds.ContentSequence = Sequence(items)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
