"""Text made safe for DICOM and HL7 in one place: every text value an output carries passes here.

The model writes whatever it likes: tabs, NUL bytes, escape sequences, any Unicode, ten
thousand characters on one line, nothing at all, and U+FFFD where its byte tokens do not
form UTF-8. :func:`sanitise` is the one cleaner every output uses, the DICOM objects and the
HL7 ORU alike (:func:`cxrnode.hl7.message.escape` runs it before escaping HL7's
delimiters): line breaks of every spelling become LF, TAB becomes a space, every other
control character, lone surrogate and U+FFFD is removed. A DICOM text value may then hold
only what PS3.5 §6.2 allows for its VR, and we declare UTF-8 (Specific Character Set
``ISO_IR 192``). What each VR gets:

- **Multi-line text (UT, ST, LT):** graphic characters and line breaks. PS3.5 allows the
  control characters CR, LF, FF and ESC there; we write line breaks as LF only (CR, CR LF,
  FF, VT and the Unicode line and paragraph separators become LF), drop ESC (UTF-8 has no
  code extensions to announce) and every other control character, and turn TAB into a
  space (a TAB in a Text Value is what made dciodvfy reject an SR).
- **One-line strings (LO, SH, UC):** no control character at all (a line break becomes a
  space) and no backslash, which separates values (it becomes "/").
- **Person names (PN):** as one-line strings; "^" and "=" keep their meaning as component
  and group delimiters.
- **Code strings (CS):** upper-case letters, digits, space and underscore only.
- Lone UTF-16 surrogates cannot be encoded in UTF-8 and are dropped everywhere.

**Lengths.** PS3.5 gives the limits in characters (LO 64, SH 16, CS 16, ST 1024, LT 10240,
PN 64 per component group). Validators and some archives count bytes instead (dciodvfy
rejects a 64-character LO of "é" as 128 bytes long), so a value is cut to the limit in
characters *and* to as many whole characters as fit in that many bytes of UTF-8: within
both readings of the standard, never in the middle of a character.

**Line breaking** (:func:`wrap`) is one algorithm for every output: paragraphs stay
paragraphs, lines break at spaces, a word longer than a line is split. The text-report SR
breaks at 100 characters (:data:`REPORT_LINE_WIDTH`: OHIF draws a Finding as preformatted
text that does not wrap); the SC and the PDF break at their pixel or point width by passing
their font's measure.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterator

__all__ = [
    "REPLACEMENT_CHARACTER",
    "REPORT_LINE_WIDTH",
    "VR_LIMITS",
    "code_string",
    "iter_lines",
    "multi_line",
    "one_line",
    "person_name",
    "report_text",
    "sanitise",
    "value_for_vr",
    "wrap",
]

#: What a decoder writes for bytes that do not form UTF-8; never part of what the model meant.
REPLACEMENT_CHARACTER = "\ufffd"

#: Longest line of the text-report SR, in characters.
REPORT_LINE_WIDTH = 100

#: PS3.5 Table 6.2-1 maximum lengths in characters (per component group for PN);
#: ``None``: no limit that model text can reach (UT: 2**32 - 2 bytes).
VR_LIMITS: dict[str, int | None] = {
    "CS": 16,
    "SH": 16,
    "LO": 64,
    "PN": 64,
    "ST": 1024,
    "LT": 10240,
    "UT": None,
    "UC": None,
}

# Line breaks of every spelling: CR LF, CR, VT, FF, NEL, LINE SEPARATOR, PARAGRAPH SEPARATOR.
_LINE_BREAKS = re.compile(r"\r\n|[\r\x0b\x0c\x85\u2028\u2029]")
_BLANK_LINES = re.compile(r"\n{3,}")
_CS_FORBIDDEN = re.compile(r"[^A-Z0-9 _]")


def sanitise(text: str) -> str:
    """``text`` as any output may carry it, DICOM or HL7: line breaks as LF (CR LF, CR, VT,
    FF, NEL and the Unicode separators included), TAB as a space, and no other control
    character (Unicode Cc), lone surrogate or U+FFFD."""
    text = _LINE_BREAKS.sub("\n", text).replace("\t", " ")
    return "".join(
        char
        for char in text
        if char == "\n"
        or (char != REPLACEMENT_CHARACTER and unicodedata.category(char) not in ("Cc", "Cs"))
    )


def _cut(value: str, limit: int | None) -> str:
    """At most ``limit`` characters and at most ``limit`` bytes of UTF-8, whole characters."""
    if limit is None:
        return value
    value = value[:limit]
    while len(value.encode("utf-8")) > limit:
        value = value[:-1]
    return value


def multi_line(text: str, limit: int | None = None) -> str:
    """A value for UT, ST or LT: line breaks as LF, TAB as a space, no other control
    character, trailing spaces of each line and blank lines at either end removed, at most
    one empty line in a row; cut to ``limit`` (characters and bytes) when given."""
    lines = [line.rstrip(" ") for line in sanitise(text).split("\n")]
    text = _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip("\n")
    return _cut(text, limit).rstrip()


def one_line(text: str, limit: int | None = None) -> str:
    """A value for LO, SH or UC: one line, no control character, no backslash, outer
    spaces stripped; cut to ``limit`` (characters and bytes) when given."""
    text = sanitise(text).replace("\n", " ").replace("\\", "/")
    return _cut(text.strip(), limit).strip()


def person_name(text: str) -> str:
    """A value for PN: one line, no backslash, each component group (``=``) at most 64
    characters and bytes."""
    groups = one_line(text).split("=")
    return "=".join(_cut(group, VR_LIMITS["PN"]) for group in groups[:3])


def code_string(text: str) -> str:
    """A value for CS: upper case, anything but letters, digits, space and underscore
    replaced by an underscore, at most 16 characters."""
    text = one_line(text).upper()
    return _cut(_CS_FORBIDDEN.sub("_", text), VR_LIMITS["CS"]).strip()


def value_for_vr(text: str, vr: str) -> str:
    """``text`` made valid for the VR ``vr`` (one of :data:`VR_LIMITS`).

    Raises
    ------
    ValueError
        For a VR this module does not handle (say, a date or a number).
    """
    if vr not in VR_LIMITS:
        raise ValueError(
            f"value_for_vr handles the text VRs {sorted(VR_LIMITS)}; got {vr!r} (dates, times "
            "and numbers are built from typed values, not from text)"
        )
    if vr in ("UT", "ST", "LT"):
        return multi_line(text, VR_LIMITS[vr])
    if vr == "PN":
        return person_name(text)
    if vr == "CS":
        return code_string(text)
    return one_line(text, VR_LIMITS[vr])


def wrap(text: str, width: float, measure: Callable[[str], float] = len) -> list[str]:
    """Break ``text`` into lines no wider than ``width``.

    Each line of the text starts a new line; within one, lines break at spaces, and a
    word wider than ``width`` is split (at least one character a line, so a glyph wider
    than the line cannot stall it). ``measure`` gives a string's width: ``len`` (the
    default) counts characters; a font's ``getlength`` counts pixels.
    """
    return list(iter_lines(text, width, measure))


def iter_lines(text: str, width: float, measure: Callable[[str], float] = len) -> Iterator[str]:
    """The lines of :func:`wrap`, one at a time: a page that is full stops asking, so ten
    thousand characters cost only what is printed."""
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            if not word:
                continue
            candidate = f"{line} {word}" if line else word
            if measure(candidate) <= width:
                line = candidate
                continue
            if line:
                yield line
            while len(word) > 1:
                cut = _longest_prefix(word, width, measure)
                if cut == len(word):
                    break
                yield word[:cut]
                word = word[cut:]
            line = word
        yield line


def _longest_prefix(word: str, width: float, measure: Callable[[str], float]) -> int:
    """Length of the longest prefix of ``word`` that fits ``width`` (at least 1).

    Doubling, then halving: only prefixes up to twice the answer are measured, which
    matters for a font whose measure grows with the string (a 10 000-character "word").
    """
    fits, high = 1, 2
    while high <= len(word) and measure(word[:high]) <= width:
        fits, high = high, high * 2
    high = min(high, len(word) + 1)  # word[:high] does not fit, or is past the end
    while high - fits > 1:
        middle = (fits + high) // 2
        if measure(word[:middle]) <= width:
            fits = middle
        else:
            high = middle
    return fits


def report_text(text: str) -> str:
    """Model text as the text-report SR holds it: :func:`multi_line`, then lines of at
    most :data:`REPORT_LINE_WIDTH` characters."""
    return "\n".join(wrap(multi_line(text), REPORT_LINE_WIDTH))
