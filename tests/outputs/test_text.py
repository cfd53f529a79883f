"""Text sanitising and line breaking (cxrnode.outputs.text), one rule per VR."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cxrnode.outputs.text import (
    REPORT_LINE_WIDTH,
    code_string,
    multi_line,
    one_line,
    person_name,
    report_text,
    value_for_vr,
    wrap,
)

ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=500)


def test_tab_becomes_a_space_and_other_controls_are_dropped() -> None:
    assert multi_line("clear\tlungs\x00\x1b[0m\x7f.") == "clear lungs[0m."
    assert one_line("a\tb\x01c") == "a bc"


def test_every_spelling_of_a_line_break_becomes_lf_in_multi_line_text() -> None:
    text = "a\r\nb\rc\x0bd\x0ce\x85f\u2028g\u2029h\ni"
    assert multi_line(text) == "a\nb\nc\nd\ne\nf\ng\nh\ni"


def test_blank_lines_are_kept_once_and_outer_ones_removed() -> None:
    assert multi_line("\n\n  a  \n\n\n\nb \n\n") == "  a\n\nb"


def test_one_line_strings_have_no_line_breaks_and_no_backslash() -> None:
    assert one_line("  first\nsecond\\third  ") == "first second/third"


def test_lone_surrogates_are_dropped_so_utf8_can_encode_the_value() -> None:
    value = multi_line("a\ud800b\udfffc")
    assert value == "abc"
    value.encode("utf-8")


@pytest.mark.parametrize(("vr", "limit"), [("LO", 64), ("SH", 16), ("ST", 1024), ("LT", 10240)])
def test_values_are_cut_to_the_limit_in_characters_and_in_bytes(vr: str, limit: int) -> None:
    ascii_value = value_for_vr("a" * (limit + 5), vr)
    accented = value_for_vr("é" * limit, vr)
    emoji = value_for_vr("\U0001f600" * limit, vr)

    assert len(ascii_value) == limit
    assert len(accented.encode()) <= limit and len(accented) == limit // 2
    assert len(emoji.encode()) <= limit and len(emoji) == limit // 4


def test_person_name_groups_and_code_strings() -> None:
    assert person_name("Doe^Jane\\x\n=" + "é" * 40) == "Doe^Jane/x =" + "é" * 32
    assert code_string("prélim-inary flag!") == "PR_LIM_INARY FLA"
    with pytest.raises(ValueError, match="text VRs"):
        value_for_vr("20240101", "DA")


def test_wrap_breaks_at_spaces_and_splits_only_overlong_words() -> None:
    text = "alpha beta gamma delta\n\n" + "x" * 25 + " end"

    assert wrap(text, 11) == [
        "alpha beta",
        "gamma delta",
        "",
        "x" * 11,
        "x" * 11,
        "xxx end",
    ]


def test_wrap_with_a_measure_counts_its_units() -> None:
    double = lambda s: 2 * len(s)  # noqa: E731  (a font twice as wide as len)
    assert wrap("ab cd ef", 10, double) == ["ab cd", "ef"]
    assert wrap("abcdef", 1, double) == ["a", "b", "c", "d", "e", "f"]  # never stalls


@given(ANY_TEXT)
def test_report_text_lines_never_exceed_the_width_and_no_visible_character_is_lost(
    text: str,
) -> None:
    value = report_text(text)

    assert all(len(line) <= REPORT_LINE_WIDTH for line in value.split("\n"))
    assert "".join(value.split()) == "".join(multi_line(text).split())
    value.encode("utf-8")


@given(ANY_TEXT, st.sampled_from(["UT", "ST", "LT", "LO", "SH", "UC", "PN", "CS"]))
def test_every_value_holds_only_what_its_vr_allows(text: str, vr: str) -> None:
    value = value_for_vr(text, vr)

    controls = {chr(c) for c in range(0x20)} | {chr(c) for c in range(0x7F, 0xA0)}
    allowed_controls = {"\n"} if vr in ("UT", "ST", "LT") else set()
    assert not (set(value) & (controls - allowed_controls))
    if vr in ("LO", "SH", "UC", "PN", "CS"):
        assert "\\" not in value
    limit = {"LO": 64, "SH": 16, "CS": 16, "ST": 1024, "LT": 10240}.get(vr)
    if limit:
        assert len(value) <= limit and len(value.encode("utf-8")) <= limit
    if vr == "CS":
        assert set(value) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _")
