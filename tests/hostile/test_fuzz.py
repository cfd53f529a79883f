"""Fuzzing the header reader and the pixel path with hypothesis, for a bounded time.

Mutations of a good chest radiograph's Part-10 bytes (flipped bytes, cut and spliced ranges,
rewritten length fields, zeroed runs) go through the ingest's checks
(:func:`cxrnode.ingest.receive.inspect`) and, when those accept an image the model would
read, through :func:`cxrnode.prepare.display.display_image`. Allowed outcomes:
:class:`~cxrnode.ingest.receive.Refused` (a DICOM status) and
:class:`~cxrnode.prepare.display.ImagingError` (a job failed with a reason). Anything else
is written to ``crashes/`` before the test fails, so the corpus replays it from then on
(``corpus.py``). ``FUZZ_EXAMPLES`` (default 1500, about 10 s here) and ``FUZZ_SECONDS``
(default 20) bound the run; hypothesis shrinks a failure before the test reports it.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
import warnings

import corpus
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cxrnode.ingest.receive import Refused, dataset_offset, inspect
from cxrnode.prepare.display import ImagingError, display_image, read_dataset

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1500"))
FUZZ_SECONDS = float(os.environ.get("FUZZ_SECONDS", "20"))
SEED = corpus.good_dataset(sop_uid=corpus.SEED_UID)
SEED_BYTES = corpus.Case(
    "seed", corpus.encode(SEED), sop_instance=corpus.SEED_UID, sop_class=corpus.CR
).part10()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(SEED_BYTES)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "cut", "splice", "length", "zero"]))
        at = draw(st.integers(132, len(data) - 1))
        if kind == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        elif kind == "splice":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        elif kind == "length":
            data[at : at + 4] = draw(
                st.sampled_from([b"\xff\xff\xff\xff", b"\0\0\0\x7f", b"\x01\0\0\0", b"\0\0"])
            )
        else:
            data[at : at + 16] = bytes(16)
    return bytes(data)


def ingest_then_prepare(data: bytes, path: str) -> None:
    """What the node does with these bytes, less the disk and the database."""
    stream = io.BytesIO(data)
    try:
        start = dataset_offset(stream)
        header = inspect(stream, corpus.ExplicitVRLittleEndian, corpus.CR, corpus.SEED_UID, start)
    except Refused:
        return
    if header.skip_reason is not None:
        return  # stored and skipped: never prepared
    with open(path, "wb") as handle:
        handle.write(data)
    try:
        display_image(read_dataset(path))
    except ImagingError:
        return


def test_mutated_radiographs_never_crash_the_ingest_or_the_pixel_path(tmp_path) -> None:  # noqa: ANN001
    deadline = time.monotonic() + FUZZ_SECONDS
    examples = []

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(mutated())
    def fuzz(data: bytes) -> None:
        if time.monotonic() > deadline:
            return
        examples.append(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ingest_then_prepare(data, str(tmp_path / "candidate.dcm"))
            except Exception:
                corpus.CRASHES.mkdir(exist_ok=True)
                name = hashlib.sha256(data).hexdigest()[:16]
                (corpus.CRASHES / f"{name}.bin").write_bytes(data)
                raise

    fuzz()
    assert len(examples) >= min(FUZZ_EXAMPLES, 100), "the fuzzer ran"
