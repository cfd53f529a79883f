"""Pixel path benchmark: DICOM file -> the model's 512 x 512 8-bit input.

Compares, on the same files and in the same run:

- **plain**: the textbook pipeline — pydicom ``pixel_array`` -> ``apply_modality_lut`` ->
  ``apply_voi_lut`` -> float min/max rescale to 8 bits (MONOCHROME1 inverted) ->
  ``model.preprocess.resize_and_crop``;
- **bare decode**: read the file and get its stored values, nothing else (``np.frombuffer``
  for native syntaxes, pydicom ``pixel_array`` with its default plugin for compressed ones);
- **ours**: ``cxrnode.prepare.display.prepared_image`` (exact: ``display_image`` + ``resize_and_crop``),
  and its ``exact=False`` variant.

Files: a synthetic 2500 x 2048 12-bit MONOCHROME1 CR (with noise, so it compresses like a
real radiograph) and its JPEG lossless (SV1), JPEG-LS and JPEG 2000 lossless copies, written
to a temporary directory; plus the real pydicom-data chest (RG1, 1955 x 1841, 15-bit).

Run: ``.venv/bin/python bench/pixel.py [--repeat 7]``.  Prints median milliseconds per file
and the ratios plain / ours and ours / bare decode.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut, apply_voi_lut

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import dicomgen  # noqa: E402

from cxrnode.prepare.display import display_image, prepared_image  # noqa: E402
from model.preprocess import resize_and_crop  # noqa: E402


def plain(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    arr = apply_modality_lut(arr, ds)
    arr = apply_voi_lut(arr, ds).astype(np.float64)
    arr = (arr - arr.min()) / max(arr.max() - arr.min(), 1e-9) * 255.0
    if ds.PhotometricInterpretation == "MONOCHROME1":
        arr = 255.0 - arr
    return resize_and_crop(arr.astype(np.uint8), 512)


def bare_decode(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return ds.pixel_array
    return np.frombuffer(ds.PixelData, "<u2", count=ds.Rows * ds.Columns).reshape(
        ds.Rows, ds.Columns
    )


def median_ms(fn: Callable[[Path], object], path: Path, repeat: int) -> float:
    fn(path)  # warm up: imports, plugin discovery, page cache
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(path)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Applying a VOI LUT on a float")

    with tempfile.TemporaryDirectory() as tmp:
        src = dicomgen.make_chest(
            Path(tmp) / "cr.dcm",
            modality="CR",
            photometric="MONOCHROME1",
            rows=2500,
            cols=2048,
            seed=1,
        )
        files = {"CR 2500x2048 12-bit, uncompressed": src}
        for kind in dicomgen.COMPRESSIONS:
            files[f"  same, {kind}"] = dicomgen.compress(src, Path(tmp) / f"cr-{kind}.dcm", kind)
        files["RG1 real CR 1955x1841 15-bit, uncompressed"] = dicomgen.pydicom_data_chest(
            "RG1_UNCR"
        )
        files["  same, j2k (pydicom-data)"] = dicomgen.pydicom_data_chest("RG1_J2KR")

        header = (
            f"{'file':44s} {'MB':>5s} {'plain':>7s} {'decode':>7s} {'display':>8s} {'ours':>7s}"
            f" {'fast':>7s} {'plain/ours':>10s} {'ours/dec':>8s} {'plain/fast':>10s} {'fast/dec':>8s}"
        )
        print(
            f"median ms over {args.repeat} runs per file; ours = prepared_image (exact), fast = exact=False"
        )
        print(header)
        for name, path in files.items():
            t_plain = median_ms(plain, path, args.repeat)
            t_bare = median_ms(bare_decode, path, args.repeat)
            t_display = median_ms(display_image, path, args.repeat)
            t_ours = median_ms(prepared_image, path, args.repeat)
            t_fast = median_ms(lambda p: prepared_image(p, exact=False), path, args.repeat)
            size_mb = path.stat().st_size / 1e6
            print(
                f"{name:44s} {size_mb:5.1f} {t_plain:7.1f} {t_bare:7.1f} {t_display:8.1f} {t_ours:7.1f}"
                f" {t_fast:7.1f} {t_plain / t_ours:10.2f} {t_ours / t_bare:8.2f}"
                f" {t_plain / t_fast:10.2f} {t_fast / t_bare:8.2f}"
            )
            exact, fast = (
                prepared_image(path).astype(int),
                prepared_image(path, exact=False).astype(int),
            )
            diff = np.abs(exact - fast)
            print(
                f"{'':44s} fast vs exact: mean |diff| {diff.mean():.3f}, max {diff.max()}, >2: {(diff > 2).mean():.2%}"
            )


if __name__ == "__main__":
    main()
