"""Urgent and voted drafts: every object names the suspected finding and the votes, and stays
dciodvfy-clean."""

from __future__ import annotations

import numpy as np

from cxrnode.outputs.findings_sr import build_findings_sr
from cxrnode.outputs.marks import DraftMarks
from cxrnode.outputs.pdf import build_pdf
from cxrnode.outputs.report_sr import build_report_sr
from cxrnode.outputs.sc import build_sc

MARKS = DraftMarks(
    suspected="SUSPECTED PLEURAL EFFUSION",
    samples=5,
    votes={
        "cardiomegaly": {"present": 5},
        "pleural_effusion": {"present": 4, "absent": 1},
        "pneumothorax": {"absent": 3, "not_mentioned": 2},
        "pneumonia": {"present": 3, "absent": 2},  # coded uncertain: too little agreement
    },
)


def _texts(item) -> list[str]:  # noqa: ANN001
    found = [str(item.TextValue)] if "TextValue" in item else []
    for child in item.get("ContentSequence", []):
        found += _texts(child)
    return found


def test_every_marked_object_names_the_finding_and_validates(
    synthetic, make_draft, validate
) -> None:
    source, draft = synthetic("DX"), make_draft()
    display = np.full((96, 80), 90, np.uint8)
    objects = {
        "text_sr": build_report_sr(source, draft, marks=MARKS),
        "air_sr": build_findings_sr(source, draft, marks=MARKS),
        "sc": build_sc(source, display, draft, marks=MARKS),
        "pdf": build_pdf(source, draft, marks=MARKS),
    }
    for kind, ds in objects.items():
        assert ds.SeriesDescription.startswith("SUSPECTED PLEURAL EFFUSION - AI DRAFT"), kind
        result = validate(ds)
        assert result.errors == [], (kind, result.output)
    texts = _texts(objects["text_sr"])
    assert texts[0] == "AI DRAFT — SUSPECTED PLEURAL EFFUSION — NOT VERIFIED"
    assert "Pleural effusion: Present, 4 of 5 samples" in texts
    assert "Pneumonia: Undetermined, samples split 3 Present, 2 Absent" in texts
    assert "samples=5" in str(objects["air_sr"])


def test_an_unmarked_draft_is_built_as_before(synthetic, make_draft) -> None:
    source, draft = synthetic("DX"), make_draft()
    plain, marked_none = build_report_sr(source, draft), build_report_sr(source, draft, marks=None)
    assert plain.SeriesDescription == marked_none.SeriesDescription
    assert plain.SeriesDescription.startswith("AI DRAFT REPORT (TEXT)")
    assert _texts(plain) == _texts(marked_none)
