"""The AI draft report burned into a Secondary Capture image.

Why an SC as well as the SR: every PACS viewer shows images, not every one renders SR.
The SC shows the radiograph (display-processed, height about 1024 px) beside a panel with
the draft text and coded findings, under a red banner "AI DRAFT — NOT VERIFIED".

Choices:

- **RGB, 8 bit, uncompressed (Explicit VR Little Endian).** Colour lets the banner be
  unmistakable (white on red) and viewers do not window/level RGB, so the text panel
  cannot be made unreadable by a grey-scale window. Uncompressed is accepted by every
  PACS; a typical SC is about 5 MB, half a DX input.
- **BurnedInAnnotation = YES** (highdicom does not set it). The banner and the report text
  are burned into the pixels. Strictly, the attribute speaks of annotation that identifies
  the patient, which ours does not contain; YES is the conservative value that tells
  de-identification tools and viewers the pixels carry text, as the project's spec asks.
- **Same patient and study as the source**, new series (deterministic UIDs, see
  :mod:`cxrnode.uids`), SeriesDescription "AI DRAFT - NOT FOR DIAGNOSTIC USE ...", the
  source image referenced in Source Image Sequence, ConversionType WSD (rendered by a
  workstation). Only the patient/study attributes are copied from the source.
- **Font**: DejaVu Sans from Debian's fonts-dejavu-core, or the copy bundled in
  ``cxrnode/outputs/assets`` (Bitstream Vera licence, see ``LICENSE-DejaVu.txt``) where the
  package is absent. Text is word-wrapped to the panel; what does not fit is cut with a
  note that the SR holds the full text.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from cxrnode.outputs.draft import DraftReport
from cxrnode.outputs.findings_sr import (
    ALGORITHM_FAMILY,
    CHARACTER_SET,
    EMPTY_REPORT_NOTE,
    MANUFACTURER,
    PAEDIATRIC_NOTE,
    ai_contributing_equipment,
    clean_text,
    drop_acquisition_equipment,
    series_description,
    software_versions,
    source_view,
    without_name_warnings,
)
from cxrnode.uids import OutputKind, output_uids

__all__ = [
    "BANNER_HEIGHT",
    "BANNER_TEXT",
    "CANVAS_HEIGHT",
    "SC_SERIES_NUMBER",
    "build_sc",
    "font_path",
    "render_draft_image",
    "wrap_text",
]

SC_SERIES_NUMBER = 9902
CANVAS_HEIGHT = 1024
BANNER_HEIGHT = 64
PANEL_WIDTH = 880
MAX_IMAGE_WIDTH = 1200
MARGIN = 24

BANNER_TEXT = "AI DRAFT — NOT VERIFIED — NOT FOR DIAGNOSTIC USE"
BANNER_RGB = (200, 0, 0)
BANNER_TEXT_RGB = (255, 255, 255)
PANEL_RGB = (16, 16, 16)
TEXT_RGB = (235, 235, 235)
HEADING_RGB = (255, 196, 0)
NOTE_RGB = (255, 120, 120)

_SYSTEM_FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
_STATE_LABELS = (("present", "Present"), ("absent", "Absent"), ("uncertain", "Uncertain"))


def font_path() -> Path:
    """DejaVu Sans: the Debian package's file if installed, else the bundled copy."""
    if _SYSTEM_FONT.is_file():
        return _SYSTEM_FONT
    return Path(str(resources.files("cxrnode.outputs") / "assets" / "DejaVuSans.ttf"))


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_path()), size)


