"""The text-report SR, what the radiologist reads: valid, marked as a draft, the notice first,
sections in reading order, coded findings as "Finding: Present" lines, lines of at most 100
characters, the source image where a viewer hides it."""

from __future__ import annotations

import html
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from highdicom.sr.utils import find_content_items
from pydicom import Dataset

from cxrnode.outputs.common import (
    DRAFT_NOTICE,
    EMPTY_REPORT_NOTE,
    FINDING_CONCEPTS,
    PAEDIATRIC_NOTE,
    STATE_VALUES,
    series_description,
)
from cxrnode.outputs.report_sr import build_report_sr
from cxrnode.outputs.text import REPORT_LINE_WIDTH
from cxrnode.uids import OutputKind, device_uid, output_uids
from model.contracts import ModelResult

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
LONG_FINDINGS = " ".join(
    f"Sentence {i}: the lungs are clear without focal consolidation, effusion or pneumothorax."
    for i in range(60)
)


def concept(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeMeaning)


def sections(sr: Dataset) -> dict[str, list[Dataset]]:
    """Section heading -> the items in it, in document order."""
    return {
        concept(item): list(item.ContentSequence)
        for item in sr.ContentSequence
        if item.ValueType == "CONTAINER"
    }


def texts(sr: Dataset) -> list[tuple[str, str]]:
    """(concept, text) of every TEXT item, depth first."""
    found = []

    def walk(items: list[Dataset]) -> None:
        for item in items:
            if item.ValueType == "TEXT":
                found.append((concept(item), str(item.TextValue)))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found


def words(text: str) -> list[str]:
    return text.split()


@pytest.mark.parametrize(
    "case",
    ["real CR", "synthetic DX", "synthetic CR", "all states", "long unicode", "tab", "empty"],
)
def test_every_text_report_passes_dciodvfy_with_only_the_stale_device_uid_warnings(
    case: str,
    rg1: Dataset,
    synthetic: Callable[..., Dataset],
    make_draft: Callable[..., ModelResult],
    validate: Callable,
) -> None:
    source = {"real CR": rg1, "synthetic CR": synthetic("CR")}.get(case, synthetic("DX"))
    draft = {
        "all states": make_draft(findings=ALL_STATES, differential=""),
        "long unicode": make_draft(
            report=f"Opacité rétrocardiaque — possible atélectasie ≥ 2 cm. {LONG_FINDINGS}",
            prompts={"report": "paediatric"},
        ),
        # the text that made dciodvfy reject an SR: a TAB in the model's answer
        "tab": make_draft(report="Findings:\tclear lungs.\r\nImpression:\tnormal\x00."),
        "empty": make_draft(report="", differential="", recommendation="", findings={}),
    }.get(case, make_draft())

    result = validate(build_report_sr(source, draft))

    assert "ComprehensiveSR" in result.output
    assert result.errors == [], result.output
    if case != "real CR":  # RG1's own referring physician name draws a PN warning
        assert result.unexpected_warnings == [], result.output


def test_text_report_is_a_diagnostic_imaging_report_marked_as_a_draft(
    rg1: Dataset, make_draft: Callable[..., ModelResult]
) -> None:
    sr = build_report_sr(rg1, make_draft())

    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    root = sr.ConceptNameCodeSequence[0]
    assert (root.CodeValue, root.CodingSchemeDesignator) == ("18748-4", "LN")
    assert sr.ContinuityOfContent == "SEPARATE"
    assert (sr.VerificationFlag, sr.PreliminaryFlag, sr.CompletionFlag) == (
        "UNVERIFIED",
        "PRELIMINARY",
        "COMPLETE",
    )
    assert "VerifyingObserverSequence" not in sr
    assert sr.SeriesDescription == series_description(OutputKind.TEXT_SR)
    assert sr.SeriesDescription == "AI DRAFT REPORT (TEXT) - NOT FOR DIAGNOSTIC USE"
    assert sr.SeriesNumber == 9901


def test_the_draft_notice_is_the_first_item_and_no_observer_lines_precede_it(
    rg1: Dataset, make_draft: Callable[..., ModelResult]
) -> None:
    draft = make_draft(prompts={"report": "paediatric"})
    sr = build_report_sr(rg1, draft)

    first, second = sr.ContentSequence[0], sr.ContentSequence[1]
    assert (concept(first), words(first.TextValue)) == ("Comment", words(DRAFT_NOTICE))
    assert (concept(second), words(second.TextValue)) == ("Comment", words(PAEDIATRIC_NOTE))
    relationships = {item.RelationshipType for item in sr.ContentSequence}
    assert relationships == {"CONTAINS"}  # no HAS OBS CONTEXT lines for a viewer to print
    # the device is the document's author instead, identified by the model's device UID
    (author,) = sr.AuthorObserverSequence
    assert (author.ObserverType, author.Manufacturer) == ("DEV", "cxrnode")
    assert author.DeviceUID == device_uid(draft.model_hash)
    assert author.ManufacturerModelName == "CXR-LLAVA-v2"


