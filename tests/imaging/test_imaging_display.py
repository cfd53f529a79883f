"""DICOM pixels become the 8-bit picture a radiologist would see: lungs dark, bones bright."""

from pathlib import Path

import dicomgen
import numpy as np
import pydicom
import pytest
from data_store import DataStore
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.sequence import Sequence

from cxrnode.prepare.display import ImagingError, display_image, prepared_image
from model.preprocess import resize_and_crop

ROWS, COLS = 96, 80

VARIANTS = {
    "dx_mono2_window_12bit": {},
    "cr_mono1_window": {"modality": "CR", "photometric": "MONOCHROME1"},
    "dx_mono1_inverse_shape": {"photometric": "MONOCHROME1"},  # DX writes INVERSE with MONO1
    "cr_mono2_inverse_shape": {"modality": "CR", "presentation_lut_shape": "INVERSE"},
    "dx_voi_lut": {"voi": "lut"},
    "cr_mono1_voi_lut": {"modality": "CR", "photometric": "MONOCHROME1", "voi": "lut"},
    "dx_no_voi": {"voi": "none"},
    "cr_mono1_no_voi": {"modality": "CR", "photometric": "MONOCHROME1", "voi": "none"},
    "cr_14bit": {"modality": "CR", "bits_stored": 14},
    "dx_16bit": {"bits_stored": 16},
    "dx_16bit_voi_lut": {"bits_stored": 16, "voi": "lut"},
    "cr_rescale": {"modality": "CR", "rescale": (0.5, -1000.0)},
    "dx_signed": {"signed": True},
    "dx_signed_voi_lut": {"signed": True, "voi": "lut"},
    "cr_modality_lut_sequence": {"modality": "CR", "modality_lut": True},
    "dx_linear_exact": {"voi_function": "LINEAR_EXACT"},
    "dx_sigmoid": {"voi_function": "SIGMOID"},
    "dx_junk_in_unused_high_bits": {"overlay_noise": True},
    "dx_for_processing": {"for_processing": True},
}


