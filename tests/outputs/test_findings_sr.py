"""The TID 1500 SR for machines: valid (dciodvfy, dcmtk, highdicom), marked as a draft, coded
as specified, and carrying what IHE AI Results asks of an evidence creator."""

from __future__ import annotations

import html
import subprocess
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom import Dataset

from cxrnode.outputs.common import (
    DRAFT_NOTICE,
    EMPTY_REPORT_NOTE,
    FINDING_CONCEPTS,
    PAEDIATRIC_NOTE,
    STATE_VALUES,
    PriorDocument,
    series_description,
)
from cxrnode.outputs.findings_sr import build_findings_sr as build_sr
from cxrnode.uids import OutputKind, device_uid, output_uids
from model.contracts import FINDINGS, ModelResult

ALL_STATES = {
    "atelectasis": "present",
    "cardiomegaly": "absent",
    "consolidation": "uncertain",
    "edema": "not_mentioned",
    "pleural_effusion": "present",
    "pneumothorax": "absent",
    "pneumonia": "uncertain",
    "lung_opacity": "present",
    "no_finding": "absent",
}
LONG_TEXT = " ".join(
    f"Sentence {i}: the lungs are clear without focal consolidation, effusion or pneumothorax."
    for i in range(400)
)


def _text_items(sr: Dataset) -> list[tuple[str, str]]:
    """(concept meaning, text) of every TEXT item in the narrative container."""
    root = hd.sr.ComprehensiveSR.from_dataset(sr)
    (container,) = [
        item
        for item in root.ContentSequence
        if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == "C0034375"
    ]
    return [
        (item.ConceptNameCodeSequence[0].CodeMeaning, item.TextValue)
        for item in container.ContentSequence
    ]


def _coded_findings(sr: Dataset) -> dict[tuple[str, str], tuple[str, str]]:
    """{(finding code, scheme): (value code, scheme)} from the measurement group."""
    report = hd.sr.ComprehensiveSR.from_dataset(sr).content
    (group,) = report.get_image_measurement_groups()
    return {
        (e.name.value, e.name.scheme_designator): (e.value.value, e.value.scheme_designator)
        for e in group.get_qualitative_evaluations()
    }


def _strings(ds: Dataset) -> list[str]:
    """Every string value in the dataset, nested sequences included."""
    found: list[str] = []
    for element in ds.iterall():
        values = element.value if element.VM > 1 else [element.value]
        found.extend(str(v) for v in values if isinstance(v, str | pydicom.valuerep.PersonName))
    return found


@pytest.mark.parametrize(
    "case",
    ["real CR", "synthetic DX", "synthetic CR", "all states", "long unicode", "empty draft"],
)
def test_every_sr_passes_dciodvfy_without_errors(
    case: str,
    rg1: Dataset,
    synthetic: Callable[..., Dataset],
    make_draft: Callable[..., ModelResult],
    validate: Callable,
) -> None:
    source = {
        "real CR": rg1,
        "synthetic CR": synthetic("CR"),
    }.get(case, synthetic("DX"))
    draft = {
        "all states": make_draft(findings=ALL_STATES, differential=""),
        "long unicode": make_draft(
            report=f"Opacité rétrocardiaque — possible atélectasie ≥ 2 cm. {LONG_TEXT}",
            recommendation="Contrôle radiologique à 48 h.",
            prompts={"report": "paediatric"},
        ),
        "empty draft": make_draft(report="", differential="", recommendation="", findings={}),
    }.get(case, make_draft())

    result = validate(build_sr(source, draft))

    assert "ComprehensiveSR" in result.output
    assert result.errors == [], result.output


def test_sr_on_a_synthetic_source_has_only_the_stale_device_uid_warnings(
    synthetic: Callable[..., Dataset], make_draft: Callable[..., ModelResult], validate: Callable
) -> None:
    result = validate(build_sr(synthetic("DX"), make_draft(findings=ALL_STATES)))

    assert result.unexpected_warnings == [], result.output


def test_sr_is_marked_as_an_unverified_preliminary_ai_draft(
    rg1: Dataset, make_draft: Callable[..., ModelResult]
) -> None:
    sr = build_sr(rg1, make_draft())

    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert sr.Modality == "SR"
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.PreliminaryFlag == "PRELIMINARY"
    assert sr.CompletionFlag == "COMPLETE"
    assert "VerifyingObserverSequence" not in sr
    assert sr.SeriesDescription == series_description(OutputKind.AIR_SR)
    assert sr.SeriesDescription.startswith("AI DRAFT FINDINGS (STRUCTURED)")
    assert ("Comment", DRAFT_NOTICE) in _text_items(sr)


