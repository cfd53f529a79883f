"""Fixtures for the model tests: one tiny checkpoint and one engine per session (CPU, fp32)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "cxr-llava-tiny", seed=0)


@pytest.fixture(scope="session")
def engine(tiny_dir: Path):
    from model.pipeline import ReportEngine

    return ReportEngine.load(tiny_dir, device="cpu")


def study_images(n: int) -> list[np.ndarray]:
    """``n`` different uint8 radiograph-like images of odd, different sizes."""
    rng = np.random.default_rng(1234)
    images = []
    for k in range(n):
        h, w = 515 + 37 * k, 523 + 29 * ((k * 3) % 7)
        y, x = np.mgrid[0:h, 0:w]
        cy, cx = h * (0.3 + 0.05 * k), w * (0.6 - 0.04 * k)
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * (60 + 15 * k) ** 2))
        ramp = (x / w) * (k % 3) / 2 + (y / h) * ((k + 1) % 2)
        img = 200 * blob + 40 * ramp + rng.normal(0, 8, (h, w))
        images.append(np.clip(img, 0, 255).astype(np.uint8))
    return images


@pytest.fixture(scope="session")
def images() -> list[np.ndarray]:
    return study_images(8)
