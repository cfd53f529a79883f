"""What the radiologist sees: the node's outputs opened in OHIF 3.13.2, in a real browser.

Everything is real and nothing is mocked: Orthanc 1.10 with its DICOMweb plugin is the PACS
(routing chest radiographs to the node with the demo PACS's Lua script), dcmtk ``storescu``
is the modality, ``cxrnode serve`` runs the tiny checkpoint, OHIF's own build is served on
one origin with Orthanc's DICOMweb (tests/viewer/ohif.py), and Debian's Chromium renders it.
Each output series is opened the way a reader opens it (double-click in the study browser),
screenshotted into the artifacts directory, and checked: no console error, no error toast,
no failed request; the text report shows the notice, the findings text and every coded
finding, with no line running out of its box; the SC and the PDF draw their red banner.

The chest radiograph is pydicom-data's RG1 (a real CR PA chest) with a usable Pixel Spacing:
its own is 0\\0, which makes OHIF draw the CR black. 0.256 mm is its 500 mm plate over 1955
rows.
"""

from __future__ import annotations

import io
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dicomgen
import highdicom as hd
import pydicom
import pytest
from browser import OhifPage, flat, red_fraction, spread
from dicom_checks import dciodvfy
from nodedb import jobs
from ohif import ViewerServer
from orthanc_server import Orthanc
from playwright.sync_api import BrowserContext
from pydicom.uid import generate_uid
from services import Node

from cxrnode.outputs.build import PIPELINE_VERSION, make_objects
from cxrnode.outputs.common import (
    DRAFT_NOTICE,
    EMPTY_REPORT_NOTE,
    FINDING_CONCEPTS,
    STATE_VALUES,
    series_description,
)
from cxrnode.outputs.text import report_text
from cxrnode.prepare.display import display_image
from cxrnode.settings import Settings
from model.contracts import ModelResult

pytestmark = pytest.mark.slow

STORESCU = "/usr/bin/storescu"
TEXT_SR, SC, AIR_SR, PDF = 9901, 9902, 9903, 9904  # series numbers (cxrnode.outputs.common)

#: A draft whose text is known: every finding state, a TAB, Unicode, lines longer than 100
#: characters. The tiny checkpoint writes random tokens, so this is what makes readable
#: screenshots and checks coded findings that the tiny model seldom produces.
KNOWN_DRAFT = ModelResult(
    report=(
        "Findings: The heart is enlarged, with a cardiothoracic ratio of about 0.6.\tSmall right "
        "pleural effusion blunting the costophrenic angle. Patchy opacity in the right lower "
        "zone, possibly consolidation or atelectasis. No pneumothorax. Pulmonary vessels are "
        "prominent in the upper zones (upper-lobe diversion ≥ grade 1) without frank oedema. "
        "Impression: Cardiomegaly with a small right pleural effusion and right basal opacity."
    ),
    differential="Congestive heart failure; right lower lobe pneumonia; atelectasis.",
    recommendation="Clinical correlation; follow-up radiograph after diuresis.",
    findings={
        "cardiomegaly": "present",
        "pleural_effusion": "present",
        "consolidation": "uncertain",
        "atelectasis": "uncertain",
        "pneumothorax": "absent",
        "edema": "absent",
    },
    model_id="/models/ECOFRI/CXR-LLAVA-v2",
    model_hash="7c" * 32,
    pipeline_version=PIPELINE_VERSION,
)


# ------------------------------------------------------------------------------- helpers


def chest_radiograph(path: Path, *, new_study: bool = False) -> Path:
    """RG1 with a Pixel Spacing OHIF can use (see the module docstring)."""
    ds = pydicom.dcmread(dicomgen.pydicom_data_chest("RG1_UNCR"))
    ds.PixelSpacing = ["0.256", "0.256"]
    if new_study:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(path, enforce_file_format=True)
    return path


