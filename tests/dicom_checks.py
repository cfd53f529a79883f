"""The real validator, as the output, end-to-end and viewer tests use it.

dciodvfy (dicom3tools) checks every object against its IOD; its 2022 build predates Device
UID in the Contributing Equipment and Author Observer Sequences (PS3.3 lists it today, as does
highdicom's copy of the standard), so the two warnings about that attribute are known.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

STALE_VALIDATOR_WARNINGS = (
    "Attribute is not present in standard DICOM IOD - (0x0018,0x1002) UI Device UID",
    "Dicom dataset contains attributes not present in standard DICOM IOD",
)


@dataclass(frozen=True)
class Validation:
    """Parsed ``dciodvfy`` output."""

    errors: list[str]
    warnings: list[str]
    output: str

    @property
    def unexpected_warnings(self) -> list[str]:
        """Warnings other than the known stale ones about Device UID."""
        return [
            w for w in self.warnings if not any(known in w for known in STALE_VALIDATOR_WARNINGS)
        ]


def dciodvfy(path: Path) -> Validation:
    """Run dciodvfy on a Part-10 file."""
    proc = subprocess.run(
        ["/usr/bin/dciodvfy", str(path)], capture_output=True, text=True, timeout=60
    )
    output = proc.stdout + proc.stderr
    lines = output.splitlines()
    return Validation(
        errors=[line for line in lines if line.startswith("Error")],
        warnings=[line for line in lines if line.startswith("Warning")],
        output=output,
    )
