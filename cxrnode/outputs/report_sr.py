"""The AI draft as a text-report SR: the object the radiologist reads in the viewer.

Why this object exists: viewers show SRs by their root concept. OHIF sends every SR whose
root is (126000, DCM, "Imaging Measurement Report") (TID 1500) to a measurement viewport
that draws only measurements on images, and a report of text-only findings fails there with
an error. A report whose root is (18748-4, LN, "Diagnostic imaging report") is shown as a
document: numbered section headings, then "Concept: value" lines. This module builds that
document; the TID 1500 SR (:mod:`cxrnode.outputs.findings_sr`) is opt-in, for machines.

Shape (TID 2000 "Basic Diagnostic Imaging Report", extended):

- **IOD** Comprehensive SR, the SR class PACS accept most widely.
- **Root** CONTAINER (18748-4, LN, "Diagnostic imaging report"), ContinuityOfContent
  SEPARATE (each child is its own statement).
- **First item: the draft notice**, a TEXT (121106, DCM, "Comment"), so it is the first
  line a reader meets; then the paediatric-prompt note when that prompt was used.
- **Sections** (CONTAINERs with CID 7001 headings where DICOM has one):
  Findings (59776-5, LN) with the findings text as TEXT (121071, DCM, "Finding") and one
  CODE item per coded finding, the finding concept as its name and Present / Absent /
  Undetermined (CID 240) as its value ("Lung consolidation: Present"), so the findings stay
  machine-readable here too; Impressions (19005-8, LN) when the report labels an
  impression, with TEXT (121073, DCM, "Impression"); Differential diagnosis, headed and
  named (111023, DCM, "Differential Diagnosis/Impression") since CID 7001 has no heading
  for it; Recommendations (18783-1, LN) with TEXT (121075, DCM, "Recommendation"). Empty
  sections are left out; a draft without report text says so in the Findings section.
- **Source image** as an IMAGE item (121080, DCM, "Best illustration of finding")
  INFERRED FROM beneath the first text of the sections: a viewer that does not draw image
  references (OHIF shows "[IMAGE is not supported]" for one placed directly in a section)
  hides it there, and the reference is still in the document and its evidence.
- **Text** passes :func:`cxrnode.outputs.text.report_text`: valid for UT and broken into
  lines of at most 100 characters at word boundaries (OHIF draws a Finding as preformatted
  text that does not wrap).
- **Observer.** The device is the document's author: Author Observer Sequence (observer
  type DEV, manufacturer, model name, Device UID from the model hash) in the header, which
  is the observation context every content item inherits. The content tree therefore holds
  no observer-context lines, which a viewer would print before the notice. We do not claim
  TID 2000 in ContentTemplateSequence: the notice comes before the rows the template puts
  first, and the coded findings are an extension.
- **Draft marking** as for every SR: VerificationFlag UNVERIFIED, PreliminaryFlag
  PRELIMINARY, CompletionFlag COMPLETE, series description "AI DRAFT REPORT (TEXT) - ...".
- **Versions**: deterministic UIDs (:mod:`cxrnode.uids`, kind ``text_sr``); a new version
  names the text report it replaces in Predecessor Documents Sequence.
"""

from __future__ import annotations

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from cxrnode.ingest.record import SourceRecord
from cxrnode.outputs.common import (
    CHARACTER_SET,
    DIFFERENTIAL_DIAGNOSIS,
    DRAFT_NOTICE,
    EMPTY_REPORT_NOTE,
    FINDING_CONCEPTS,
    MANUFACTURER,
    PAEDIATRIC_NOTE,
    SERIES_NUMBERS,
    STATE_VALUES,
    PriorDocument,
    ai_contributing_equipment,
    copy_patient_and_study,
    drop_acquisition_equipment,
    long_string,
    mark_containers_separate,
    model_name,
    previous_versions,
    series_description,
    software_versions,
    source_and_uids,
    without_name_warnings,
)
from cxrnode.outputs.marks import DraftMarks, marked_series_description
from cxrnode.outputs.text import report_text
from cxrnode.uids import OutputKind, device_uid
from model.contracts import ModelResult

__all__ = [
    "DOCUMENT_TITLE",
    "SECTION_HEADINGS",
    "build_report_sr",
]

DOCUMENT_TITLE = Code("18748-4", "LN", "Diagnostic imaging report")
#: Section heading and the concept of the text in it, in reading order.
SECTION_HEADINGS: dict[str, tuple[Code, Code]] = {
    "findings": (Code("59776-5", "LN", "Findings"), codes.DCM.Finding),
    "impression": (Code("19005-8", "LN", "Impressions"), codes.DCM.Impression),
    "differential": (DIFFERENTIAL_DIAGNOSIS, DIFFERENTIAL_DIAGNOSIS),
    "recommendation": (Code("18783-1", "LN", "Recommendations"), codes.DCM.Recommendation),
}
SOURCE_IMAGE = Code("121080", "DCM", "Best illustration of finding")

_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS


