"""The prepare step: read the chosen image's pixels once, keep what later steps need.

From one read of the source file it makes two images and keeps both under
DATA_DIR/prepared/<study>/:

- ``<sop>.display.npy``: the 8-bit display image (what a radiologist sees), already scaled to
  the size the Secondary Capture draws it at; it is made after the model input is on its way
  to inference (off the critical path), and the outputs step never decodes the source again;
- ``<sop>.input.npy``: the model's 512 x 512 input; it goes to the inference queue in the
  task message, and is kept so that a lost inference message is re-sent without decoding
  the source again.

Both are derived data: written atomically (temporary file, rename) but not fsynced. After a
power loss a missing or short file is simply made again from the source (a third read, only
then). ``.npy`` rather than PNG because saving a 2500 x 2048 PNG costs 0.3-0.8 s and the raw
array about 2 ms.

Decoding is the most CPU-hungry background work of a node: at most PREPARE_CONCURRENCY
decodes run at once in one worker process (:func:`decode_slot`), whatever its thread count,
so a burst of arrivals leaves the listeners their share of the cores.
"""

from __future__ import annotations

import base64
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrnode.ingest.storage import instance_relpath
from cxrnode.prepare.display import ImagingError, display_image, model_input
from cxrnode.settings import Settings

__all__ = [
    "MODEL_INPUT_SIZE",
    "Prepared",
    "PreparedImages",
    "decode_model_input",
    "encode_model_input",
    "keep_display",
    "kept_images",
    "load_display",
    "load_model_input",
    "prepare_images",
]

MODEL_INPUT_SIZE = 512


@dataclass(frozen=True)
class PreparedImages:
    """Where the kept images of one source instance live."""

    display: Path
    model_input: Path


def kept_images(settings: Settings, study_uid: str, sop_uid: str) -> PreparedImages:
    base = settings.prepared_dir / instance_relpath(study_uid, sop_uid).removesuffix(".dcm")
    return PreparedImages(base.with_suffix(".display.npy"), base.with_suffix(".input.npy"))


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
    os.replace(tmp, path)


def _load(path: Path) -> np.ndarray | None:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    return array if array.dtype == np.uint8 and array.ndim == 2 else None


@dataclass(frozen=True)
class Prepared:
    """The two images made from one read of the source."""

    display: np.ndarray  # full-resolution 8-bit display image
    model_input: np.ndarray  # 512 x 512


_decode_slots: threading.BoundedSemaphore | None = None
_decode_slots_lock = threading.Lock()


def decode_slot(settings: Settings) -> threading.BoundedSemaphore:
    """This process's bound on concurrent decodes (PREPARE_CONCURRENCY, set at first use)."""
    global _decode_slots
    with _decode_slots_lock:
        if _decode_slots is None:
            _decode_slots = threading.BoundedSemaphore(settings.prepare_concurrency)
        return _decode_slots


def prepare_images(settings: Settings, source: Path, study_uid: str, sop_uid: str) -> Prepared:
    """Decode ``source`` once; keep its model input (the display image is kept by
    :func:`keep_display`, once the model input is on its way). Return both images.

    Raises
    ------
    ImagingError
        The pixels cannot be read or rendered (the reason names what is wrong).
    """
    with decode_slot(settings):  # at most PREPARE_CONCURRENCY at once in this process
        display = display_image(source)  # one open of the source; only the 8-bit image is kept
        tensor = model_input(display, MODEL_INPUT_SIZE, exact=settings.exact_resize)
    _save(kept_images(settings, study_uid, sop_uid).model_input, tensor)
    return Prepared(display, tensor)


def keep_display(settings: Settings, study_uid: str, sop_uid: str, display: np.ndarray) -> None:
    """Keep the display image the outputs are drawn from (already at the size they need)."""
    _save(kept_images(settings, study_uid, sop_uid).display, display)


def load_display(settings: Settings, study_uid: str, sop_uid: str, source: Path) -> np.ndarray:
    """The kept display image, or (when it is missing) one made again from ``source``."""
    display = _load(kept_images(settings, study_uid, sop_uid).display)
    return display if display is not None else display_image(source)


def load_model_input(settings: Settings, study_uid: str, sop_uid: str) -> np.ndarray | None:
    """The kept model input, or None when it is missing (prepare again)."""
    tensor = _load(kept_images(settings, study_uid, sop_uid).model_input)
    if tensor is not None and tensor.shape != (MODEL_INPUT_SIZE, MODEL_INPUT_SIZE):
        return None
    return tensor


def encode_model_input(image: np.ndarray) -> str:
    """The model input for a JSON task message: its 512 x 512 raw bytes in base64 (~350 KB).

    Raw rather than PNG: encoding a PNG cost ~6 ms and decoding ~3 ms on each side of the
    inference hop, for a message Redis carries as easily at twice the size.
    """
    if image.dtype != np.uint8 or image.shape != (MODEL_INPUT_SIZE, MODEL_INPUT_SIZE):
        raise ImagingError(
            f"the model input must be uint8 {MODEL_INPUT_SIZE} x {MODEL_INPUT_SIZE}; "
            f"got {image.dtype} {image.shape}"
        )
    return base64.b64encode(np.ascontiguousarray(image).tobytes()).decode("ascii")


def decode_model_input(payload: str) -> np.ndarray:
    """The inverse of :func:`encode_model_input`."""
    try:
        raw = base64.b64decode(payload, validate=True)
    except (ValueError, TypeError) as exc:
        raise ImagingError(f"the task message's image is not base64: {exc}") from exc
    if len(raw) != MODEL_INPUT_SIZE * MODEL_INPUT_SIZE:
        raise ImagingError(
            f"the task message's image has {len(raw)} bytes; expected "
            f"{MODEL_INPUT_SIZE * MODEL_INPUT_SIZE} (a {MODEL_INPUT_SIZE}² 8-bit image)"
        )
    return np.frombuffer(raw, dtype=np.uint8).reshape(MODEL_INPUT_SIZE, MODEL_INPUT_SIZE)
