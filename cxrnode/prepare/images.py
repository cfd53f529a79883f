"""The prepare step: read the chosen image's pixels once, keep what later steps need.

From one read of the source file it makes two images and keeps both under
DATA_DIR/prepared/<study>/:

- ``<sop>.display.npy``: the full-resolution 8-bit display image (what a radiologist sees);
  the Secondary Capture is drawn from it, so the deliver step never decodes the source again;
- ``<sop>.input.npy``: the model's 512 x 512 input; it goes to the inference queue in the
  task message, and is kept so that a lost inference message is re-sent without decoding
  the source again.

Both are derived data: written atomically (temporary file, rename) but not fsynced. After a
power loss a missing or short file is simply made again from the source (a third read, only
then). ``.npy`` rather than PNG because saving a 2500 x 2048 PNG costs 0.3-0.8 s and the raw
array about 2 ms.
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cxrnode.ingest.storage import instance_relpath
from cxrnode.prepare.display import ImagingError, display_image, model_input, read_dataset
from cxrnode.settings import Settings

__all__ = [
    "MODEL_INPUT_SIZE",
    "PreparedImages",
    "decode_model_input",
    "encode_model_input",
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


def prepare_images(settings: Settings, source: Path, study_uid: str, sop_uid: str) -> np.ndarray:
    """Decode ``source`` once, keep its display image and model input; return the input.

    Raises
    ------
    ImagingError
        The pixels cannot be read or rendered (the reason names what is wrong).
    """
    dataset = read_dataset(source)
    display = display_image(dataset)
    del dataset  # the decoded frame can be large; keep only the 8-bit image
    tensor = model_input(display, MODEL_INPUT_SIZE, exact=settings.exact_resize)
    kept = kept_images(settings, study_uid, sop_uid)
    _save(kept.display, display)
    _save(kept.model_input, tensor)
    return tensor


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
    """The model input for a JSON task message: PNG (lossless, ~100-200 KB) in base64."""

    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_model_input(payload: str) -> np.ndarray:

    try:
        with Image.open(io.BytesIO(base64.b64decode(payload))) as image:
            return np.asarray(image.convert("L"))
    except (OSError, ValueError) as exc:
        raise ImagingError(f"the task message's image is not a readable PNG: {exc}") from exc
