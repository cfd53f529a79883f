"""Image preprocessing for CXR-LLaVA v2, numpy + PIL only (importable without torch).

The reference feeds an 8-bit grayscale array to transformers' slow ``CLIPImageProcessor``
configured as (docs/model.md, "Preprocessing")::

    do_resize=True, size={"shortest_edge": 512}, resample=1 (PIL LANCZOS),
    do_center_crop=True, crop_size=512, do_rescale=True, rescale_factor=1/255,
    do_normalize=True, image_mean=<scalar>, image_std=<scalar>, do_convert_rgb=False

This module reproduces that pipeline bit for bit, split in two so the node can do the
geometric part (``resize_and_crop``: uint8 in, uint8 out, small payload) and the GPU worker the
arithmetic part (``normalize``). ``resize_and_crop`` is idempotent on an already-cropped image:
PIL returns a copy when the target size equals the source size.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

DEFAULT_SIZE = 512
LANCZOS = Image.Resampling.LANCZOS  # == 1, what the reference's ``resample=True`` evaluates to


class UnsupportedImageError(ValueError):
    """The input is not an 8-bit grayscale image."""


def check_grayscale_u8(image: np.ndarray) -> np.ndarray:
    """Return ``image`` as a 2-D uint8 array, or refuse it with a message that says what to do.

    Accepts HxW or HxWx1 uint8. Anything else (RGB, 16-bit, float) is refused rather than
    guessed at: windowing and MONOCHROME1 inversion belong to the DICOM side
    (``cxrnode.prepare.display.display_image``), and colour images must be converted with PIL's
    ``.convert("L")`` as the reference does.
    """
    if not isinstance(image, np.ndarray):
        raise UnsupportedImageError(
            f"expected a numpy array (uint8, HxW), found {type(image).__name__}; convert PIL images "
            "with np.asarray(img.convert('L'))."
        )
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim != 2:
        raise UnsupportedImageError(
            f"expected a grayscale image of shape HxW, found shape {image.shape}; convert colour "
            "images to luma first (PIL .convert('L'))."
        )
    if image.dtype != np.uint8:
        raise UnsupportedImageError(
            f"expected 8-bit pixels (uint8), found {image.dtype}; apply the modality/VOI LUT and "
            "scale to 0..255 first (cxrnode.prepare.display.display_image does this for DICOM)."
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise UnsupportedImageError(f"image is empty (shape {image.shape}).")
    return image


def shortest_edge_size(height: int, width: int, size: int = DEFAULT_SIZE) -> tuple[int, int]:
    """(new_height, new_width) with the short side at ``size``; the long side is truncated.

    Same arithmetic as transformers' ``get_resize_output_image_size(default_to_square=False)``.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(image: np.ndarray, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Crop ``size`` x ``size`` from the centre, offsets rounded down (transformers' rule)."""
    h, w = image.shape[:2]
    if h < size or w < size:
        raise UnsupportedImageError(
            f"cannot centre-crop {size}x{size} from a {h}x{w} image; resize the short edge first."
        )
    top, left = (h - size) // 2, (w - size) // 2
    return image[top : top + size, left : left + size]


def resize_and_crop(image: np.ndarray, size: int = DEFAULT_SIZE) -> np.ndarray:
    """uint8 HxW of any size -> uint8 ``size`` x ``size``: LANCZOS shortest edge, centre crop."""
    image = check_grayscale_u8(image)
    new_h, new_w = shortest_edge_size(image.shape[0], image.shape[1], size)
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((new_w, new_h), resample=LANCZOS)
    return np.ascontiguousarray(center_crop(np.asarray(resized), size))


def normalize(image: np.ndarray, mean: float, std: float) -> np.ndarray:
    """uint8 HxW -> float32 HxW, ``(x / 255 - mean) / std`` with transformers' rounding.

    Rescaling is done in float64 and rounded to float32, then mean and std are applied in
    float32, which is what ``rescale`` and ``normalize`` in transformers' slow path do.
    """
    image = check_grayscale_u8(image)
    scaled = (image.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (scaled - np.float32(mean)) / np.float32(std)


def pixel_values(
    image: np.ndarray, mean: float, std: float, size: int = DEFAULT_SIZE
) -> np.ndarray:
    """uint8 HxW of any size -> float32 [1, size, size], the model's per-image input."""
    return normalize(resize_and_crop(image, size), mean, std)[None]
