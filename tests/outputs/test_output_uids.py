"""Deterministic output UIDs: same inputs, same UIDs; any input changed, a different UID."""

from __future__ import annotations

import pytest

from cxrnode.uids import OutputKind, device_uid, is_valid_uid, output_uids, uid_from_key

BASE = {
    "study_instance_uid": "1.2.826.0.1.3680043.8.498.1",
    "source_sop_instance_uid": "1.2.826.0.1.3680043.8.498.1.1.1",
    "model_hash": "9a" * 32,
    "pipeline_version": "0.1.0",
    "kind": OutputKind.TEXT_SR,
    "version": 1,
}


def test_same_inputs_give_the_same_uids() -> None:
    assert output_uids(**BASE) == output_uids(**dict(BASE))


@pytest.mark.parametrize(
    ("field", "value", "series_changes"),
    [
        ("source_sop_instance_uid", "1.2.826.0.1.3680043.8.498.1.1.2", False),
        ("model_hash", "9b" * 32, True),
        ("pipeline_version", "0.2.0", True),
        ("kind", OutputKind.SC, True),
        ("kind", OutputKind.AIR_SR, True),
        ("kind", OutputKind.PDF, True),
        ("version", 2, False),
        ("study_instance_uid", "1.2.826.0.1.3680043.8.498.2", True),
    ],
)
def test_each_input_changes_the_instance_and_only_study_level_inputs_the_series(
    field: str, value: object, series_changes: bool
) -> None:
    before = output_uids(**BASE)
    after = output_uids(**{**BASE, field: value})

    assert after.sop_instance_uid != before.sop_instance_uid or field == "study_instance_uid"
    assert (after.series_instance_uid != before.series_instance_uid) is series_changes


def test_uids_follow_the_dicom_grammar_and_the_2_25_form() -> None:
    uids = output_uids(**BASE)
    for uid in (uids.series_instance_uid, uids.sop_instance_uid, device_uid("9a" * 32)):
        assert is_valid_uid(uid)
        assert uid.startswith("2.25.")
        assert len(uid) <= 64
        assert int(uid.split(".")[2]) < 2**128


def test_is_valid_uid_rejects_leading_zeros_letters_and_overlong_values() -> None:
    assert is_valid_uid("1.2.840.10008.1.2")
    assert is_valid_uid("2.25.0")
    assert not is_valid_uid("1.02.3")
    assert not is_valid_uid("1.2.a")
    assert not is_valid_uid("1..2")
    assert not is_valid_uid("1." + "1" * 63)
    assert not is_valid_uid("")


def test_key_parts_cannot_collide_by_concatenation() -> None:
    assert uid_from_key("ab", "c") != uid_from_key("a", "bc")
    with pytest.raises(ValueError, match="separator"):
        uid_from_key("a\x1fb")


def test_device_uid_changes_with_the_model_hash_only() -> None:
    assert device_uid("aa" * 32) == device_uid("aa" * 32)
    assert device_uid("aa" * 32) != device_uid("ab" * 32)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("study_instance_uid", "not-a-uid", "study_instance_uid must be a valid DICOM UID"),
        ("source_sop_instance_uid", "1.2.03", "source_sop_instance_uid must be a valid"),
        ("model_hash", "", "model_hash must be a non-empty string"),
        ("pipeline_version", "  ", "pipeline_version must be a non-empty string"),
        ("kind", "mpeg", "kind must be one of"),
        ("version", 0, "version must be an integer >= 1"),
        ("version", True, "version must be an integer >= 1"),
    ],
)
def test_invalid_inputs_are_refused_with_what_was_expected(
    field: str, value: object, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        output_uids(**{**BASE, field: value})


def test_kind_names_fit_the_outbox_column() -> None:
    assert all(len(kind.value) <= 8 for kind in OutputKind)  # outputs.kind is String(8)
