"""Preprocessing equals transformers' slow CLIPImageProcessor set up as the reference does."""

from __future__ import annotations

import numpy as np
import pytest
import transformers

from model.preprocess import (
    UnsupportedImageError,
    normalize,
    pixel_values,
    resize_and_crop,
    shortest_edge_size,
)

MEAN, STD = 0.5518136078431373, 0.3821719215686275


def reference_processor():
    """The reference's CLIPImageProcessor(...) arguments (spec §2.1), PIL ("slow") backend."""
    return transformers.CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": 512},
        resample=1,
        do_center_crop=True,
        crop_size=512,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=MEAN,
        image_std=STD,
        do_convert_rgb=False,
    )


@pytest.mark.parametrize(
    "shape", [(515, 600), (1031, 517), (301, 300), (512, 512), (700, 1001), (513, 2049), (37, 53)]
)
def test_pixels_equal_the_reference_clip_image_processor_bit_for_bit(shape) -> None:
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    # The reference expands the grayscale array to HxWx1 before calling the processor.
    ref = reference_processor()(np.expand_dims(image, -1), return_tensors="np")["pixel_values"]
    ours = pixel_values(image, MEAN, STD)
    assert ref.shape == (1, 1, 512, 512) and ref.dtype == np.float32
    assert ours.shape == (1, 512, 512) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref[0])


def test_node_side_crop_then_worker_side_normalise_equals_the_one_step_pipeline() -> None:
    image = np.random.default_rng(3).integers(0, 256, (777, 641), dtype=np.uint8)
    cropped = resize_and_crop(image)
    assert cropped.shape == (512, 512) and cropped.dtype == np.uint8
    np.testing.assert_array_equal(resize_and_crop(cropped), cropped)  # idempotent
    np.testing.assert_array_equal(
        normalize(cropped, MEAN, STD)[None], pixel_values(image, MEAN, STD)
    )


def test_resize_keeps_aspect_and_truncates_the_long_side_like_transformers() -> None:
    assert shortest_edge_size(1031, 517) == (1021, 512)  # 512 * 1031 / 517 = 1021.03
    assert shortest_edge_size(515, 601) == (512, 597)  # 597.5 is truncated, not rounded
    assert shortest_edge_size(300, 300) == (512, 512)


def test_odd_crops_take_the_lower_offset() -> None:
    # 512 x 515 after resize: the crop starts at column (515 - 512) // 2 = 1, not round(1.5) = 2.
    image = np.tile(np.arange(515, dtype=np.uint16) % 256, (512, 1)).astype(np.uint8)
    out = resize_and_crop(image)
    np.testing.assert_array_equal(out[0, :4], [1, 2, 3, 4])


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((64, 64, 3), np.uint8), "grayscale"),
        (np.zeros((64, 64), np.uint16), "8-bit"),
        (np.zeros((64, 64), np.float32), "8-bit"),
        (np.zeros((0, 64), np.uint8), "empty"),
        ([[0, 1], [2, 3]], "numpy array"),
    ],
)
def test_anything_but_8bit_grayscale_is_refused_with_advice(image, message) -> None:
    with pytest.raises(UnsupportedImageError, match=message):
        resize_and_crop(image)


def test_a_single_channel_last_axis_is_accepted_as_grayscale() -> None:
    image = np.random.default_rng(5).integers(0, 256, (600, 530, 1), dtype=np.uint8)
    np.testing.assert_array_equal(resize_and_crop(image), resize_and_crop(image[:, :, 0]))
