"""Fixtures for the SR/SC output tests: sources, drafts and the real DICOM validators.

Sources are the real chest radiograph shipped in pydicom-data (``RG1_UNCR.dcm``, CR PA,
15-bit MONOCHROME1) and synthetic CR/DX chests from ``tests/dicomgen.py``. Validation uses
the installed tools themselves: dicom3tools ``dciodvfy`` and dcmtk ``dsrdump``/``dsr2html``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import settings
from pydicom import Dataset

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import dicomgen  # noqa: E402
from dicom_checks import Validation, dciodvfy  # noqa: E402

from model.contracts import ModelResult  # noqa: E402

MODEL_HASH = "3f" * 32

# Property tests draw new examples every run and keep no example database in the work tree.
settings.register_profile("cxrnode", database=None)
settings.load_profile("cxrnode")


def _rg1_path() -> Path:
    import data_store

    path = Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: install the test extra (pydicom-data) to get the real chest "
            "radiograph the output tests use"
        )
    return path


@pytest.fixture(scope="session")
def rg1_path() -> Path:
    return _rg1_path()


@pytest.fixture(scope="session")
def rg1(rg1_path: Path) -> Dataset:
    """Metadata of the real CR chest (read without pixels, as the deliver step may)."""
    return pydicom.dcmread(rg1_path, stop_before_pixels=True)


@pytest.fixture(scope="session")
def rg1_display(rg1_path: Path) -> np.ndarray:
    """A plain 8-bit display of the real chest (lungs dark): 1/99 percentile window, inverted
    for MONOCHROME1. Test-only stand-in for cxrnode.prepare.display.display_image."""
    ds = pydicom.dcmread(rg1_path)
    pixels = ds.pixel_array.astype(np.float32)
    low, high = np.percentile(pixels, [1, 99])
    scaled = np.clip((pixels - low) / (high - low), 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.round(scaled * 255).astype(np.uint8)


@pytest.fixture
def synthetic() -> Callable[..., Dataset]:
    """Factory of synthetic chest datasets (dicomgen), e.g. ``synthetic("DX")``."""

    def make(modality: str = "DX", **kwargs: object) -> Dataset:
        kwargs.setdefault("rows", 96)
        kwargs.setdefault("cols", 80)
        return dicomgen.build_chest(modality=modality, **kwargs)

    return make


@pytest.fixture
def make_draft() -> Callable[..., ModelResult]:
    """Factory of drafts with sensible defaults; keyword arguments override fields."""

    def make(**fields: object) -> ModelResult:
        values: dict[str, object] = {
            "report": (
                "Findings: The heart is enlarged. Small right pleural effusion. "
                "No pneumothorax. Impression: Cardiomegaly with a small right effusion."
            ),
            "differential": "Congestive heart failure; fluid overload.",
            "recommendation": "Follow-up radiograph after diuresis.",
            "findings": {
                "cardiomegaly": "present",
                "pleural_effusion": "present",
                "pneumothorax": "absent",
                "pneumonia": "uncertain",
            },
            "model_id": "/models/ECOFRI/CXR-LLAVA-v2",
            "model_hash": MODEL_HASH,
            "pipeline_version": "0.1.0",
            "prompts": {"report": "default"},
        }
        values.update(fields)
        return ModelResult(**values)  # type: ignore[arg-type]

    return make


@pytest.fixture
def validate(tmp_path: Path) -> Callable[[Dataset], Validation]:
    """Write a dataset as a Part-10 file and run dciodvfy on it."""
    counter = iter(range(1_000_000))

    def run(ds: Dataset) -> Validation:
        path = tmp_path / f"object{next(counter)}.dcm"
        ds.save_as(path, enforce_file_format=True)
        return dciodvfy(path)

    return run


@pytest.fixture
def save(tmp_path: Path) -> Callable[[Dataset, str], Path]:
    """Write a dataset under the test's temporary directory and return the path."""

    def write(ds: Dataset, name: str) -> Path:
        path = tmp_path / name
        ds.save_as(path, enforce_file_format=True)
        return path

    return write
