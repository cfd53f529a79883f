"""The AI draft as a TID 1500 SR for machines (IHE AI Results consumers); opt-in.

**Not for people.** OHIF 3.13 sends every SR whose root is (126000, DCM, "Imaging
Measurement Report") to its measurement viewport, which draws only measurements on images:
for this report of image-level, text-only findings it shows an error and an empty viewport.
The radiologist reads the text-report SR (:mod:`cxrnode.outputs.report_sr`) instead; a site
adds ``air_sr`` to ``OUTPUTS`` only for an AI-results consumer (a worklist prioritiser, an
analytics store, another IHE AIR Image Display) that reads TID 1500.

What IHE AI Results asks of an evidence creator, and where it is:

- **IOD**: Comprehensive SR (AIR names Comprehensive 3D SR; we have no 3D coordinates and
  plain Comprehensive SR is the class PACS accept most widely).
- **Template**: TID 1500 "Imaging Measurement Report" built with highdicom, procedure
  reported (36554-4, LN, "XR Chest Single view"). One image-level measurement group
  (TID 1501) references the source image and holds one qualitative evaluation per
  mentioned finding: the finding concept with the value Present / Absent / Undetermined
  (codes in :mod:`cxrnode.outputs.common`). Findings the report does not mention are
  omitted: a coded item asserts something about the patient, and the report's silence is
  not an observation.
- **Device observer** (TID 1004): Device Observer UID derived from the model hash (it
  changes exactly when the model does), name, manufacturer, model name.
- **Algorithm identification** (TID 4019) in the group: Algorithm Name (the model),
  Algorithm Version (pipeline version and the full model hash), Algorithm Parameters (the
  prompt variant of each turn).
- **Tracking identifiers** in the group: a human-readable Tracking Identifier and a Tracking
  Unique Identifier derived from the SR's own UID (stable across rebuilds).
- **Contributing Equipment** naming the algorithm with its Device UID (see
  :func:`cxrnode.outputs.common.ai_contributing_equipment` for the purpose code).
- **Narrative**: findings text, impression, differential diagnosis, recommendation and our
  notices as TEXT items in TID 1500's document-level "Qualitative Evaluations" container
  (C0034375, UMLS), which TID 1500 defines for CODE and TEXT evaluations; highdicom has no
  class for it, so :func:`_narrative_container` builds it. The text passes
  :func:`cxrnode.outputs.text.multi_line` (valid for UT, not re-wrapped: machines read it).
- **Draft marking**: VerificationFlag UNVERIFIED, PreliminaryFlag PRELIMINARY,
  CompletionFlag COMPLETE, series description "AI DRAFT FINDINGS (STRUCTURED) - ...".

Copying from the source: only what the IOD needs (:func:`cxrnode.outputs.common.source_view`).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from cxrnode.ingest.record import SourceRecord
from cxrnode.outputs.common import (
    ALGORITHM_FAMILY,
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
from cxrnode.outputs.text import multi_line, one_line
from cxrnode.uids import OutputKind, device_uid, uid_from_key
from model.contracts import ModelResult

__all__ = [
    "PROCEDURE_REPORTED",
    "QUALITATIVE_EVALUATIONS",
    "build_findings_sr",
]

PROCEDURE_REPORTED = Code("36554-4", "LN", "XR Chest Single view")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")


def build_findings_sr(
    source: SourceRecord | Dataset,
    draft: ModelResult,
    *,
    version: int = 1,
    predecessor: PriorDocument | Dataset | None = None,
    institution_name: str | None = None,
    marks: DraftMarks | None = None,
) -> hd.sr.ComprehensiveSR:
    """Build the TID 1500 SR of ``draft`` for ``source`` (the image the model read).

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
        The structured SR this one replaces (Predecessor Documents Sequence).
    institution_name
        Optional InstitutionName of the node's site (General Equipment).
    marks
        A suspected urgent finding (series description) and the samples' agreement (TID 4019
        algorithm parameters: "samples=5", "pneumothorax=present 4/5").

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
    view, uids = source_and_uids(source, draft, OutputKind.AIR_SR, version)
    previous = previous_versions(predecessor, uids.sop_instance_uid)

    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(draft),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=[_findings_group(view, draft, uids.sop_instance_uid, marks)],
    )
    report[0].ContentSequence.append(_narrative_container(draft))
    mark_containers_separate(report[0])

    with without_name_warnings():
        sr = hd.sr.ComprehensiveSR(
            evidence=[view],
            content=report[0],
            series_instance_uid=uids.series_instance_uid,
            series_number=SERIES_NUMBERS[OutputKind.AIR_SR],
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
                series_description(OutputKind.AIR_SR), marks.suspected if marks else None
            ),
            manufacturer_model_name=model_name(draft),
            software_versions=software_versions(draft),
            specific_character_set=CHARACTER_SET,
        )
    drop_acquisition_equipment(sr)
    copy_patient_and_study(sr, view)
    return sr


def _observation_context(draft: ModelResult) -> hd.sr.ObservationContext:
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(draft.model_hash),
            name=f"{MANUFACTURER} {ALGORITHM_FAMILY} draft reporter",
            manufacturer_name=MANUFACTURER,
            model_name=model_name(draft),
        ),
    )
    return hd.sr.ObservationContext(observer_device_context=device)


def _findings_group(
    view: Dataset, draft: ModelResult, sop_instance_uid: str, marks: DraftMarks | None = None
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    evaluations = [
        hd.sr.QualitativeEvaluation(name=FINDING_CONCEPTS[name], value=STATE_VALUES[state])
        for name, state in draft.findings.items()
        if state != "not_mentioned"
    ]
    parameters = [
        one_line(f"prompt {turn}={variant}") for turn, variant in sorted(draft.prompts.items())
    ]
    if marks is not None and marks.samples > 1:  # self-consistency: TID 4019 parameters
        parameters.append(f"samples={marks.samples}")
        parameters += [
            one_line(f"{name}={state} {marks.agreement(name, state)}")
            for name, state in draft.findings.items()
            if name in marks.votes and state != "not_mentioned"
        ]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uid_from_key("tracking", sop_instance_uid),
            identifier="AI draft chest radiograph findings",
        ),
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=model_name(draft),
            version=one_line(f"pipeline {draft.pipeline_version}; model {draft.model_hash}"),
            parameters=parameters or None,
            manufacturer=MANUFACTURER,
        ),
        qualitative_evaluations=evaluations or None,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(view)],
    )


def _narrative_container(draft: ModelResult) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(_narrative_items(draft))
    return container


def _narrative_items(draft: ModelResult) -> list[hd.sr.TextContentItem]:
    findings, impression = (multi_line(part) for part in draft.sections)
    sections: Sequence[tuple[Code, str]] = [
        (codes.DCM.Finding, findings),
        (codes.DCM.Impression, impression),
        (DIFFERENTIAL_DIAGNOSIS, multi_line(draft.differential)),
        (codes.DCM.Recommendation, multi_line(draft.recommendation)),
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
