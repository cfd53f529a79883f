"""Is this value valid for its VR? One check per Value Representation (PS3.5 §6.2).

A PACS sends what its modality wrote, and modalities write Patient's Age ``62`` (AS wants
``062Y``), dates with dots, times with colons, descriptions longer than their VR allows.
The node copies a few of those values into the objects it makes (the patient and study
identity of :class:`cxrnode.ingest.record.SourceRecord`); a value copied unchecked makes the
output invalid too (dciodvfy: "Value invalid for this VR"). These checks decide which values
may be copied; an invalid one is left out, never repaired, because a repaired date or name
would claim something the source did not say.

What each check accepts, for values as pydicom decodes them (text as ``str``, numbers as
``int``/``float``):

- **Lengths** in characters *and* in bytes of UTF-8, the character set our outputs declare:
  PS3.5 counts characters, validators and archives count bytes (the same two readings
  :mod:`cxrnode.outputs.text` cuts model text to).
- **Strings** (AE, CS, LO, SH, PN, UC, UR): no control character, no backslash (the value
  separator). Our outputs are UTF-8, where ESC (allowed by PS3.5 for ISO 2022 code
  extensions) means nothing: it is refused too.
- **Texts** (ST, LT, UT): line breaks (CR, LF, FF) allowed, no other control character; a
  TAB is not a character PS3.5 allows in them.
- **CS**: upper-case letters, digits, space and underscore. **AS**: ``nnnD``, ``nnnW``,
  ``nnnM`` or ``nnnY``. **DA**: ``YYYYMMDD``, a real calendar date. **TM**:
  ``HH[MM[SS[.F{1,6}]]]`` in range (a leap second allowed). **DT**: the date, then the
  time parts, then an optional ``&ZZXX`` offset. **DS**: a decimal number of at most 16
  characters, finite. **IS**: an integer of at most 12 characters within 32 bits.
  **UI**: the UID grammar (:func:`cxrnode.uids.is_valid_uid`). **PN**: at most three
  component groups of at most five components, each group at most 64 characters.
- **Binary numbers** (US, SS, UL, SL, FL, FD): within their type's range, finite.
- **Multiplicity** (VM): as many values as the data dictionary allows for the attribute.

The answer is the reason a value is invalid (for tests and for the developer reading
them), or ``None``; the reason never quotes the value, so it may be logged.
"""

from __future__ import annotations

import math
import re
import unicodedata
from datetime import date
from typing import Any

from pydicom.datadict import dictionary_VM, tag_for_keyword

from cxrnode.uids import is_valid_uid

__all__ = [
    "MAX_LENGTH",
    "check_attribute",
    "check_value",
    "check_vm",
]

#: PS3.5 Table 6.2-1 maximum lengths (characters; per component group for PN).
MAX_LENGTH: dict[str, int] = {
    "AE": 16,
    "AS": 4,
    "CS": 16,
    "DA": 8,
    "DS": 16,
    "DT": 26,
    "IS": 12,
    "LO": 64,
    "LT": 10240,
    "PN": 64,
    "SH": 16,
    "ST": 1024,
    "TM": 14,
    "UI": 64,
}

_AS = re.compile(r"\d{3}[DWMY]")
_CS = re.compile(r"[A-Z0-9 _]*")
_DA = re.compile(r"(\d{4})(\d{2})(\d{2})")
_TM = re.compile(r"(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?")
_DT = re.compile(
    r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?)?)?)?"
    r"(?:([+-])(\d{2})(\d{2}))?"
)
_DS = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_IS = re.compile(r"[+-]?\d+")
_TEXT_CONTROLS = frozenset("\r\n\x0c")
_INTEGER_RANGES = {
    "US": (0, 2**16 - 1),
    "SS": (-(2**15), 2**15 - 1),
    "UL": (0, 2**32 - 1),
    "SL": (-(2**31), 2**31 - 1),
}
_FLOAT32_MAX = 3.4028234663852886e38


