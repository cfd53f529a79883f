"""One text sanitiser for DICOM and HL7 (cxrnode.outputs.text.sanitise): model text with a TAB,
control characters and byte tokens that do not form UTF-8 reaches neither the SR nor the HL7
ORU's OBX-5 with any of them, and HL7's delimiters are still escaped."""

from __future__ import annotations

from datetime import datetime

import hl7
import pytest
from pydicom import Dataset

from cxrnode.hl7.message import escape
from cxrnode.hl7.oru import build_oru
from cxrnode.outputs.text import multi_line, one_line, sanitise
from model.contracts import ModelResult

#: What a decoder gives for the model's byte tokens 0x63 0x61 0x66 0xC3 ("caf" and half an
#: "é"): U+FFFD with errors="replace", a lone surrogate with errors="surrogateescape".
UNPAIRED_REPLACED = b"caf\xc3".decode("utf-8", "replace")
UNPAIRED_ESCAPED = b"caf\xc3".decode("utf-8", "surrogateescape")
DIRTY = f"Findings:\tClear lungs\x00 {UNPAIRED_REPLACED}\x07.\r\nImpression:\t{UNPAIRED_ESCAPED}."


def header() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.19"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.19.2"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.19.1"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "P19"
    ds.AccessionNumber = "ACC19"
    return ds


def draft(report: str) -> ModelResult:
    return ModelResult(
        report=report,
        differential="Atelectasis |\tor\ttumour ^ & ~ \\ effusion",
        recommendation=f"Follow-up\t{UNPAIRED_REPLACED}",
        findings={"cardiomegaly": "present"},
        model_id="/models/tiny",
        model_hash="c4" * 32,
        pipeline_version="0.1.0",
    )


def obx5(text: str) -> list[str]:
    return [str(segment(5)) for segment in hl7.parse(text).segments("OBX")]


def test_the_oru_carries_no_tab_and_no_unpaired_bytes_in_any_obx_5() -> None:
    oru = build_oru(header(), draft(DIRTY), version=1, made_at=datetime(2026, 12, 4, 12, 0))

    values = obx5(oru.text)
    assert values
    for value in values:
        assert "\t" not in value
        assert "\ufffd" not in value
        assert not any(0xD800 <= ord(c) <= 0xDFFF for c in value)
        assert not any(ord(c) < 0x20 for c in value)
    assert "\t" not in oru.text and "\ufffd" not in oru.text
    oru.encode()  # encodes as UTF-8: no lone surrogate left
    narrative = "~".join(values)
    assert "Clear lungs caf." in narrative  # the TAB became a space, the rest is kept
    # the delimiters in model text are escaped, not taken as structure
    assert "Atelectasis \\F\\ or tumour \\S\\ \\T\\ \\R\\ \\E\\ effusion" in narrative


@pytest.mark.parametrize(
    "text", [DIRTY, "\t", UNPAIRED_REPLACED, "a\x1bb\x7fc\x85d\u2028e", "tab\tand\r\nbreak"]
)
def test_dicom_and_hl7_clean_text_with_the_same_sanitiser(text: str) -> None:
    clean = sanitise(text)

    assert "\t" not in clean and "\ufffd" not in clean
    assert all(c == "\n" or ord(c) >= 0x20 for c in clean)
    assert not any(0x7F <= ord(c) <= 0x9F or 0xD800 <= ord(c) <= 0xDFFF for c in clean)
    # DICOM one-line and multi-line values, and an HL7 component, all start from it
    assert one_line(text) == " ".join(clean.replace("\\", "/").split("\n")).strip()
    assert multi_line(text).split("\n")[0].strip() == clean.split("\n")[0].strip()
    assert escape(text) == clean.replace("\n", " ").replace("\\", "\\E\\")


def test_a_tab_is_a_space_and_line_breaks_of_every_spelling_are_one_line_feed() -> None:
    assert sanitise("a\tb") == "a b"
    assert sanitise("a\r\nb\rc\x0bd\x0ce\x85f\u2028g\u2029h") == "a\nb\nc\nd\ne\nf\ng\nh"
    assert sanitise(f"x{UNPAIRED_REPLACED}y\x00z{UNPAIRED_ESCAPED}") == "xcafy" + "zcaf"
