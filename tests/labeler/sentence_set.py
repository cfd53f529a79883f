"""Reading the labelled sentence files (``sentences.tsv``, ``holdout.tsv``) and scoring them."""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
VALUES = {"1": 1, "0": 0, "-1": -1, "none": None}


@dataclass(frozen=True)
class Case:
    line: int
    text: str
    expected: Mapping[str, int | None]


def read_cases(path: Path, findings: tuple[str, ...]) -> list[Case]:
    """Parse a TSV of ``text<TAB>finding=value ...`` lines; ``#`` lines are comments."""
    cases: list[Case] = []
    with path.open(newline="", encoding="utf-8") as handle:
        rows = csv.reader((line for line in handle), delimiter="\t", quoting=csv.QUOTE_NONE)
        for number, row in enumerate(rows, start=1):
            if not row or row[0].startswith("#") or row == ["text", "expected"]:
                continue
            if len(row) != 2:
                raise ValueError(
                    f"{path.name}:{number}: expected 2 tab-separated columns, got {len(row)}"
                )
            expected: dict[str, int | None] = {}
            for item in row[1].split():
                name, _, value = item.partition("=")
                if name not in findings or value not in VALUES:
                    raise ValueError(f"{path.name}:{number}: bad label {item!r}")
                expected[name] = VALUES[value]
            if not expected:
                raise ValueError(f"{path.name}:{number}: no expected labels")
            cases.append(Case(number, row[0], expected))
    return cases


def score(
    cases: list[Case], label: Callable[[str], Mapping[str, int | None]], findings: tuple[str, ...]
) -> tuple[dict[str, tuple[int, int]], list[tuple[Case, str, int | None, int | None]]]:
    """Per finding (correct, total) over the labels the cases state, and the misses."""
    tally = {name: [0, 0] for name in findings}
    misses: list[tuple[Case, str, int | None, int | None]] = []
    for case in cases:
        got = label(case.text)
        for name, want in case.expected.items():
            tally[name][1] += 1
            if got[name] == want:
                tally[name][0] += 1
            else:
                misses.append((case, name, want, got[name]))
    return {k: (v[0], v[1]) for k, v in tally.items()}, misses