def test_sections_come_in_reading_order_with_the_report_text(
    rg1: Dataset, make_draft: Callable[..., ModelResult]
) -> None:
    sr = build_report_sr(rg1, make_draft())

    found = sections(sr)
    assert list(found) == [
        "Findings",
        "Impressions",
        "Differential Diagnosis/Impression",
        "Recommendations",
    ]
    assert (concept(found["Findings"][0]), found["Findings"][0].TextValue) == (
        "Finding",
        "The heart is enlarged. Small right pleural effusion. No pneumothorax.",
    )
    (impression,) = found["Impressions"]
    assert (concept(impression), impression.TextValue) == (
        "Impression",
        "Cardiomegaly with a small right effusion.",
    )
    (differential,) = found["Differential Diagnosis/Impression"]
    assert differential.TextValue == "Congestive heart failure; fluid overload."
    (recommendation,) = found["Recommendations"]
    assert (concept(recommendation), recommendation.TextValue) == (
        "Recommendation",
        "Follow-up radiograph after diuresis.",
    )


def test_a_report_without_an_impression_has_no_impression_section(
    rg1: Dataset, make_draft: Callable[..., ModelResult]
) -> None:
    sr = build_report_sr(rg1, make_draft(report="The lungs are clear.", differential=""))

    assert list(sections(sr)) == ["Findings", "Recommendations"]


def test_each_mentioned_finding_is_a_code_item_under_findings(
    synthetic: Callable[..., Dataset], make_draft: Callable[..., ModelResult]
) -> None:
    sr = build_report_sr(synthetic("DX"), make_draft(findings=ALL_STATES))

    coded = {
        (item.ConceptNameCodeSequence[0].CodeValue, item.ConceptCodeSequence[0].CodeValue)
        for item in sections(sr)["Findings"]
        if item.ValueType == "CODE"
    }
    assert coded == {
        (FINDING_CONCEPTS[name].value, STATE_VALUES[state].value)
        for name, state in ALL_STATES.items()
        if state != "not_mentioned"
    }
    meanings = [
        (concept(item), item.ConceptCodeSequence[0].CodeMeaning)
        for item in sections(sr)["Findings"]
        if item.ValueType == "CODE"
    ]
    assert ("Lung consolidation", "Undetermined") in meanings  # what a viewer prints


def test_the_source_image_is_referenced_beneath_the_findings_text(
    rg1: Dataset, make_draft: Callable[..., ModelResult]
) -> None:
    sr = build_report_sr(rg1, make_draft())

    findings_text = sections(sr)["Findings"][0]
    (image,) = findings_text.ContentSequence
    assert (image.ValueType, image.RelationshipType) == ("IMAGE", "INFERRED FROM")
    reference = image.ReferencedSOPSequence[0]
    assert reference.ReferencedSOPInstanceUID == rg1.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == rg1.SOPClassUID
    # never directly in a section, where OHIF prints "[IMAGE is not supported]"
    for items in sections(sr).values():
        assert all(item.ValueType != "IMAGE" for item in items)
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[
        0
    ].ReferencedSOPInstanceUID == (rg1.SOPInstanceUID)


def test_without_findings_text_the_image_goes_beneath_the_impression(
    rg1: Dataset, make_draft: Callable[..., ModelResult]
) -> None:
    sr = build_report_sr(rg1, make_draft(report="Impression: normal chest.", findings={}))

    found = sections(sr)
    assert "Findings" not in found
    (impression,) = found["Impressions"]
    assert impression.ContentSequence[0].ValueType == "IMAGE"


def test_an_empty_draft_says_so_in_the_findings_section(
    synthetic: Callable[..., Dataset], make_draft: Callable[..., ModelResult]
) -> None:
    sr = build_report_sr(
        synthetic("DX"), make_draft(report="", differential="", recommendation="", findings={})
    )

    assert list(sections(sr)) == ["Findings"]
    (note,) = sections(sr)["Findings"]
    assert (concept(note), note.TextValue) == ("Comment", EMPTY_REPORT_NOTE)
    assert note.ContentSequence[0].ValueType == "IMAGE"


def test_every_line_has_at_most_100_characters_and_no_word_is_lost(
    synthetic: Callable[..., Dataset], make_draft: Callable[..., ModelResult]
) -> None:
    report = f"Opacité rétrocardiaque — atélectasie ≥ 2 cm. {LONG_FINDINGS} " + "x" * 250
    sr = build_report_sr(synthetic("DX"), make_draft(report=report))

    for _, text in texts(sr):
        assert all(len(line) <= 100 for line in text.split("\n")), text
    (findings,) = [text for name, text in texts(sr) if name == "Finding"]
    assert len(findings.split("\n")) > 10
    assert "".join(findings.split()) == "".join(report.split())
    # lines break at spaces: only the 250-character word is split
    lines = findings.split("\n")
    assert lines[-3:] == ["x" * REPORT_LINE_WIDTH, "x" * REPORT_LINE_WIDTH, "x" * 50]