def _too_long(text: str, limit: int) -> bool:
    return len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit


def _has_control(text: str, allowed: frozenset[str] = frozenset()) -> bool:
    """A control character (Unicode Cc) not in ``allowed``, or a lone surrogate."""
    return any(unicodedata.category(char) in ("Cc", "Cs") and char not in allowed for char in text)


def _string(text: str, vr: str) -> str | None:
    limit = MAX_LENGTH.get(vr)
    if limit is not None and _too_long(text, limit):
        return f"longer than the {limit} characters {vr} allows"
    if _has_control(text):
        return f"a control character, which {vr} does not allow"
    if "\\" in text:
        return f"a backslash, which separates values and cannot be part of a {vr} value"
    return None


def _text(text: str, vr: str) -> str | None:
    limit = MAX_LENGTH.get(vr)
    if limit is not None and _too_long(text, limit):
        return f"longer than the {limit} characters {vr} allows"
    if _has_control(text, _TEXT_CONTROLS):
        return f"a control character other than CR, LF and FF, which {vr} does not allow"
    return None


def _person_name(text: str) -> str | None:
    groups = text.split("=")
    if len(groups) > 3:
        return f"{len(groups)} component groups where PN allows 3"
    for group in groups:
        if group.count("^") > 4:
            return f"{group.count('^') + 1} components where PN allows 5"
        if _too_long(group, MAX_LENGTH["PN"]):
            return "a component group longer than the 64 characters PN allows"
    if _has_control(text):
        return "a control character, which PN does not allow"
    if "\\" in text:
        return "a backslash, which separates values and cannot be part of a PN value"
    return None


def _calendar_date(year: str, month: str, day: str) -> bool:
    try:
        date(int(year), int(month), int(day))
    except ValueError:
        return False
    return True


def _clock(hour: str | None, minute: str | None, second: str | None) -> bool:
    return (
        (hour is None or int(hour) <= 23)
        and (minute is None or int(minute) <= 59)
        and (second is None or int(second) <= 60)
    )


def _date_time(text: str) -> str | None:
    match = _DT.fullmatch(text)
    if match is None or len(text) > MAX_LENGTH["DT"]:
        return "not a DT of the form YYYY[MM[DD[HH[MM[SS[.F]]]]]][&ZZXX]"
    year, month, day, hour, minute, second, _fraction, sign, off_h, off_m = match.groups()
    if month is not None and not 1 <= int(month) <= 12:
        return "a month outside 01-12"
    if day is not None and not _calendar_date(year, month, day):
        return "a day that is not in the calendar"
    if not _clock(hour, minute, second):
        return "an hour, minute or second out of range"
    if sign is not None and (int(off_h) > 14 or int(off_m) > 59):
        return "an offset from UTC out of range"
    return None


def _strip(value: str, vr: str) -> str:
    """The value without the padding PS3.5 calls insignificant for ``vr``."""
    if vr in ("DS", "IS", "AE", "CS", "DA", "TM", "DT", "AS", "LO", "SH", "PN", "UC"):
        return value.strip(" ")
    if vr in ("ST", "LT", "UT"):
        return value.rstrip(" ")
    if vr == "UI":
        return value.rstrip("\x00")
    return value