def _truth8(rows: int = ROWS, cols: int = COLS) -> np.ndarray:
    return np.rint(dicomgen.phantom(rows, cols) * 255.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("display")
    return {
        name: dicomgen.make_chest(out / f"{name}.dcm", rows=ROWS, cols=COLS, **kwargs)
        for name, kwargs in VARIANTS.items()
    }


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_renders_the_phantom(files: dict[str, Path], name: str) -> None:
    img = display_image(files[name])
    truth = _truth8()
    assert img.dtype == np.uint8 and img.shape == (ROWS, COLS)
    error = np.abs(img - truth)
    # SIGMOID never reaches 0 or 255 exactly, so its encoding is approximate by a few levels.
    limit = 4 if name == "dx_sigmoid" else 1
    assert error.max() <= limit, f"max error {error.max()}"
    assert np.corrcoef(img.ravel(), truth.ravel())[0, 1] > 0.999


def _pydicom_reference(source: Path | pydicom.Dataset) -> np.ndarray:
    """The textbook per-pixel pipeline with pydicom's own LUT functions."""
    ds = source if isinstance(source, pydicom.Dataset) else pydicom.dcmread(source)
    stored = ds.pixel_array
    mod = apply_modality_lut(stored, ds)
    if "VOILUTSequence" in ds:
        out = apply_voi_lut(np.rint(mod).astype(np.int64), ds) / 65535.0
    elif "WindowCenter" in ds:
        bits = ds.BitsStored
        lo, hi = (
            (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            if ds.PixelRepresentation
            else (0, 2**bits - 1)
        )
        if "ModalityLUTSequence" in ds:
            lo, hi = 0, 2 ** ds.ModalityLUTSequence[0].LUTDescriptor[2] - 1
        elif "RescaleSlope" in ds:
            lo = lo * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            hi = hi * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        out = (apply_voi_lut(mod, ds) - lo) / (hi - lo)
    else:
        out = (mod - mod.min()) / (mod.max() - mod.min())
    if ds.PhotometricInterpretation == "MONOCHROME1" or ds.get("PresentationLUTShape") == "INVERSE":
        out = 1.0 - out
    return np.rint(out * 255.0)


@pytest.mark.filterwarnings("ignore:Applying a VOI LUT on a float")
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_folded_lookup_table_matches_pydicoms_per_pixel_pipeline(
    files: dict[str, Path], name: str
) -> None:
    ours = display_image(files[name]).astype(np.int64)
    reference = _pydicom_reference(files[name])
    assert np.abs(ours - reference).max() <= 1


@pytest.mark.parametrize("function", [None, "LINEAR", "LINEAR_EXACT"])
@pytest.mark.parametrize("width", [1, 2, 7])
def test_narrow_windows_follow_the_standard_formulas(
    files: dict[str, Path], function: str | None, width: int
) -> None:
    # Narrow windows make LINEAR's (center - 0.5, width - 1) differ visibly from LINEAR_EXACT.
    ds = pydicom.dcmread(files["dx_mono2_window_12bit"])
    ds.WindowCenter = int(np.median(ds.pixel_array))
    ds.WindowWidth = width
    if function is not None:
        ds.VOILUTFunction = function
    if function == "LINEAR_EXACT" or width > 1:
        assert np.abs(display_image(ds) - _pydicom_reference(ds)).max() <= 1
    else:  # LINEAR with width 1 is a threshold at center - 0.5
        expected = np.where(ds.pixel_array > ds.WindowCenter - 0.5, 255, 0)
        np.testing.assert_array_equal(display_image(ds), expected)


@pytest.mark.parametrize("kind", dicomgen.COMPRESSIONS)
@pytest.mark.parametrize(
    "name", ["cr_mono1_window", "dx_16bit", "dx_signed_voi_lut", "dx_junk_in_unused_high_bits"]
)
def test_compressed_copies_render_identically(
    files: dict[str, Path], tmp_path: Path, kind: str, name: str
) -> None:
    copy = dicomgen.compress(files[name], tmp_path / f"{name}-{kind}.dcm", kind)
    np.testing.assert_array_equal(display_image(copy), display_image(files[name]))


def test_multi_frame_images_show_the_first_frame(tmp_path: Path) -> None:
    path = dicomgen.make_chest(tmp_path / "mf.dcm", rows=ROWS, cols=COLS, frames=3)
    j2k = dicomgen.compress(path, tmp_path / "mf-j2k.dcm", "j2k")
    assert np.abs(display_image(path) - _truth8()).max() <= 1
    np.testing.assert_array_equal(display_image(j2k), display_image(path))


def test_a_dataset_in_memory_renders_like_its_file(files: dict[str, Path]) -> None:
    path = files["cr_mono1_voi_lut"]
    np.testing.assert_array_equal(display_image(pydicom.dcmread(path)), display_image(path))


def test_voi_lut_declaring_16_bits_for_12_bit_entries_is_scaled_by_its_real_range(
    files: dict[str, Path],
) -> None:
    ds = pydicom.dcmread(files["dx_voi_lut"])
    item = ds.VOILUTSequence[0]
    item.LUTData = (np.frombuffer(item.LUTData, "<u2") >> 4).astype("<u2").tobytes()
    assert item.LUTDescriptor[2] == 16
    assert np.abs(display_image(ds) - _truth8()).max() <= 2


def test_first_window_and_first_voi_lut_are_used(files: dict[str, Path]) -> None:
    ds = pydicom.dcmread(files["dx_mono2_window_12bit"])
    ds.WindowCenter = [ds.WindowCenter, 10]
    ds.WindowWidth = [ds.WindowWidth, 20]
    assert np.abs(display_image(ds) - _truth8()).max() <= 1
    lut = pydicom.dcmread(files["dx_voi_lut"])
    lut.VOILUTSequence = Sequence([lut.VOILUTSequence[0], lut.VOILUTSequence[0].__class__()])
    assert np.abs(display_image(lut) - _truth8()).max() <= 1


def test_real_chest_radiograph_has_dark_lungs_and_bright_mediastinum() -> None:
    img = display_image(dicomgen.pydicom_data_chest("RG1_UNCR")).astype(float)
    h, w = img.shape

    def mean(y0: float, y1: float, x0: float, x1: float) -> float:
        return float(img[int(y0 * h) : int(y1 * h), int(x0 * w) : int(x1 * w)].mean())

    right_lung, left_lung = mean(0.2, 0.3, 0.2, 0.3), mean(0.2, 0.3, 0.66, 0.76)
    spine, heart = mean(0.3, 0.6, 0.46, 0.52), mean(0.55, 0.7, 0.55, 0.65)
    assert max(right_lung, left_lung) + 50 < min(spine, heart)


def test_real_chest_jpeg2000_lossless_copy_decodes_to_the_same_image() -> None:
    np.testing.assert_array_equal(
        display_image(dicomgen.pydicom_data_chest("RG1_J2KR")),
        display_image(dicomgen.pydicom_data_chest("RG1_UNCR")),
    )


@pytest.mark.parametrize(
    "other",
    [
        "emri_small_big_endian.dcm",
        "emri_small_RLE.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
    ],
)
def test_other_transfer_syntaxes_of_one_image_agree(other: str) -> None:
    store = DataStore()
    reference = display_image(store.get_path("emri_small.dcm"))
    np.testing.assert_array_equal(display_image(store.get_path(other)), reference)


def test_objects_without_pixels_are_refused_with_imaging_error(tmp_path: Path) -> None:
    with pytest.raises(ImagingError, match="no Pixel Data"):
        display_image(dicomgen.make_no_pixels(tmp_path / "bare.dcm", rows=16, cols=16))


def test_non_dicom_and_truncated_files_are_refused_with_imaging_error(tmp_path: Path) -> None:
    with pytest.raises(ImagingError, match="not a DICOM"):
        display_image(dicomgen.make_garbage(tmp_path / "junk.bin", 4096))
    full = dicomgen.make_chest(tmp_path / "full.dcm", rows=64, cols=64)
    for fraction in (0.1, 0.6, 0.99):
        with pytest.raises(ImagingError):
            display_image(dicomgen.truncate(full, tmp_path / f"cut{fraction}.dcm", fraction))


def test_palette_colour_is_refused_with_imaging_error(files: dict[str, Path]) -> None:
    ds = pydicom.dcmread(files["dx_mono2_window_12bit"])
    ds.PhotometricInterpretation = "PALETTE COLOR"
    with pytest.raises(ImagingError, match="PALETTE COLOR"):
        display_image(ds)


def test_exact_prepared_image_is_the_reference_preprocessing(files: dict[str, Path]) -> None:
    path = files["cr_mono1_window"]
    np.testing.assert_array_equal(
        prepared_image(path, 64), resize_and_crop(display_image(path), 64)
    )


def test_fast_prepared_image_stays_within_a_few_grey_levels_of_the_reference(
    tmp_path: Path,
) -> None:
    # Scale 4 (1100 x 1030 -> 256), so the fast road really box-reduces before LANCZOS.
    path = dicomgen.make_chest(
        tmp_path / "big.dcm", rows=1100, cols=1030, seed=3, photometric="MONOCHROME1"
    )
    exact = prepared_image(path, 256).astype(int)
    fast = prepared_image(path, 256, exact=False).astype(int)
    error = np.abs(fast - exact)
    assert fast.shape == (256, 256)
    assert error.mean() < 0.5 and error.max() <= 12 and (error > 2).mean() < 0.01


def _opens_of(path: Path, action) -> int:
    """How many times ``action()`` opens ``path`` (Linux inotify IN_OPEN events)."""
    import contextlib
    import ctypes
    import ctypes.util
    import os
    import struct

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK)
    assert fd >= 0
    try:
        # IN_OPEN | IN_CLOSE_NOWRITE: alternating events, which inotify does not merge
        assert libc.inotify_add_watch(fd, str(path).encode(), 0x20 | 0x10) >= 0
        action()
        opens, buffer = 0, b""
        with contextlib.suppress(BlockingIOError):
            buffer = os.read(fd, 1 << 16)
        offset = 0
        while offset < len(buffer):
            _, mask, _, length = struct.unpack_from("iIII", buffer, offset)
            opens += bool(mask & 0x20)
            offset += 16 + length
        return opens
    finally:
        os.close(fd)


@pytest.mark.parametrize("voi", ["window", "none"])
def test_a_large_image_is_read_through_one_open_of_its_file(tmp_path: Path, voi: str) -> None:
    """Pixel Data above the deferral size stays in the file and is read in slices (twice
    without VOI: histogram, then table); the header and both passes share one open."""
    path = dicomgen.make_chest(tmp_path / "large.dcm", rows=1100, cols=900, voi=voi)
    assert path.stat().st_size > 1024 * 1024  # above the 1 MiB deferral threshold
    shown: list[np.ndarray] = []
    assert _opens_of(path, lambda: shown.append(display_image(path))) == 1
    in_memory = display_image(pydicom.dcmread(path))  # no deferral: pydicom reads it all
    assert np.array_equal(shown[0], in_memory)
