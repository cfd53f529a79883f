"""Study facts, view and anatomy come from the header alone and carry no identifiers."""

import dicomgen
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from cxrnode.ingest.header import age_years, classify_view, is_chest, is_radiograph, study_context

# Real senders write invalid values (lower-case CS, free-text AS); the tests do so on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")


def _ds(**attrs: object) -> Dataset:
    ds = Dataset()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def _code(value: str, scheme: str = "SCT", meaning: str = "") -> Dataset:
    return _ds(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


@pytest.mark.parametrize(
    ("age", "years"),
    [
        ("045Y", 45.0),
        ("006M", 0.5),
        ("002W", round(14 / 365.25, 3)),
        ("010D", round(10 / 365.25, 3)),
        ("000Y", 0.0),
    ],
)
def test_patient_age_is_read_in_every_dicom_unit(age: str, years: float) -> None:
    assert age_years(_ds(PatientAge=age)) == pytest.approx(years)


def test_age_falls_back_to_birth_date_and_study_date() -> None:
    ds = _ds(PatientAge="", PatientBirthDate="19800615", StudyDate="20240614")
    assert age_years(ds) == pytest.approx(43.999, abs=0.01)


@pytest.mark.parametrize(
    "attrs",
    [
        {},
        {"PatientAge": "abc"},
        {"PatientBirthDate": "20250101", "StudyDate": "20240101"},  # born after the study
        {"PatientBirthDate": "19800615"},  # no date to compare with
        {"PatientAge": "999Y"},
    ],
)
def test_unknown_or_implausible_age_is_none(attrs: dict) -> None:
    assert age_years(_ds(**attrs)) is None


def test_study_context_has_age_sex_and_view_and_nothing_that_identifies(tmp_path) -> None:
    path = dicomgen.make_chest(
        tmp_path / "c.dcm", rows=8, cols=8, patient_age="006M", patient_sex="M", view="AP"
    )
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    context = study_context(ds)
    assert context.to_dict() == {"age_years": 0.5, "sex": "M", "view": "AP"}
    identifiers = {
        str(ds.PatientName),
        ds.PatientID,
        ds.StudyInstanceUID,
        ds.StudyDate,
        ds.AccessionNumber,
    }
    assert not identifiers & {str(v) for v in context.to_dict().values()}


@pytest.mark.parametrize("sex", ["", "X", None])
def test_unknown_sex_is_none(sex: str | None) -> None:
    assert study_context(_ds(PatientSex=sex)).sex is None


@pytest.mark.parametrize(
    ("position", "view"),
    [
        ("PA", "PA"),
        ("AP", "AP"),
        ("LL", "LATERAL"),
        ("RL", "LATERAL"),
        ("LATERAL", "LATERAL"),
        (" pa ", "PA"),
    ],
)
def test_view_position_decides_the_view(position: str, view: str) -> None:
    assert classify_view(_ds(ViewPosition=position, SeriesDescription="CHEST LAT")) == view


@pytest.mark.parametrize(
    ("code", "view"),
    [
        ("272479007", "PA"),
        ("R-10214", "PA"),
        ("399348003", "AP"),
        ("R-10206", "AP"),
        ("399067008", "LATERAL"),
        ("399173006", "LATERAL"),
        ("399198007", "LATERAL"),
        ("R-10236", "LATERAL"),
        ("399033003", None),  # "frontal": not lateral, but neither PA nor AP
    ],
)
def test_view_code_sequence_is_used_when_view_position_is_empty(
    code: str, view: str | None
) -> None:
    ds = _ds(
        ViewPosition="",
        ViewCodeSequence=Sequence([_code(code, meaning="frontal" if view is None else "")]),
    )
    assert classify_view(ds) == view


def test_generated_view_codes_round_trip(tmp_path) -> None:
    for view, expected in [("PA", "PA"), ("AP", "AP"), ("LL", "LATERAL"), ("LATERAL", "LATERAL")]:
        path = dicomgen.make_chest(
            tmp_path / f"{view}.dcm", rows=8, cols=8, view=view, use_view_code=True
        )
        assert classify_view(pydicom.dcmread(path, stop_before_pixels=True)) == expected


@pytest.mark.parametrize(
    ("description", "view"),
    [
        ("CHEST PA", "PA"),
        ("Thorax p.a.", "PA"),
        ("Thorax a.p. liegend", "AP"),
        ("CHEST AP PORTABLE", "AP"),
        ("THORAX LAT", "LATERAL"),
        ("Thorax seitlich", "LATERAL"),
        ("CHEST PA + LAT", None),  # names two views: no decision
        ("", None),
    ],
)
def test_series_description_is_a_fallback(description: str, view: str | None) -> None:
    assert classify_view(_ds(ViewPosition="", SeriesDescription=description)) == view


def test_study_description_does_not_decide_one_images_view() -> None:
    assert classify_view(_ds(StudyDescription="CHEST PA AND LATERAL")) is None


def test_patient_orientation_along_the_ap_axis_means_lateral() -> None:
    assert classify_view(_ds(PatientOrientation=["A", "F"])) == "LATERAL"
    assert classify_view(_ds(PatientOrientation=["L", "F"])) is None


@pytest.mark.parametrize("position", ["RLD", "LLD", "RLO", "LLO"])
def test_decubitus_and_oblique_positions_are_not_classified(position: str) -> None:
    assert classify_view(_ds(ViewPosition=position)) is None


@pytest.mark.parametrize("part", ["CHEST", "chest", "THORAX", "LUNG", "TORAX", "CHESTABDOMEN"])
def test_chest_body_parts_are_chest(part: str) -> None:
    assert is_chest(_ds(BodyPartExamined=part, StudyDescription="HAND"))


@pytest.mark.parametrize("part", ["HAND", "KNEE", "EXTREMITY", "ABDOMEN", "TSPINE", "SKULL"])
def test_other_body_parts_are_not_chest_whatever_the_description(part: str) -> None:
    assert not is_chest(_ds(BodyPartExamined=part, StudyDescription="CHEST"))


@pytest.mark.parametrize(
    ("attrs", "expected"),
    [
        ({"StudyDescription": "XR CHEST 2 VIEWS"}, True),
        ({"SeriesDescription": "Thorax pa"}, True),
        ({"ProtocolName": "CXR PORTABLE"}, True),
        ({"RequestedProcedureDescription": "RX TORAX"}, True),
        ({"StudyDescription": "THORACIC SPINE 2 VIEWS"}, False),
        ({"StudyDescription": "CHEST SPINE"}, False),
        ({"StudyDescription": "XR HAND LEFT"}, False),
        ({"AnatomicRegionSequence": Sequence([_code("816094009", meaning="Chest")])}, True),
        ({"AnatomicRegionSequence": Sequence([_code("85562004", meaning="Hand")])}, False),
        ({"BodyPartExamined": "", "StudyDescription": "CHEST"}, True),
    ],
)
def test_descriptions_and_codes_decide_when_body_part_is_absent(
    attrs: dict, expected: bool
) -> None:
    assert is_chest(_ds(**attrs)) is expected


def test_a_silent_header_gives_the_documented_default() -> None:
    silent = _ds(StudyDescription="", SeriesDescription="1 VIEW")
    assert is_chest(silent) is True
    assert is_chest(silent, default=False) is False


def test_real_images_are_told_apart() -> None:
    chest = pydicom.dcmread(dicomgen.pydicom_data_chest("RG1_UNCR"), stop_before_pixels=True)
    tibia = pydicom.dcmread(dicomgen.pydicom_data_chest("RG3_UNCR"), stop_before_pixels=True)
    assert is_chest(chest) and not is_chest(tibia)
    assert classify_view(chest) == "PA"
    assert is_radiograph(chest) and is_radiograph(tibia)


def test_generated_files_are_classified_as_generated(tmp_path) -> None:
    chest = pydicom.dcmread(
        dicomgen.make_chest(tmp_path / "c.dcm", rows=8, cols=8), stop_before_pixels=True
    )
    hand = pydicom.dcmread(
        dicomgen.make_non_chest(tmp_path / "h.dcm", rows=8, cols=8), stop_before_pixels=True
    )
    ct = pydicom.dcmread(
        dicomgen.make_ct(tmp_path / "ct.dcm", rows=8, cols=8), stop_before_pixels=True
    )
    assert is_chest(chest) and not is_chest(hand)
    assert is_radiograph(chest) and is_radiograph(hand) and not is_radiograph(ct)