def build_report_sr(
    source: SourceRecord | Dataset,
    draft: ModelResult,
    *,
    version: int = 1,
    predecessor: PriorDocument | Dataset | None = None,
    institution_name: str | None = None,
    marks: DraftMarks | None = None,
) -> hd.sr.ComprehensiveSR:
    """Build the text-report SR of ``draft`` for ``source`` (the image the model read).

    Parameters
    ----------
    source
        The source image's checked record (a dataset is checked first: see
        :func:`cxrnode.outputs.common.source_record`).
    draft
        The validated draft.
    version
        1 for the first draft of the study, 2, 3, ... for replacements; goes into the
        deterministic SOP Instance UID and the InstanceNumber.
    predecessor
        The text report this one replaces (Predecessor Documents Sequence).
    institution_name
        Optional InstitutionName of the node's site (General Equipment).
    marks
        A suspected urgent finding (first notice, series description) and the samples'
        agreement (a comment after each coded finding: "Pneumothorax: Present, 4 of 5 samples").

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
    view, uids = source_and_uids(source, draft, OutputKind.TEXT_SR, version)
    previous = previous_versions(predecessor, uids.sop_instance_uid)

    root = hd.sr.ContainerContentItem(name=DOCUMENT_TITLE)
    root.ContentSequence = hd.sr.ContentSequence([], is_root=False)
    mark_containers_separate(root)
    tree = hd.sr.ContentSequence(
        [*_notices(draft, marks), *_sections(view, draft, marks)], is_root=False
    )
    for item in tree:
        mark_containers_separate(item)

    with without_name_warnings():
        sr = hd.sr.ComprehensiveSR(
            evidence=[view],
            content=root,  # the root alone: its children go in below (see the note there)
            series_instance_uid=uids.series_instance_uid,
            series_number=SERIES_NUMBERS[OutputKind.TEXT_SR],
            sop_instance_uid=uids.sop_instance_uid,
            instance_number=version,
            manufacturer=MANUFACTURER,
            is_complete=True,
            is_final=False,
            is_verified=False,
            institution_name=long_string(institution_name or "") or None,
            previous_versions=previous,
            contributing_equipment=[ai_contributing_equipment(draft)],
            series_description=marked_series_description(
                series_description(OutputKind.TEXT_SR), marks.suspected if marks else None
            ),
            manufacturer_model_name=model_name(draft),
            software_versions=software_versions(draft),
            specific_character_set=CHARACTER_SET,
        )
    # The document's content tree is set after the constructor, not passed to it: given the
    # whole tree, highdicom deep-copies it, parses the copy into its own classes and searches
    # it for image references, 8 of this function's 11 ms a study (bench/pipeline.py counts
    # every ms of the outputs step). The file is the same byte for byte
    # (tests/outputs/test_report_sr.py compares it with the constructor's); what differs is
    # highdicom's parsed copy behind ``sr.content``, which holds the root alone and which
    # nothing of ours reads. The one image the tree references is the evidence given.
    sr.ContentSequence = tree
    drop_acquisition_equipment(sr)
    copy_patient_and_study(sr, view)
    sr.AuthorObserverSequence = [_author(draft, institution_name)]
    return sr


def _author(draft: ModelResult, institution_name: str | None) -> Dataset:
    """The AI device as the document's author (Identified Person or Device macro)."""
    author = Dataset()
    author.ObserverType = "DEV"
    author.Manufacturer = MANUFACTURER
    author.ManufacturerModelName = model_name(draft)
    author.DeviceUID = device_uid(draft.model_hash)
    author.StationName = None
    author.InstitutionName = long_string(institution_name or "") or None
    author.InstitutionCodeSequence = []
    return author


def _text(name: Code, text: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=report_text(text), relationship_type=_CONTAINS)


def _notices(draft: ModelResult, marks: DraftMarks | None) -> list[hd.sr.TextContentItem]:
    notices = [_text(codes.DCM.Comment, DRAFT_NOTICE)]
    if marks is not None and marks.banner:
        notices.insert(0, _text(codes.DCM.Comment, marks.banner))
    if draft.paediatric_prompt:
        notices.append(_text(codes.DCM.Comment, PAEDIATRIC_NOTE))
    return notices


def _sections(
    view: Dataset, draft: ModelResult, marks: DraftMarks | None = None
) -> list[hd.sr.ContainerContentItem]:
    """The report's sections, the source image beneath the first text among them."""
    findings, impression = (report_text(part) for part in draft.sections)
    texts = {
        "findings": findings,
        "impression": impression,
        "differential": report_text(draft.differential),
        "recommendation": report_text(draft.recommendation),
    }
    coded: list[hd.sr.ContentItem] = []
    for name, state in draft.findings.items():
        if state == "not_mentioned":
            continue
        concept, value = FINDING_CONCEPTS[name], STATE_VALUES[state]
        coded.append(hd.sr.CodeContentItem(name=concept, value=value, relationship_type=_CONTAINS))
        agreement = marks.agreement(name, state) if marks is not None else None
        if agreement:  # the vote beside the coded finding, as text every viewer shows
            coded.append(
                _text(codes.DCM.Comment, f"{concept.meaning}: {value.meaning}, {agreement}")
            )
    sections = []
    image_placed = False
    for key, (heading, concept) in SECTION_HEADINGS.items():
        items: list[hd.sr.ContentItem] = []
        if texts[key]:
            items.append(_text(concept, texts[key]))
        elif key == "findings" and not impression:
            items.append(_text(codes.DCM.Comment, EMPTY_REPORT_NOTE))
        if items and not image_placed:
            items[0].ContentSequence = hd.sr.ContentSequence([_source_image(view)])
            image_placed = True
        if key == "findings":
            items.extend(coded)
        if items:
            section = hd.sr.ContainerContentItem(name=heading, relationship_type=_CONTAINS)
            section.ContentSequence = hd.sr.ContentSequence(items)
            sections.append(section)
    return sections


def _source_image(view: Dataset) -> hd.sr.ImageContentItem:
    return hd.sr.ImageContentItem(
        name=SOURCE_IMAGE,
        referenced_sop_class_uid=str(view.SOPClassUID),
        referenced_sop_instance_uid=str(view.SOPInstanceUID),
        relationship_type=hd.sr.RelationshipTypeValues.INFERRED_FROM,
    )