def test_sr_joins_the_source_study_in_a_new_series(
    rg1: Dataset, make_draft: Callable[..., ModelResult]
) -> None:
    sr = build_sr(rg1, make_draft())

    assert sr.StudyInstanceUID == rg1.StudyInstanceUID
    assert sr.PatientID == rg1.PatientID
    assert sr.PatientName == rg1.PatientName
    assert sr.AccessionNumber == rg1.AccessionNumber
    assert sr.SeriesInstanceUID != rg1.SeriesInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    referenced = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == rg1.SOPInstanceUID


def test_sr_codes_each_mentioned_finding_and_omits_the_unmentioned(
    synthetic: Callable[..., Dataset], make_draft: Callable[..., ModelResult]
) -> None:
    sr = build_sr(synthetic("DX"), make_draft(findings=ALL_STATES))

    expected = {
        (FINDING_CONCEPTS[name].value, FINDING_CONCEPTS[name].scheme_designator): (
            STATE_VALUES[state].value,
            STATE_VALUES[state].scheme_designator,
        )
        for name, state in ALL_STATES.items()
        if state != "not_mentioned"
    }
    assert _coded_findings(sr) == expected
    assert ("19242006", "SCT") not in _coded_findings(sr)  # edema: not mentioned
    assert STATE_VALUES["present"].value == "52101004"
    assert STATE_VALUES["absent"].value == "272519000"
    assert STATE_VALUES["uncertain"].value == "373068000"


def test_every_labeler_finding_has_a_code() -> None:
    assert set(FINDING_CONCEPTS) == set(FINDINGS)
    assert len({(c.value, c.scheme_designator) for c in FINDING_CONCEPTS.values()}) == len(FINDINGS)


def test_measurement_group_references_the_source_image(
    rg1: Dataset, make_draft: Callable[..., ModelResult]
) -> None:
    report = hd.sr.ComprehensiveSR.from_dataset(build_sr(rg1, make_draft())).content
    (group,) = report.get_image_measurement_groups()

    (image,) = group.source_images
    assert image.referenced_sop_instance_uid == rg1.SOPInstanceUID
    assert image.referenced_sop_class_uid == rg1.SOPClassUID


def test_sr_narrative_holds_findings_impression_differential_and_recommendation(
    rg1: Dataset, make_draft: Callable[..., ModelResult]
) -> None:
    items = _text_items(build_sr(rg1, make_draft(prompts={"report": "paediatric"})))

    assert ("Finding", "The heart is enlarged. Small right pleural effusion. No pneumothorax.") in (
        items
    )
    assert ("Impression", "Cardiomegaly with a small right effusion.") in items
    assert ("Differential Diagnosis/Impression", "Congestive heart failure; fluid overload.") in (
        items
    )
    assert ("Recommendation", "Follow-up radiograph after diuresis.") in items
    assert ("Comment", DRAFT_NOTICE) in items
    assert ("Comment", PAEDIATRIC_NOTE) in items


def test_sr_without_paediatric_prompt_has_no_paediatric_note(
    rg1: Dataset, make_draft: Callable[..., ModelResult]
) -> None:
    items = _text_items(build_sr(rg1, make_draft(prompts={"report": "default"})))

    assert ("Comment", PAEDIATRIC_NOTE) not in items


def test_empty_sections_are_left_out_and_an_empty_report_says_so(
    synthetic: Callable[..., Dataset], make_draft: Callable[..., ModelResult]
) -> None:
    items = _text_items(
        build_sr(
            synthetic("DX"),
            make_draft(report="", differential="", recommendation="", findings={}),
        )
    )

    names = [name for name, _ in items]
    assert "Finding" not in names
    assert "Differential Diagnosis/Impression" not in names
    assert ("Comment", EMPTY_REPORT_NOTE) in items
    assert all(text for _, text in items)  # TEXT values are Type 1


def test_unicode_and_long_text_survive_the_round_trip(
    synthetic: Callable[..., Dataset],
    make_draft: Callable[..., ModelResult],
    save: Callable[[Dataset, str], Path],
) -> None:
    report = f"Opacité rétrocardiaque — atélectasie ≥ 2 cm. {LONG_TEXT}"
    path = save(build_sr(synthetic("DX"), make_draft(report=report)), "sr.dcm")

    reread = pydicom.dcmread(path)
    assert reread.SpecificCharacterSet == "ISO_IR 192"
    assert ("Finding", report) in _text_items(reread)