def check_value(vr: str, value: Any) -> str | None:
    """Why ``value`` is not a valid single value of ``vr``, or ``None`` when it is.

    ``value`` is one value as pydicom holds it (``str`` for text VRs; ``int``, ``float``
    or their pydicom subclasses for numbers; a ``PersonName`` is taken as its text). A VR
    this module has no rule for (sequences, bulk data, attribute tags) is accepted: the
    node records none of those.
    """
    if vr in _INTEGER_RANGES:
        low, high = _INTEGER_RANGES[vr]
        if isinstance(value, bool) or not isinstance(value, int):
            return f"not an integer, which {vr} needs"
        return None if low <= value <= high else f"outside the range {vr} can hold"
    if vr in ("FL", "FD"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"not a number, which {vr} needs"
        if not math.isfinite(value) or (vr == "FL" and abs(value) > _FLOAT32_MAX):
            return f"not a finite number {vr} can hold"
        return None
    if vr == "DS" and isinstance(value, int | float) and not isinstance(value, bool):
        return None if math.isfinite(value) else "not a finite number, which DS needs"
    if vr == "IS" and isinstance(value, int) and not isinstance(value, bool):
        return None if -(2**31) <= value < 2**31 else "outside the 32 bits IS can hold"
    if not isinstance(value, str):
        value = str(value)
    text = _strip(value, vr)
    if text == "" and vr != "UI":
        return None  # an empty value is a value of every VR (Type 2 attributes)
    if vr in ("AE", "LO", "SH", "UC", "UR"):
        return _string(text, vr)
    if vr in ("ST", "LT", "UT"):
        return _text(text, vr)
    if vr == "PN":
        return _person_name(text)
    if vr == "CS":
        if len(text) > MAX_LENGTH["CS"]:
            return "longer than the 16 characters CS allows"
        ok = _CS.fullmatch(text)
        return None if ok else "a character other than A-Z, 0-9, space and underscore"
    if vr == "AS":
        return None if _AS.fullmatch(text) else "not an age of the form nnnD, nnnW, nnnM or nnnY"
    if vr == "DA":
        match = _DA.fullmatch(text)
        if match is None:
            return "not a date of the form YYYYMMDD"
        return None if _calendar_date(*match.groups()) else "a date that is not in the calendar"
    if vr == "TM":
        match = _TM.fullmatch(text)
        if match is None or len(text) > MAX_LENGTH["TM"]:
            return "not a time of the form HH[MM[SS[.FFFFFF]]]"
        return None if _clock(*match.groups()[:3]) else "an hour, minute or second out of range"
    if vr == "DT":
        return _date_time(text)
    if vr == "DS":
        if len(text) > MAX_LENGTH["DS"] or _DS.fullmatch(text) is None:
            return "not a decimal string of at most 16 characters"
        return None if math.isfinite(float(text)) else "not a finite number, which DS needs"
    if vr == "IS":
        if len(text) > MAX_LENGTH["IS"] or _IS.fullmatch(text) is None:
            return "not an integer string of at most 12 characters"
        return None if -(2**31) <= int(text) < 2**31 else "outside the 32 bits IS can hold"
    if vr == "UI":
        return None if is_valid_uid(text) else "not a UID (digits and dots, at most 64)"
    return None


def check_vm(keyword: str, count: int) -> str | None:
    """Why ``count`` values are too many or too few for ``keyword``, or ``None``.

    The data dictionary's VM: ``1``, ``2``, ``1-n``, ``2-2n``, ``1-3``... An attribute the
    dictionary does not know is accepted (the node records only dictionary attributes).
    """
    tag = tag_for_keyword(keyword)
    if tag is None or count == 0:
        return None
    vm = dictionary_VM(tag)
    low_text, _, high_text = vm.partition("-")
    if not low_text.isdigit():
        return None
    low = int(low_text)
    if not high_text:
        ok = count == low
    elif high_text == "n":
        ok = count >= low
    elif high_text.endswith("n"):  # "2-2n", "3-3n": a multiple of the step
        step = int(high_text[:-1] or 1)
        ok = count >= low and count % step == 0
    else:
        ok = low <= count <= int(high_text)
    return None if ok else f"{count} values where the dictionary allows {vm}"


def check_attribute(keyword: str, vr: str, values: list[Any] | tuple[Any, ...]) -> str | None:
    """Why the values of one attribute cannot be copied, or ``None`` when they all can."""
    reason = check_vm(keyword, len(values))
    if reason is not None:
        return reason
    for value in values:
        reason = check_value(vr, value)
        if reason is not None:
            return reason
    return None