def wrap_text(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Break ``text`` into lines no wider than ``width`` pixels in ``font``.

    Line breaks in the text start new lines; words longer than a line are split.
    """
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while font.getlength(word) > width:  # a word wider than the panel
                cut = _longest_prefix(word, font, width)
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def _longest_prefix(word: str, font: ImageFont.FreeTypeFont, width: int) -> int:
    cut = 1
    while cut < len(word) and font.getlength(word[: cut + 1]) <= width:
        cut += 1
    return cut


def render_draft_image(display: np.ndarray, draft: DraftReport) -> np.ndarray:
    """Compose banner, radiograph and report panel into one RGB image.

    Parameters
    ----------
    display
        The radiograph as 8-bit grey (``uint8``, H x W, lungs dark), e.g. from
        ``cxrnode.prepare.display.display_image``.
    draft
        The draft to print.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of shape (``CANVAS_HEIGHT``, W, 3).

    Raises
    ------
    ValueError
        If ``display`` is not a non-empty 2-D ``uint8`` array.
    """
    display = np.asarray(display)
    if display.ndim == 3 and display.shape[2] == 1:
        display = display[:, :, 0]
    if display.dtype != np.uint8 or display.ndim != 2 or min(display.shape) == 0:
        raise ValueError(
            "display must be an 8-bit grey image (numpy uint8, shape H x W, lungs dark), "
            f"as made by cxrnode.prepare.display.display_image; got dtype {display.dtype}, "
            f"shape {display.shape}"
        )
    image_height = CANVAS_HEIGHT - BANNER_HEIGHT
    scale = min(image_height / display.shape[0], MAX_IMAGE_WIDTH / display.shape[1])
    size = (max(1, round(display.shape[1] * scale)), max(1, round(display.shape[0] * scale)))
    radiograph = Image.fromarray(display, mode="L").resize(size, Image.Resampling.LANCZOS)

    width = size[0] + PANEL_WIDTH
    canvas = Image.new("RGB", (width, CANVAS_HEIGHT), PANEL_RGB)
    canvas.paste(radiograph.convert("RGB"), (0, BANNER_HEIGHT + (image_height - size[1]) // 2))
    draw = ImageDraw.Draw(canvas)
    _draw_banner(draw, width)
    _draw_panel(draw, draft, left=size[0] + MARGIN, top=BANNER_HEIGHT + MARGIN)
    return np.asarray(canvas, dtype=np.uint8)


def _draw_banner(draw: ImageDraw.ImageDraw, width: int) -> None:
    draw.rectangle((0, 0, width - 1, BANNER_HEIGHT - 1), fill=BANNER_RGB)
    size = 38
    while size > 12 and _font(size).getlength(BANNER_TEXT) > width - 2 * MARGIN:
        size -= 2
    draw.text(
        (width // 2, BANNER_HEIGHT // 2),
        BANNER_TEXT,
        font=_font(size),
        fill=BANNER_TEXT_RGB,
        anchor="mm",
    )


def _panel_blocks(draft: DraftReport) -> list[tuple[str, str, int, tuple[int, int, int]]]:
    """(kind, text, font size, colour) in reading order; kind "h" heading, "t" text."""
    blocks: list[tuple[str, str, int, tuple[int, int, int]]] = [
        ("t", f"{ALGORITHM_FAMILY} draft report", 28, HEADING_RGB),
        ("t", f"model {draft.model_name} · pipeline {draft.pipeline_version}", 17, TEXT_RGB),
    ]
    if draft.paediatric_prompt:
        blocks.append(("t", PAEDIATRIC_NOTE, 19, NOTE_RGB))
    coded = []
    for state, label in _STATE_LABELS:
        names = [name.replace("_", " ") for name, value in draft.findings.items() if value == state]
        if names:
            coded.append(f"{label}: {', '.join(names)}")
    blocks.append(("h", "CODED FINDINGS", 20, HEADING_RGB))
    blocks.append(
        ("t", "\n".join(coded) or "None of the tracked findings was mentioned.", 20, TEXT_RGB)
    )
    findings, impression = (clean_text(part) for part in draft.sections)
    for heading, text in (
        ("FINDINGS", findings),
        ("IMPRESSION", impression),
        ("DIFFERENTIAL DIAGNOSIS", clean_text(draft.differential)),
        ("RECOMMENDATION", clean_text(draft.recommendation)),
    ):
        if text:
            blocks.append(("h", heading, 20, HEADING_RGB))
            blocks.append(("t", text, 21, TEXT_RGB))
    if not findings and not impression:
        blocks.append(("t", EMPTY_REPORT_NOTE, 21, NOTE_RGB))
    return blocks


def _draw_panel(draw: ImageDraw.ImageDraw, draft: DraftReport, *, left: int, top: int) -> None:
    text_width = PANEL_WIDTH - 2 * MARGIN
    footer_font = _font(17)
    footer = wrap_text(
        "Generated by AI, not verified by a radiologist. Not for diagnostic use. "
        "The SR in this study holds the full text.",
        footer_font,
        text_width,
    )
    footer_step = _line_height(footer_font)
    bottom = CANVAS_HEIGHT - MARGIN - footer_step * len(footer)
    y = top
    for kind, text, size, colour in _panel_blocks(draft):
        font = _font(size)
        step = _line_height(font)
        if kind == "h":
            y += step // 2
        for line in wrap_text(text, font, text_width):
            if y + 2 * step > bottom:  # keep one line free for the truncation note
                draw.text((left, y), "[…] text cut here: see the SR.", font=font, fill=NOTE_RGB)
                _draw_footer(draw, footer, footer_font, left, bottom)
                return
            draw.text((left, y), line, font=font, fill=colour)
            y += step
    _draw_footer(draw, footer, footer_font, left, bottom)


def _draw_footer(
    draw: ImageDraw.ImageDraw,
    lines: list[str],
    font: ImageFont.FreeTypeFont,
    left: int,
    top: int,
) -> None:
    for index, line in enumerate(lines):
        draw.text((left, top + index * _line_height(font)), line, font=font, fill=NOTE_RGB)


def _line_height(font: ImageFont.FreeTypeFont) -> int:
    ascent, descent = font.getmetrics()
    return round((ascent + descent) * 1.2)


def build_sc(
    source: Dataset,
    display: np.ndarray,
    draft: DraftReport,
    *,
    version: int = 1,
    institution_name: str | None = None,
) -> hd.sc.SCImage:
    """Build the Secondary Capture that shows the draft beside the radiograph.

    Parameters
    ----------
    source
        The source image's dataset (only its metadata is used; pixel data may be absent).
    display
        The source radiograph as 8-bit grey (``uint8`` H x W, lungs dark).
    draft
        The validated draft.
    version
        Draft version; goes into the deterministic SOP Instance UID and InstanceNumber.
    institution_name
        Optional InstitutionName of the node's site.

    Returns
    -------
    highdicom.sc.SCImage
        A pydicom ``Dataset``; ``save_as`` writes it as a DICOM file.

    Raises
    ------
    ValueError
        If the source lacks required UIDs, ``display`` is not an 8-bit grey image or
        ``version`` is invalid.
    """
    view = source_view(source)
    uids = output_uids(
        study_instance_uid=str(view.StudyInstanceUID),
        source_sop_instance_uid=str(view.SOPInstanceUID),
        model_hash=draft.model_hash,
        pipeline_version=draft.pipeline_version,
        kind=OutputKind.SC,
        version=version,
    )
    pixels = render_draft_image(display, draft)
    with without_name_warnings():
        sc = hd.sc.SCImage.from_ref_dataset(
            view,
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=uids.series_instance_uid,
            series_number=SC_SERIES_NUMBER,
            sop_instance_uid=uids.sop_instance_uid,
            instance_number=version,
            manufacturer=MANUFACTURER,
            patient_orientation=("L", "F"),  # replaced below: highdicom insists on a value
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=[ai_contributing_equipment(draft)],
            series_description=series_description(OutputKind.SC),
            manufacturer_model_name=draft.model_name[:64],
            software_versions=software_versions(draft),
            institution_name=institution_name,
            specific_character_set=CHARACTER_SET,
        )
    drop_acquisition_equipment(sc)
    # The rows and columns still run along the source's axes (scaled, not flipped), so
    # the source's orientation holds; Type 2, so empty when the source does not say.
    orientation = view.get("PatientOrientation")
    sc.PatientOrientation = list(orientation) if orientation and len(orientation) == 2 else None
    # The node drafts chest radiographs only. Saying so also settles General Series
    # Laterality (Type 2C): a chest is unpaired, so Laterality is absent.
    sc.BodyPartExamined = "CHEST"
    sc.BurnedInAnnotation = "YES"
    sc.ConversionType = "WSD"
    sc.DerivationDescription = (
        "Source radiograph display-processed and resized; AI draft report text and an "
        "'AI DRAFT - NOT VERIFIED' banner burned in."
    )
    reference = Dataset()
    reference.ReferencedSOPClassUID = view.SOPClassUID
    reference.ReferencedSOPInstanceUID = view.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    return sc
