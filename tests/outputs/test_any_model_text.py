"""Whatever the model writes, every object we emit is valid: random model text (any Unicode,
lone surrogates, control characters, ten thousand characters, nothing) goes through every
builder, and dciodvfy finds no error in any object.

The number of examples per builder is bounded (each one runs dciodvfy on a file), so the
test stays within seconds; Hypothesis draws new examples on every run.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_checks import dciodvfy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import Dataset

from cxrnode.outputs.findings_sr import build_findings_sr
from cxrnode.outputs.pdf import build_pdf
from cxrnode.outputs.report_sr import build_report_sr
from cxrnode.outputs.sc import build_sc
from model.contracts import FINDING_STATES, FINDINGS, ModelResult

EXAMPLES_PER_BUILDER = 30

ANY_CHARACTER = st.characters(exclude_categories=())  # lone surrogates included
CONTROL_HEAVY = st.sampled_from(
    ["\t", "\r", "\n", "\r\n", "\x00", "\x1b", "\x0b", "\x0c", "\x7f", "\x85", "\u2028", "\\"]
    + [" ", "a", "é", "漢", "\U0001f600", "\u202e", "\ufeff", "word"]
)
MODEL_TEXT = st.one_of(
    st.just(""),
    st.text(ANY_CHARACTER, max_size=300),
    st.lists(CONTROL_HEAVY, max_size=120).map("".join),
    # ten thousand characters: a chunk of anything, repeated
    st.text(ANY_CHARACTER, min_size=1, max_size=40).map(
        lambda s: (s * (10_000 // len(s) + 1))[:10_000]
    ),
)
DRAFTS = st.builds(
    ModelResult,
    report=MODEL_TEXT,
    differential=MODEL_TEXT,
    recommendation=MODEL_TEXT,
    findings=st.dictionaries(st.sampled_from(FINDINGS), st.sampled_from(FINDING_STATES)),
    model_id=st.text(ANY_CHARACTER, max_size=80).filter(str.strip),
    model_hash=st.just("5e" * 32),
    pipeline_version=st.just("0.1.0"),
    prompts=st.dictionaries(st.sampled_from(["report", "differential"]), MODEL_TEXT, max_size=2),
)
INSTITUTIONS = st.one_of(st.none(), st.text(ANY_CHARACTER, max_size=100))


def _display() -> np.ndarray:
    return np.tile(np.linspace(0, 255, 48).astype(np.uint8), (64, 1))


BUILDERS: dict[str, Callable[[Dataset, ModelResult, str | None], Dataset]] = {
    "text-report SR": lambda src, draft, inst: build_report_sr(src, draft, institution_name=inst),
    "TID 1500 SR": lambda src, draft, inst: build_findings_sr(src, draft, institution_name=inst),
    "Secondary Capture": lambda src, draft, inst: build_sc(
        src, _display(), draft, institution_name=inst, full_text_series="x"
    ),
    "Encapsulated PDF": lambda src, draft, inst: build_pdf(src, draft, institution_name=inst),
}


@pytest.mark.parametrize("builder", list(BUILDERS))
def test_any_model_text_gives_an_object_dciodvfy_finds_no_error_in(
    builder: str, synthetic: Callable[..., Dataset]
) -> None:
    source = synthetic("DX", rows=64, cols=48)
    build = BUILDERS[builder]

    @settings(
        max_examples=EXAMPLES_PER_BUILDER,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(draft=DRAFTS, institution=INSTITUTIONS)
    def check(draft: ModelResult, institution: str | None) -> None:
        ds = build(source, draft, institution)
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "object.dcm"
            ds.save_as(path, enforce_file_format=True)
            result = dciodvfy(path)
            assert result.errors == [], result.output
            reread = pydicom.dcmread(path)
        for element in reread.iterall():  # every text decodes as the declared UTF-8
            if element.VR in ("UT", "ST", "LT", "LO", "SH", "PN"):
                str(element.value)
        if builder == "text-report SR":
            for element in reread.iterall():
                if element.keyword == "TextValue":
                    assert all(len(line) <= 100 for line in element.value.split("\n"))

    check()
