"""The Encapsulated PDF: a valid DICOM document in the study, and a PDF that says what the SR
and SC say, under the same banner on every page (read back with poppler's pdftotext)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset

from cxrnode.outputs.common import DRAFT_NOTICE, series_description
from cxrnode.outputs.pdf import BANNER_TEXT, build_pdf, render_pdf
from cxrnode.uids import OutputKind, output_uids
from model.contracts import ModelResult

ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"


def pdf_text(document: bytes, tmp_path: Path) -> list[str]:
    """The text of each page, as pdftotext reads it."""
    path = tmp_path / "draft.pdf"
    path.write_bytes(document)
    out = subprocess.run(
        ["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\f")[:-1]


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("case", ["real CR", "synthetic DX", "empty"])
def test_pdf_passes_dciodvfy_with_only_the_stale_device_uid_warnings(
    case: str,
    rg1: Dataset,
    synthetic: Callable[..., Dataset],
    make_draft: Callable[..., ModelResult],
    validate: Callable,
) -> None:
    source = rg1 if case == "real CR" else synthetic("DX")
    draft = (
        make_draft(report="", differential="", recommendation="", findings={})
        if case == "empty"
        else make_draft()
    )

    result = validate(build_pdf(source, draft))

    assert "EncapsulatedPDF" in result.output
    assert result.errors == [], result.output
    if case != "real CR":  # RG1's own referring physician name draws a PN warning
        assert result.unexpected_warnings == [], result.output


def test_pdf_object_is_a_draft_document_in_the_source_study(
    rg1: Dataset,
    make_draft: Callable[..., ModelResult],
    save: Callable[[Dataset, str], Path],
) -> None:
    ds = pydicom.dcmread(save(build_pdf(rg1, make_draft()), "pdf.dcm"))

    assert ds.SOPClassUID == ENCAPSULATED_PDF
    assert ds.Modality == "DOC"
    assert ds.SeriesDescription == series_description(OutputKind.PDF)
    assert ds.SeriesDescription.startswith("AI DRAFT REPORT (PDF)")
    assert (ds.StudyInstanceUID, ds.PatientID) == (rg1.StudyInstanceUID, rg1.PatientID)
    assert ds.SeriesInstanceUID != rg1.SeriesInstanceUID
    assert ds.VerificationFlag == "UNVERIFIED"
    assert ds.BurnedInAnnotation == "NO"  # no patient identifiers in the document
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert ds.ConceptNameCodeSequence[0].CodeValue == "18748-4"
    assert ds.SourceInstanceSequence[0].ReferencedSOPInstanceUID == rg1.SOPInstanceUID
    document = bytes(ds.EncapsulatedDocument)
    assert document.startswith(b"%PDF-")
    assert len(document) % 2 == 0
    assert document[: ds.EncapsulatedDocumentLength].rstrip().endswith(b"%%EOF")


def test_pdf_prints_the_banner_the_notice_the_coded_findings_and_every_section(
    make_draft: Callable[..., ModelResult], tmp_path: Path
) -> None:
    draft = make_draft(prompts={"report": "paediatric"})

    (page,) = pdf_text(render_pdf(draft), tmp_path)

    text = flat(page)
    assert BANNER_TEXT in text
    assert flat(DRAFT_NOTICE) in text
    assert "paediatric" in text
    assert "Present: Cardiomegaly, Pleural effusion" in text
    assert "Absent: Pneumothorax" in text
    assert "Undetermined: Pneumonia" in text
    for heading, body in (
        ("Findings", "The heart is enlarged. Small right pleural effusion. No pneumothorax."),
        ("Impression", "Cardiomegaly with a small right effusion."),
        ("Differential diagnosis", "Congestive heart failure; fluid overload."),
        ("Recommendation", "Follow-up radiograph after diuresis."),
    ):
        assert f"{heading} {body}" in text


def test_a_long_report_runs_over_pages_each_under_the_banner(
    make_draft: Callable[..., ModelResult], tmp_path: Path
) -> None:
    report = " ".join(f"Sentence {i}: the lungs are clear, no effusion." for i in range(400))

    pages = pdf_text(render_pdf(make_draft(report=report)), tmp_path)

    assert len(pages) > 2
    assert all(BANNER_TEXT in flat(page) for page in pages)
    assert all(f"page {n}/{len(pages)}" in page for n, page in enumerate(pages, start=1))
    assert "Sentence 399: the lungs are clear" in flat(" ".join(pages))


def test_an_empty_draft_says_so(make_draft: Callable[..., ModelResult], tmp_path: Path) -> None:
    empty = make_draft(report="", differential="", recommendation="", findings={})

    (page,) = pdf_text(render_pdf(empty), tmp_path)

    assert "The model returned no report text for this image." in flat(page)
    assert "None of the tracked findings was mentioned." in flat(page)


def test_pdf_uids_are_deterministic_per_version(
    synthetic: Callable[..., Dataset], make_draft: Callable[..., ModelResult]
) -> None:
    source, draft = synthetic("DX"), make_draft()

    first, again = build_pdf(source, draft), build_pdf(source, draft)
    second = build_pdf(source, draft, version=2)

    assert first.SOPInstanceUID == again.SOPInstanceUID
    assert first.SOPInstanceUID == (
        output_uids(
            study_instance_uid=source.StudyInstanceUID,
            source_sop_instance_uid=source.SOPInstanceUID,
            model_hash=draft.model_hash,
            pipeline_version=draft.pipeline_version,
            kind=OutputKind.PDF,
        ).sop_instance_uid
    )
    assert second.SeriesInstanceUID == first.SeriesInstanceUID
    assert second.SOPInstanceUID != first.SOPInstanceUID
    assert second.InstanceNumber == 2