def test_unicode_survives_the_round_trip(
    synthetic: Callable[..., Dataset],
    make_draft: Callable[..., ModelResult],
    save: Callable[[Dataset, str], Path],
) -> None:
    report = "Opacité rétrocardiaque — atélectasie ≥ 2 cm; 右下葉の浸潤影."
    reread = pydicom.dcmread(
        save(build_report_sr(synthetic("DX"), make_draft(report=report)), "t.dcm")
    )

    assert reread.SpecificCharacterSet == "ISO_IR 192"
    assert ("Finding", report) in texts(reread)


def test_dsr2html_renders_the_document_as_a_reader_sees_it(
    rg1: Dataset,
    make_draft: Callable[..., ModelResult],
    save: Callable[[Dataset, str], Path],
    tmp_path: Path,
) -> None:
    path = save(build_report_sr(rg1, make_draft()), "report.dcm")

    page = tmp_path / "report.html"
    rendered = subprocess.run(
        ["dsr2html", str(path), str(page)], capture_output=True, text=True, timeout=60
    )
    assert rendered.returncode == 0, rendered.stderr
    markup = page.read_text(encoding="utf-8")
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", markup)).split())
    assert "Diagnostic imaging report" in text
    assert " ".join(DRAFT_NOTICE.split()) in text
    assert "The heart is enlarged." in text
    assert "Cardiomegaly:" in text and "Present (52101004, SCT)" in text


def test_text_report_joins_the_source_study_and_copies_only_patient_and_study(
    synthetic: Callable[..., Dataset], make_draft: Callable[..., ModelResult]
) -> None:
    source = synthetic(
        "DX",
        extra={
            "InstitutionName": "LEAK INSTITUTION",
            "StationName": "LEAKSTATION",
            "Manufacturer": "LEAK VENDOR",
            "OperatorsName": "LEAK^OPERATOR",
            "PatientName": "KEEP^PATIENT",
            "AccessionNumber": "KEEPACC",
        },
    )

    sr = build_report_sr(source, make_draft())

    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    strings = [
        str(e.value) for e in sr.iterall() if isinstance(e.value, str | pydicom.valuerep.PersonName)
    ]
    assert [s for s in strings if "LEAK" in s] == []
    assert {"KEEP^PATIENT", "KEEPACC"} <= set(strings)


def test_uids_are_deterministic_and_a_new_version_names_its_predecessor(
    rg1: Dataset, make_draft: Callable[..., ModelResult], validate: Callable
) -> None:
    draft = make_draft()
    first = build_report_sr(rg1, draft)
    again = build_report_sr(rg1, draft)
    second = build_report_sr(rg1, draft, version=2, predecessor=first)

    expected = output_uids(
        study_instance_uid=rg1.StudyInstanceUID,
        source_sop_instance_uid=rg1.SOPInstanceUID,
        model_hash=draft.model_hash,
        pipeline_version=draft.pipeline_version,
        kind=OutputKind.TEXT_SR,
    )
    assert first.SOPInstanceUID == again.SOPInstanceUID == expected.sop_instance_uid
    assert second.SeriesInstanceUID == first.SeriesInstanceUID
    assert (first.InstanceNumber, second.InstanceNumber) == (1, 2)
    reference = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert reference.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert validate(second).errors == []
    with pytest.raises(ValueError, match="higher version"):
        build_report_sr(rg1, draft, predecessor=first)


def test_highdicom_reads_back_the_whole_tree_and_every_referenced_image_is_evidence(
    rg1: Dataset, make_draft: Callable[..., ModelResult]
) -> None:
    """The content tree goes in after highdicom's constructor (it cost 8 of 11 ms a study
    there); what the constructor would have checked of it is checked here."""
    sr = build_report_sr(rg1, make_draft(findings=ALL_STATES), version=1)

    parsed = hd.sr.ComprehensiveSR.from_dataset(sr)  # parses every content item
    every_item = find_content_items(parsed, recursive=True)
    assert len(every_item) == len(find_content_items(sr, recursive=True)) > 15
    assert [concept(item) for item in parsed.content[0].ContentSequence] == [
        concept(item) for item in sr.ContentSequence
    ]
    images = find_content_items(sr, value_type=hd.sr.ValueTypeValues.IMAGE, recursive=True)
    referenced = {image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for image in images}
    (study,) = sr.CurrentRequestedProcedureEvidenceSequence
    listed = {
        instance.ReferencedSOPInstanceUID
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }
    assert referenced == listed == {rg1.SOPInstanceUID}
