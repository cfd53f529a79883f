"""The VR checks that decide what the outputs may copy from a source (cxrnode.ingest.vr), and
the record they make (cxrnode.ingest.record): valid values kept, invalid ones left out with a
reason that never quotes them, rows recorded by earlier releases still readable."""

from __future__ import annotations

import logging

import pytest
from pydicom import Dataset

from cxrnode.ingest.header import age_years, recorded_header
from cxrnode.ingest.record import SourceRecord
from cxrnode.ingest.vr import check_attribute, check_value, check_vm

VALID = [
    ("AS", "062Y"),
    ("AS", "006M"),
    ("AS", "002W"),
    ("AS", "010D"),
    ("DA", "19620315"),
    ("DA", "20240229"),  # a leap day
    ("TM", "10"),
    ("TM", "1015"),
    ("TM", "101500"),
    ("TM", "101500.123456"),
    ("TM", "235960"),  # a leap second
    ("DT", "2024"),
    ("DT", "20240315101500.25+0100"),
    ("CS", "MONOCHROME2"),
    ("CS", "ORIGINAL PRIMARY"),
    ("CS", "F "),  # padding is not part of the value
    ("SH", "ACC0001"),
    ("SH", "x" * 16),
    ("LO", "é" * 32),  # 64 bytes of UTF-8
    ("LO", " padded "),
    ("PN", "Doe^Jane^Q^Dr^III"),
    ("PN", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    ("ST", "line one\r\nline two"),
    ("LT", "x" * 10240),
    ("UT", "any length " * 1000),
    ("UI", "1.2.840.10008.5.1.4.1.1.1"),
    ("DS", "0.139"),
    ("DS", " -1.5e-3 "),
    ("DS", 71.5),
    ("IS", "42"),
    ("IS", "-2147483648"),
    ("IS", 7),
    ("US", 65535),
    ("FD", 1.5),
    ("AE", "CXRNODE"),
    ("LO", ""),  # empty: a Type 2 attribute without a value
    ("DA", ""),
]

INVALID = [
    ("AS", "62", "nnnY"),  # the SIIM chest sample's age: no unit
    ("AS", "62Y", "nnnY"),
    ("AS", "062y", "nnnY"),
    ("DA", "1962-03-15", "YYYYMMDD"),
    ("DA", "1962.03.15", "YYYYMMDD"),
    ("DA", "20241345", "calendar"),
    ("DA", "20230229", "calendar"),
    ("TM", "10:15:00", "HH[MM"),
    ("TM", "250000", "out of range"),
    ("TM", "106000", "out of range"),
    ("TM", "101500.1234567", "HH[MM"),
    ("DT", "2024-03-15", "YYYY"),
    ("DT", "20241301", "month"),
    ("DT", "2024031525", "out of range"),
    ("CS", "female", "A-Z"),
    ("CS", "X-RAY", "A-Z"),
    ("CS", "A" * 17, "16 characters"),
    ("SH", "ACC-0000000000000042", "16 characters"),
    ("SH", "ID\tTAB", "control character"),
    ("LO", "x" * 65, "64 characters"),
    ("LO", "é" * 33, "64 characters"),  # 33 characters, 66 bytes
    ("LO", "a\\b", "backslash"),
    ("LO", "escape\x1b(B", "control character"),
    ("PN", "Doe^John^Q^Dr^Jr^Extra", "components"),
    ("PN", "a=b=c=d", "component groups"),
    ("PN", "x" * 65, "64 characters"),
    ("PN", "Doe\nJane", "control character"),
    ("ST", "tab\there", "control character"),
    ("ST", "x" * 1025, "1024 characters"),
    ("UI", "1.2.03", "UID"),
    ("UI", "", "UID"),
    ("DS", "1.2.3", "decimal string"),
    ("DS", "12345678901234567", "decimal string"),
    ("DS", "nan", "decimal string"),
    ("DS", float("inf"), "finite"),
    ("IS", "1.5", "integer string"),
    ("IS", "2147483648", "32 bits"),
    ("US", 65536, "range"),
    ("US", -1, "range"),
    ("FL", 1e39, "finite"),
    ("AE", "A" * 17, "16 characters"),
]


@pytest.mark.parametrize(("vr", "value"), VALID)
def test_a_valid_value_of_each_vr_passes(vr: str, value: object) -> None:
    assert check_value(vr, value) is None


@pytest.mark.parametrize(("vr", "value", "why"), INVALID)
def test_an_invalid_value_of_each_vr_is_refused_with_a_reason_that_does_not_quote_it(
    vr: str, value: object, why: str
) -> None:
    reason = check_value(vr, value)

    assert reason is not None and why in reason
    if isinstance(value, str) and len(value) > 2:
        assert value not in reason


@pytest.mark.parametrize(
    ("keyword", "count", "ok"),
    [
        ("PatientName", 1, True),
        ("PatientName", 2, False),
        ("PatientOrientation", 2, True),
        ("PatientOrientation", 1, False),
        ("PixelSpacing", 2, True),
        ("PixelSpacing", 3, False),
        ("ImageType", 4, True),  # 2-n
        ("ImageType", 1, False),
        ("PatientAge", 0, True),  # empty
    ],
)
def test_value_multiplicity_follows_the_data_dictionary(keyword: str, count: int, ok: bool) -> None:
    assert (check_vm(keyword, count) is None) is ok


def test_an_attribute_is_refused_when_any_of_its_values_is() -> None:
    assert check_attribute("PixelSpacing", "DS", ["0.1", "0.1"]) is None
    assert check_attribute("PixelSpacing", "DS", ["0.1", "x"]) is not None


# ------------------------------------------------------------------------------ the record


def source(**values: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.77.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.77"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.77.2"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "P1"
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_the_record_keeps_valid_values_and_leaves_out_invalid_ones_with_one_warning_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ds = source(PatientAge="62", PatientBirthDate="19620315", StudyTime="10:15:00")

    with caplog.at_level(logging.WARNING, logger="cxrnode.ingest.record"):
        record = SourceRecord.from_dataset(ds)

    assert record.left_out == ("StudyTime", "PatientAge")
    assert record.text("PatientBirthDate") == "19620315"
    assert record.text("PatientName") == "Doe^Jane"
    assert record.get("PatientAge") is None and record.text("PatientAge") == ""
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    for keyword, line in zip(("StudyTime", "PatientAge"), lines, strict=True):
        assert keyword in line and ds.SOPInstanceUID in line
        assert "62" not in line.replace(ds.SOPInstanceUID, "") and "10:15" not in line


def test_the_node_reads_an_age_without_a_unit_leniently_for_its_own_use() -> None:
    ds = source(PatientAge="62")

    assert age_years(ds) == 62.0  # for the age-aware prompt
    assert SourceRecord.from_dataset(ds).get("PatientAge") is None  # never copied


def test_the_record_as_a_dataset_holds_the_uids_and_only_the_kept_values() -> None:
    ds = source(PatientAge="045Y", PatientSex="female", PatientWeight=71.5)

    view = SourceRecord.from_dataset(ds).dataset()

    assert view.SOPInstanceUID == ds.SOPInstanceUID and view.SeriesInstanceUID
    assert view.PatientAge == "045Y" and float(view.PatientWeight) == 71.5
    assert "PatientSex" not in view
    assert str(view.PatientName) == "Doe^Jane"


def test_a_record_needs_the_uids_the_outputs_reference() -> None:
    ds = source()
    del ds.SeriesInstanceUID

    with pytest.raises(ValueError, match="SeriesInstanceUID"):
        SourceRecord.from_dataset(ds)


def test_rows_recorded_by_earlier_releases_are_read_through_the_same_checks() -> None:
    """A header as ingest has recorded it since 0002 (DICOM JSON, PN as {"Alphabetic": ...},
    numbers as numbers), including values no check had looked at."""
    recorded = recorded_header(source())
    recorded["00101010"] = {"vr": "AS", "Value": ["62"]}  # PatientAge
    recorded["00100030"] = {"vr": "DA"}  # PatientBirthDate, empty
    recorded["00101030"] = {"vr": "DS", "Value": [0.30000000000000004]}  # PatientWeight
    recorded["00080090"] = {"vr": "PN", "Value": [{"Alphabetic": "Ward", "Ideographic": "病棟"}]}
    recorded["00081030"] = {"vr": "UN", "Value": ["CHEST"]}  # StudyDescription, wrong VR

    record = SourceRecord.from_recorded(recorded)

    assert record.left_out == ("StudyDescription", "PatientAge")
    assert record.text("ReferringPhysicianName") == "Ward=病棟"
    assert record.get("PatientBirthDate") is not None and record.text("PatientBirthDate") == ""
    weight = record.dataset()["PatientWeight"]
    assert len(str(weight.value)) <= 16  # formatted to fit DS, not str(float)