def send_to_pacs(orthanc: Orthanc, path: Path) -> None:
    """The modality: dcmtk storescu to the PACS, which routes the radiograph to the node."""
    sent = subprocess.run(
        [
            STORESCU,
            "-aet",
            "MODALITY",
            "-aec",
            orthanc.aet,
            "127.0.0.1",
            str(orthanc.dicom_port),
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sent.returncode == 0, sent.stderr


def wait_for_series(
    orthanc: Orthanc, study_uid: str, numbers: set[int], *logs: Callable[[], str]
) -> dict[int, dict]:
    """The study's instances in the PACS by series number, once ``numbers`` are all there."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = {
            int(i["Tags"].get("SeriesNumber", 0)): i for i in orthanc.instances_of_study(study_uid)
        }
        if numbers <= set(found):
            return found
        time.sleep(0.5)
    tails = "\n\n".join(log()[-4000:] for log in logs)
    raise AssertionError(f"series {sorted(numbers)} did not reach the PACS\n{tails}")


@contextmanager
def ohif_on(
    orthanc: Orthanc, app: Path, chromium: BrowserContext, artifacts: Path
) -> Iterator[OhifPage]:
    """OHIF served for ``orthanc``, one tab open; no request to the PACS may fail."""
    server = ViewerServer(app, orthanc.url).start()
    try:
        yield OhifPage(chromium, server.url, artifacts)
        failed = [(path, status) for path, status in server.requests if status >= 400]
        assert failed == [], f"requests the PACS refused: {failed}"
    finally:
        server.stop()


# --------------------------------------------------------------- what a reader must see


def check_text_report(viewer: OhifPage, draft: ModelResult, screenshot: str) -> None:
    """The text report opens as text: notice first, findings text, every coded finding,
    no line running out of its box, no "[IMAGE is not supported]"."""
    viewport = viewer.open_series(TEXT_SR)
    viewer.wait_until(
        lambda: "Diagnostic imaging report" in viewport.inner_text(), what="the text report"
    )
    viewer.page.wait_for_timeout(500)
    viewer.screenshot(screenshot)
    text = flat(viewport.inner_text())

    notice = flat(report_text(DRAFT_NOTICE))
    assert notice in text
    assert text.index(notice) < text.index("Findings"), "the notice comes first"
    findings, impression = (report_text(part) for part in draft.sections)
    if findings:
        assert flat(findings) in text
    elif not impression:
        assert flat(EMPTY_REPORT_NOTE) in text
    if impression:
        assert flat(impression) in text
    for name, state in draft.findings.items():
        if state != "not_mentioned":
            expected = f"{FINDING_CONCEPTS[name].meaning}: {STATE_VALUES[state].meaning}"
            assert expected in text, expected
    assert "is not supported" not in text
    overflow = viewport.evaluate(
        "pane => Array.from(pane.querySelectorAll('pre, span, div'))"
        ".filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.innerText.slice(0, 80))"
    )
    assert overflow == [], f"text running out of its box: {overflow}"


def check_secondary_capture(viewer: OhifPage, screenshot: str) -> None:
    """The SC draws: radiograph and report panel under the red banner."""
    viewport = viewer.open_series(SC)
    viewer.wait_until(
        lambda: red_fraction(viewport.screenshot()) > 0.01, what="the SC with its red banner"
    )
    viewer.page.wait_for_timeout(500)
    viewer.screenshot(screenshot)
    picture = viewport.screenshot()
    assert spread(picture) > 30  # radiograph and text, not a blank viewport
    assert series_description("sc") in viewport.inner_text()  # OHIF's overlay


def check_pdf(viewer: OhifPage, screenshot: str) -> None:
    """OHIF's PDF viewport shows the document, banner first."""
    viewport = viewer.open_series(PDF)
    document = viewport.locator('object[type="application/pdf"]')
    document.wait_for(timeout=30_000)
    viewer.wait_until(
        lambda: (document.get_attribute("data") or "").startswith("blob:"),
        what="the PDF fetched as bulk data",
    )
    viewer.wait_until(
        lambda: red_fraction(viewport.screenshot()) > 0.005, what="the PDF's red banner drawn"
    )
    viewer.page.wait_for_timeout(500)
    viewer.screenshot(screenshot)


def check_structured_sr(path: Path) -> hd.sr.ComprehensiveSR:
    """The TID 1500 SR, for machines: dciodvfy-clean and parsed back by highdicom."""
    assert dciodvfy(path).errors == []
    sr = hd.sr.ComprehensiveSR.from_dataset(pydicom.dcmread(path))
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"
    (group,) = sr.content.get_image_measurement_groups()
    assert group.tracking_uid and group.source_images
    (observer,) = sr.content.get_observer_contexts()
    assert observer.observer_type.value == "121007"  # Device
    return sr


# --------------------------------------------------------------------------------- tests


def test_the_radiologist_reads_the_nodes_draft_in_ohif(
    e2e_node: Callable[..., Node],
    orthanc: Orthanc,
    ohif_app: Path,
    chromium: BrowserContext,
    artifacts: Path,
    tmp_path: Path,
) -> None:
    node = e2e_node(max_new_tokens="64")  # default OUTPUTS: text_sr,sc
    orthanc.start()
    node.start()
    chest = chest_radiograph(tmp_path / "chest.dcm")
    study_uid = str(pydicom.dcmread(chest, stop_before_pixels=True).StudyInstanceUID)

    send_to_pacs(orthanc, chest)
    found = wait_for_series(orthanc, study_uid, {TEXT_SR, SC}, node.log, orthanc.log)

    assert AIR_SR not in found and PDF not in found  # opt-in only
    (job,) = jobs(node)
    draft = ModelResult.from_dict(job.result).for_pipeline(PIPELINE_VERSION)
    with ohif_on(orthanc, ohif_app, chromium, artifacts) as viewer:
        viewer.open_study(study_uid)
        viewer.screenshot("node-study-browser")
        check_text_report(viewer, draft, "node-text-report")
        check_secondary_capture(viewer, "node-secondary-capture")
        assert viewer.problems() == []


def test_a_known_draft_reads_as_written_and_the_structured_sr_stays_for_machines(
    orthanc: Orthanc,
    ohif_app: Path,
    chromium: BrowserContext,
    artifacts: Path,
    tmp_path: Path,
) -> None:
    orthanc.start()
    chest = pydicom.dcmread(chest_radiograph(tmp_path / "chest.dcm", new_study=True))
    objects = make_objects(
        chest,
        display_image(chest),
        KNOWN_DRAFT,
        version=1,
        predecessors={},
        settings=Settings(outputs="text_sr,sc,pdf,air_sr", data_dir=tmp_path / "node"),
    )
    for ds in [chest, *(ds for _, ds in objects)]:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        orthanc.post("/instances", buffer.getvalue())
    found = wait_for_series(orthanc, chest.StudyInstanceUID, {1, TEXT_SR, SC, AIR_SR, PDF})
    structured = tmp_path / "structured.dcm"
    structured.write_bytes(orthanc.file(found[AIR_SR]["ID"]))
    check_structured_sr(structured)

    with ohif_on(orthanc, ohif_app, chromium, artifacts) as viewer:
        viewer.open_study(chest.StudyInstanceUID)
        viewer.screenshot("study-browser")
        check_text_report(viewer, KNOWN_DRAFT, "text-report")
        check_secondary_capture(viewer, "secondary-capture")
        check_pdf(viewer, "pdf-report")
        assert viewer.problems() == []

        # Why the structured SR is opt-in: OHIF 3.13 fails on it. This also shows that the
        # checks above would see such a failure.
        viewer.open_series(AIR_SR)
        viewer.wait_until(lambda: viewer.problems(), what="OHIF's error on the TID 1500 SR")
        viewer.screenshot("structured-sr-is-not-for-readers")
        assert any(
            "ReferencedSOPSequence" in p or "Something went wrong" in p for p in viewer.problems()
        )


def test_a_site_that_enables_the_pdf_and_the_structured_sr_gets_both(
    e2e_node: Callable[..., Node],
    orthanc: Orthanc,
    ohif_app: Path,
    chromium: BrowserContext,
    artifacts: Path,
    tmp_path: Path,
) -> None:
    node = e2e_node(outputs="text_sr,sc,pdf,air_sr")
    orthanc.start()
    node.start()
    chest = chest_radiograph(tmp_path / "chest.dcm")
    study_uid = str(pydicom.dcmread(chest, stop_before_pixels=True).StudyInstanceUID)

    send_to_pacs(orthanc, chest)
    found = wait_for_series(orthanc, study_uid, {TEXT_SR, SC, AIR_SR, PDF}, node.log, orthanc.log)

    for number in (TEXT_SR, SC, PDF, AIR_SR):
        path = tmp_path / f"{number}.dcm"
        path.write_bytes(orthanc.file(found[number]["ID"]))
        assert dciodvfy(path).errors == [], number
    check_structured_sr(tmp_path / f"{AIR_SR}.dcm")
    with ohif_on(orthanc, ohif_app, chromium, artifacts) as viewer:
        viewer.open_study(study_uid)
        check_pdf(viewer, "node-pdf-report")
        assert viewer.problems() == []