def test_dsrdump_parses_the_sr_and_dsr2html_renders_the_findings_text(
    rg1: Dataset,
    make_draft: Callable[..., ModelResult],
    save: Callable[[Dataset, str], Path],
    tmp_path: Path,
) -> None:
    findings = "Patchy café-coloured opacity in the right lower zone."
    path = save(build_sr(rg1, make_draft(report=findings)), "sr.dcm")

    dump = subprocess.run(
        ["/usr/bin/dsrdump", str(path)], capture_output=True, text=True, timeout=60
    )
    assert dump.returncode == 0, dump.stderr
    assert "Comprehensive SR Document" in dump.stdout
    assert "Verification Flag   : UNVERIFIED" in dump.stdout
    assert '(52101004,SCT,"Present")' in dump.stdout

    page = tmp_path / "sr.html"
    rendered = subprocess.run(
        ["/usr/bin/dsr2html", str(path), str(page)], capture_output=True, text=True, timeout=60
    )
    assert rendered.returncode == 0, rendered.stderr
    text = html.unescape(page.read_text(encoding="utf-8"))
    assert findings in text
    # each coded finding is shown with its name, not as a bare value (SEPARATE containers)
    assert "Cardiomegaly:" in text
    assert "Present (52101004, SCT)" in text


def test_device_observer_uid_follows_the_model_hash(
    rg1: Dataset, make_draft: Callable[..., ModelResult]
) -> None:
    def observer_uid(sr: Dataset) -> str:
        (item,) = [
            i
            for i in sr.ContentSequence
            if i.ValueType == "UIDREF" and i.ConceptNameCodeSequence[0].CodeValue == "121012"
        ]
        return item.UID

    first = build_sr(rg1, make_draft(model_hash="aa" * 32))
    again = build_sr(rg1, make_draft(model_hash="aa" * 32, model_id="/elsewhere/same-weights"))
    other = build_sr(rg1, make_draft(model_hash="bb" * 32))

    assert observer_uid(first) == device_uid("aa" * 32) == observer_uid(again)
    assert observer_uid(other) == device_uid("bb" * 32) != observer_uid(first)


def test_contributing_equipment_names_the_algorithm_and_nothing_from_the_source(
    rg1: Dataset, make_draft: Callable[..., ModelResult]
) -> None:
    draft = make_draft()
    sr = build_sr(rg1, draft)

    manufacturers = [item.Manufacturer for item in sr.ContributingEquipmentSequence]
    assert rg1.Manufacturer not in manufacturers
    (ours,) = [i for i in sr.ContributingEquipmentSequence if i.Manufacturer == "cxrnode"]
    purpose = ours.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("109102", "DCM")
    assert ours.DeviceUID == device_uid(draft.model_hash)
    assert ours.ManufacturerModelName == "CXR-LLAVA-v2"
    assert f"model {draft.model_hash[:16]}" in ours.SoftwareVersions


def test_sr_copies_only_patient_and_study_attributes_from_the_source(
    synthetic: Callable[..., Dataset], make_draft: Callable[..., ModelResult]
) -> None:
    source = synthetic(
        "DX",
        extra={
            "InstitutionName": "LEAK INSTITUTION",
            "StationName": "LEAKSTATION",
            "SeriesDescription": "LEAK SERIES",
            "Manufacturer": "LEAK VENDOR",
            "DeviceSerialNumber": "LEAK SERIAL",
            "ProtocolName": "LEAK PROTOCOL",
            "OperatorsName": "LEAK^OPERATOR",
            "PerformingPhysicianName": "LEAK^PHYSICIAN",
            "PatientName": "KEEP^PATIENT",
            "AccessionNumber": "KEEPACC",
            "StudyDescription": "KEEP STUDY",
        },
    )

    strings = _strings(build_sr(source, make_draft()))

    assert [s for s in strings if "LEAK" in s] == []
    assert {"KEEP^PATIENT", "KEEPACC", "KEEP STUDY"} <= set(strings)


def test_source_without_type2_patient_attributes_still_builds_a_valid_sr(
    synthetic: Callable[..., Dataset], make_draft: Callable[..., ModelResult], validate: Callable
) -> None:
    source = synthetic(
        "DX", remove=("PatientName", "PatientBirthDate", "AccessionNumber", "StudyID")
    )

    sr = build_sr(source, make_draft())

    assert sr.PatientName in ("", None)
    assert validate(sr).errors == []


def test_source_without_a_sop_instance_uid_is_refused_with_the_reason(
    synthetic: Callable[..., Dataset], make_draft: Callable[..., ModelResult]
) -> None:
    source = synthetic("DX", remove=("SOPInstanceUID",))

    with pytest.raises(ValueError, match="SOPInstanceUID"):
        build_sr(source, make_draft())


