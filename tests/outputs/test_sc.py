"""The AI draft Secondary Capture: valid, burned-in banner, readable panel, same study."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import Dataset

import cxrnode.outputs.common as common_module
import cxrnode.outputs.sc as sc_module
from cxrnode.outputs.common import font_path, series_description
from cxrnode.outputs.sc import (
    BANNER_HEIGHT,
    CANVAS_HEIGHT,
    PANEL_WIDTH,
    build_sc,
    full_text_hint,
    render_draft_image,
    wrap_text,
)
from cxrnode.uids import OutputKind, output_uids
from model.contracts import ModelResult

ASSETS = Path(sc_module.__file__).parent / "assets"


def _display(rows: int = 120, cols: int = 100) -> np.ndarray:
    """A grey ramp: dark left, bright right (the panel and banner must not depend on it)."""
    return np.tile(np.linspace(0, 255, cols).astype(np.uint8), (rows, 1))


def _banner_is_red(pixels: np.ndarray) -> bool:
    banner = pixels[:BANNER_HEIGHT].reshape(-1, 3).astype(int)
    red = (banner[:, 0] > 150) & (banner[:, 1] < 60) & (banner[:, 2] < 60)
    white = (banner > 200).all(axis=1)
    return bool(red.mean() > 0.6 and white.mean() > 0.02)  # red field with white lettering


def _panel(pixels: np.ndarray) -> np.ndarray:
    return pixels[BANNER_HEIGHT:, -PANEL_WIDTH:]


def test_sc_of_the_real_chest_passes_dciodvfy_and_carries_the_draft_markings(
    rg1: Dataset,
    rg1_display: np.ndarray,
    make_draft: Callable[..., ModelResult],
    validate: Callable,
    save: Callable[[Dataset, str], Path],
) -> None:
    sc = build_sc(rg1, rg1_display, make_draft())

    result = validate(sc)
    assert "SCImage" in result.output
    assert result.errors == [], result.output

    reread = pydicom.dcmread(save(sc, "sc.dcm"))
    assert reread.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert reread.BurnedInAnnotation == "YES"
    assert reread.SeriesDescription == series_description(OutputKind.SC)
    assert reread.StudyInstanceUID == rg1.StudyInstanceUID
    assert reread.PatientID == rg1.PatientID
    assert reread.SeriesInstanceUID != rg1.SeriesInstanceUID
    assert reread.SourceImageSequence[0].ReferencedSOPInstanceUID == rg1.SOPInstanceUID
    assert (reread.PhotometricInterpretation, reread.BitsAllocated) == ("RGB", 8)
    assert reread.Rows == CANVAS_HEIGHT
    assert _banner_is_red(reread.pixel_array)


@pytest.mark.parametrize("modality", ["DX", "CR"])
def test_sc_of_synthetic_sources_passes_dciodvfy_with_only_stale_warnings(
    modality: str,
    synthetic: Callable[..., Dataset],
    make_draft: Callable[..., ModelResult],
    validate: Callable,
) -> None:
    source = synthetic(modality)
    draft = make_draft(
        report="Opacité rétrocardiaque — atélectasie probable. " * 80,
        differential="",
        prompts={"report": "paediatric"},
        findings={"atelectasis": "uncertain", "no_finding": "absent", "edema": "present"},
    )

    result = validate(build_sc(source, _display(), draft))

    assert result.errors == [], result.output
    assert result.unexpected_warnings == [], result.output


def test_radiograph_is_scaled_to_the_canvas_beside_the_panel(
    make_draft: Callable[..., ModelResult],
) -> None:
    display = _display(rows=120, cols=100)

    pixels = render_draft_image(display, make_draft())

    image_height = CANVAS_HEIGHT - BANNER_HEIGHT
    image_width = round(100 * image_height / 120)
    assert pixels.shape == (CANVAS_HEIGHT, image_width + PANEL_WIDTH, 3)
    region = pixels[BANNER_HEIGHT:, :image_width]
    assert (region[..., 0] == region[..., 1]).all()  # grey, unchanged by the overlay
    expected = np.asarray(
        Image.fromarray(display).resize((image_width, image_height), Image.Resampling.LANCZOS)
    )
    assert np.abs(region[..., 0].astype(int) - expected).max() <= 1


def test_panel_prints_text_and_more_text_prints_more(
    make_draft: Callable[..., ModelResult],
) -> None:
    short = render_draft_image(_display(), make_draft(report="Normal chest.", differential=""))
    long = render_draft_image(
        _display(), make_draft(report="Normal chest. " + "The lungs are clear. " * 30)
    )

    def ink(pixels: np.ndarray) -> int:
        return int((_panel(pixels).max(axis=2) > 128).sum())

    assert ink(short) > 500
    assert ink(long) > ink(short) * 1.5


def test_text_longer_than_the_panel_is_cut_inside_the_canvas(
    make_draft: Callable[..., ModelResult],
) -> None:
    endless = "The lungs are clear bilaterally without focal consolidation. " * 400

    pixels = render_draft_image(_display(), make_draft(report=endless))

    assert pixels.shape[0] == CANVAS_HEIGHT
    assert _banner_is_red(pixels)


def test_empty_draft_still_renders_banner_and_a_note(
    make_draft: Callable[..., ModelResult],
) -> None:
    empty = make_draft(report="", differential="", recommendation="", findings={})

    pixels = render_draft_image(_display(), empty)

    assert _banner_is_red(pixels)
    assert int((_panel(pixels).max(axis=2) > 128).sum()) > 200


def test_wrap_text_keeps_every_line_inside_the_width_and_loses_no_word() -> None:
    font = sc_module._font(21)
    text = "Opacité " * 40 + "\n" + "x" * 300 + " end"

    lines = wrap_text(text, font, 400)

    assert all(font.getlength(line) <= 400 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "").replace("\n", "")


def test_bundled_font_is_used_where_the_debian_font_is_missing(
    monkeypatch: pytest.MonkeyPatch, make_draft: Callable[..., ModelResult]
) -> None:
    monkeypatch.setattr(common_module, "_SYSTEM_FONT", Path("/nonexistent/DejaVuSans.ttf"))
    sc_module._font.cache_clear()
    try:
        assert font_path() == ASSETS / "DejaVuSans.ttf"
        pixels = render_draft_image(_display(), make_draft())
    finally:
        sc_module._font.cache_clear()

    assert _banner_is_red(pixels)
    assert (ASSETS / "LICENSE-DejaVu.txt").read_text().count("Bitstream") > 3


def test_display_that_is_not_8_bit_grey_is_refused_with_what_was_expected(
    rg1: Dataset, make_draft: Callable[..., ModelResult]
) -> None:
    with pytest.raises(ValueError, match="uint8"):
        build_sc(rg1, np.zeros((10, 10), dtype=np.uint16), make_draft())
    with pytest.raises(ValueError, match="H x W"):
        build_sc(rg1, np.zeros((10, 10, 3), dtype=np.uint8), make_draft())


def test_sc_uids_are_deterministic_and_distinct_from_the_sr(
    synthetic: Callable[..., Dataset], make_draft: Callable[..., ModelResult]
) -> None:
    source = synthetic("DX")
    draft = make_draft()

    first = build_sc(source, _display(), draft)
    again = build_sc(source, _display(), draft)
    second = build_sc(source, _display(), draft, version=2)

    assert first.SOPInstanceUID == again.SOPInstanceUID
    assert first.SOPInstanceUID == (
        output_uids(
            study_instance_uid=source.StudyInstanceUID,
            source_sop_instance_uid=source.SOPInstanceUID,
            model_hash=draft.model_hash,
            pipeline_version=draft.pipeline_version,
            kind=OutputKind.SC,
        ).sop_instance_uid
    )
    assert second.SOPInstanceUID != first.SOPInstanceUID
    assert second.SeriesInstanceUID == first.SeriesInstanceUID
    assert second.InstanceNumber == 2


def test_sc_copies_nothing_but_patient_and_study_from_the_source(
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
        },
    )

    sc = build_sc(source, _display(), make_draft())

    strings = [
        str(e.value) for e in sc.iterall() if isinstance(e.value, str | pydicom.valuerep.PersonName)
    ]
    assert [s for s in strings if "LEAK" in s] == []
    assert "KEEP^PATIENT" in strings


def test_footer_names_the_series_that_holds_the_full_text(
    make_draft: Callable[..., ModelResult],
) -> None:
    text_report = series_description(OutputKind.TEXT_SR)

    assert f'Full text: series "{text_report}".' in full_text_hint(text_report)
    assert "series" not in full_text_hint(None)
    assert "Not for diagnostic use" in full_text_hint(None)
    with_hint = render_draft_image(_display(), make_draft(), text_report)
    without = render_draft_image(_display(), make_draft(), None)
    footer = slice(CANVAS_HEIGHT - 80, CANVAS_HEIGHT)
    assert (with_hint[footer] != without[footer]).any()  # the hint is printed
    assert (with_hint[: CANVAS_HEIGHT - 80] == without[: CANVAS_HEIGHT - 80]).all()


def test_control_characters_and_tabs_never_reach_the_panel(
    make_draft: Callable[..., ModelResult],
) -> None:
    messy = render_draft_image(_display(), make_draft(report="Clear\tlungs.\x00\x1b[31m"))
    clean = render_draft_image(_display(), make_draft(report="Clear lungs.[31m"))

    assert (messy == clean).all()
