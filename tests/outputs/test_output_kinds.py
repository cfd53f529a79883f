"""OUTPUTS: which objects a site gets, validated with a clear error, built in travel order."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from pydantic import ValidationError
from pydicom import Dataset

from cxrnode.outputs.build import full_text_series, make_objects
from cxrnode.outputs.common import series_description
from cxrnode.outputs.outbox import KIND_ORDER
from cxrnode.settings import Settings
from cxrnode.uids import OutputKind
from model.contracts import ModelResult

SOP_CLASSES = {
    "text_sr": "1.2.840.10008.5.1.4.1.1.88.33",
    "air_sr": "1.2.840.10008.5.1.4.1.1.88.33",
    "sc": "1.2.840.10008.5.1.4.1.1.7",
    "pdf": "1.2.840.10008.5.1.4.1.1.104.1",
}


def test_by_default_a_site_gets_the_text_report_and_the_secondary_capture() -> None:
    assert Settings().outputs == ["text_sr", "sc"]


def test_outputs_come_from_the_environment_as_a_comma_separated_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CXRNODE_OUTPUTS", " text_sr, PDF ,air_sr,pdf ")

    assert Settings().outputs == ["text_sr", "pdf", "air_sr"]  # trimmed, lower case, once


@pytest.mark.parametrize(
    ("value", "found"),
    [("text_sr,tid1500", "unknown ['tid1500']"), ("", "nothing"), (" , ", "nothing")],
)
def test_an_invalid_outputs_setting_says_what_is_allowed(value: str, found: str) -> None:
    with pytest.raises(ValidationError) as raised:
        Settings(outputs=value)

    message = str(raised.value)
    assert found in message
    assert "text_sr, air_sr, sc, pdf" in message
    assert "default is text_sr,sc" in message


def test_every_kind_has_a_travel_position_and_a_short_distinct_series_description() -> None:
    assert set(OutputKind) <= set(KIND_ORDER)
    descriptions = [series_description(kind) for kind in OutputKind]
    assert len(set(descriptions)) == len(descriptions)
    assert all(
        len(d) <= 64 and d.startswith("AI DRAFT ") and d.endswith(" - NOT FOR DIAGNOSTIC USE")
        for d in descriptions
    )
    # what tells them apart comes early: viewers cut long descriptions (OHIF: ~24 characters)
    assert series_description(OutputKind.TEXT_SR)[:24] == "AI DRAFT REPORT (TEXT) -"
    assert series_description(OutputKind.AIR_SR)[:24] == "AI DRAFT FINDINGS (STRUC"
    assert series_description(OutputKind.PDF)[:24] == "AI DRAFT REPORT (PDF) - "


@pytest.mark.parametrize(
    ("outputs", "expected"),
    [
        ("text_sr,sc", ["text_sr", "sc"]),
        ("pdf,sc,air_sr,text_sr", ["text_sr", "air_sr", "sc", "pdf"]),
        ("air_sr", ["air_sr"]),
        ("sc,pdf", ["sc", "pdf"]),
    ],
)
def test_make_objects_builds_what_outputs_lists_in_travel_order(
    outputs: str,
    expected: list[str],
    synthetic: Callable[..., Dataset],
    make_draft: Callable[..., ModelResult],
) -> None:
    display = np.zeros((40, 30), dtype=np.uint8)

    objects = make_objects(
        synthetic("DX"),
        display,
        make_draft(),
        version=1,
        predecessors={},
        settings=Settings(outputs=outputs),
    )

    assert [kind for kind, _ in objects] == expected
    for kind, ds in objects:
        assert ds.SOPClassUID == SOP_CLASSES[kind]
        assert ds.SeriesDescription == series_description(kind)


def test_the_sc_points_to_the_text_report_else_to_the_pdf() -> None:
    assert full_text_series(["sc", "text_sr", "pdf"]) == series_description("text_sr")
    assert full_text_series(["sc", "pdf"]) == series_description("pdf")
    assert full_text_series(["sc", "air_sr"]) is None