def test_rebuilding_gives_the_same_uids_and_a_new_version_a_new_instance(
    rg1: Dataset, make_draft: Callable[..., ModelResult]
) -> None:
    draft = make_draft()
    first = build_sr(rg1, draft)
    again = build_sr(rg1, draft)
    second = build_sr(rg1, draft, version=2)

    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (
        again.SOPInstanceUID,
        again.SeriesInstanceUID,
    )
    expected = output_uids(
        study_instance_uid=rg1.StudyInstanceUID,
        source_sop_instance_uid=rg1.SOPInstanceUID,
        model_hash=draft.model_hash,
        pipeline_version=draft.pipeline_version,
        kind=OutputKind.AIR_SR,
    )
    assert first.SOPInstanceUID == expected.sop_instance_uid
    assert second.SOPInstanceUID != first.SOPInstanceUID
    assert second.SeriesInstanceUID == first.SeriesInstanceUID
    assert (first.InstanceNumber, second.InstanceNumber) == (1, 2)


def test_new_version_references_its_predecessor(
    rg1: Dataset, make_draft: Callable[..., ModelResult], validate: Callable
) -> None:
    draft = make_draft()
    first = build_sr(rg1, draft)

    second = build_sr(rg1, draft, version=2, predecessor=first)

    (study,) = second.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == first.StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    (instance,) = series.ReferencedSOPSequence
    assert instance.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert instance.ReferencedSOPClassUID == first.SOPClassUID
    assert validate(second).errors == []


def test_predecessor_given_as_recorded_uids_works_like_the_dataset(
    rg1: Dataset, make_draft: Callable[..., ModelResult]
) -> None:
    draft = make_draft()
    first = build_sr(rg1, draft)
    prior = PriorDocument(
        sop_class_uid=first.SOPClassUID,
        sop_instance_uid=first.SOPInstanceUID,
        series_instance_uid=first.SeriesInstanceUID,
        study_instance_uid=first.StudyInstanceUID,
    )

    from_uids = build_sr(rg1, draft, version=2, predecessor=prior)
    from_dataset = build_sr(rg1, draft, version=2, predecessor=first)

    assert from_uids.PredecessorDocumentsSequence == from_dataset.PredecessorDocumentsSequence


def test_an_sr_cannot_be_its_own_predecessor(
    rg1: Dataset, make_draft: Callable[..., ModelResult]
) -> None:
    first = build_sr(rg1, make_draft())

    with pytest.raises(ValueError, match="higher version"):
        build_sr(rg1, make_draft(), predecessor=first)


def test_structured_sr_carries_what_ihe_air_asks_and_parses_back_with_highdicom(
    rg1: Dataset, make_draft: Callable[..., ModelResult]
) -> None:
    draft = make_draft(prompts={"report": "paediatric", "differential": "default"})
    sr = build_sr(rg1, draft)

    parsed = hd.sr.ComprehensiveSR.from_dataset(sr)
    report = parsed.content
    assert parsed.ConceptNameCodeSequence[0].CodeValue == "126000"  # Imaging Measurement Report
    # device observer (TID 1004): its UID follows the model
    (observer,) = report.get_observer_contexts()
    assert observer.observer_type.value == "121007"  # Device
    assert observer.observer_identifying_attributes.uid == device_uid(draft.model_hash)
    # every measurement group: tracking identifiers and algorithm identification (TID 4019)
    for group in report.get_image_measurement_groups():
        assert group.tracking_identifier and group.tracking_uid
        items = group[0].ContentSequence
        values = {
            item.ConceptNameCodeSequence[0].CodeValue: item.get("TextValue")
            for item in items
            if item.ValueType == "TEXT"
        }
        assert values["111001"] == "CXR-LLAVA-v2"  # Algorithm Name
        assert draft.model_hash in values["111003"]  # Algorithm Version
        assert draft.pipeline_version in values["111003"]
        parameters = [
            item.TextValue
            for item in items
            if item.ConceptNameCodeSequence[0].CodeValue == "111002"  # Algorithm Parameters
        ]
        assert parameters == ["prompt differential=default", "prompt report=paediatric"]
    # contributing equipment: the algorithm, with the same device UID
    (equipment,) = [i for i in sr.ContributingEquipmentSequence if i.Manufacturer == "cxrnode"]
    assert equipment.DeviceUID == device_uid(draft.model_hash)
    # a second parse of the written object gives the same tree
    assert hd.sr.ComprehensiveSR.from_dataset(parsed).SOPInstanceUID == sr.SOPInstanceUID


def test_tracking_uid_is_stable_across_rebuilds(
    rg1: Dataset, make_draft: Callable[..., ModelResult]
) -> None:
    def tracking_uid(sr: Dataset) -> str:
        (group,) = hd.sr.ComprehensiveSR.from_dataset(sr).content.get_image_measurement_groups()
        return group.tracking_uid

    assert tracking_uid(build_sr(rg1, make_draft())) == tracking_uid(build_sr(rg1, make_draft()))
    assert tracking_uid(build_sr(rg1, make_draft())) != tracking_uid(
        build_sr(rg1, make_draft(), version=2)
    )
