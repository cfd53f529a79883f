"""DICOM pixels -> the 8-bit display image the model reads and the Secondary Capture shows.

The model was trained on 8-bit chest radiographs as a radiologist sees them: lungs dark,
bones bright.  A DICOM radiograph gets there through the grayscale pipeline of PS3.3 C.11:
stored value -> Modality LUT (Rescale Slope/Intercept or Modality LUT Sequence) -> VOI LUT
(VOI LUT Sequence, or Window Center/Width with VOI LUT Function LINEAR, LINEAR_EXACT or
SIGMOID) -> polarity (MONOCHROME1 and Presentation LUT Shape INVERSE invert) -> 8 bits.

Every step depends only on the stored value, so for 8-16 bit data the whole pipeline is
folded into **one** ``uint8`` table indexed by the raw stored word (masking the bits above
High Bit, sign extension, modality, VOI, inversion and rounding included) and applied with
one ``np.take``.  That is exact for every pixel, costs one table of at most 65 536 entries,
and avoids the float64 image copies of the textbook per-pixel pipeline.  Native
(uncompressed) pixel data is viewed in place with ``np.frombuffer``; compressed pixel data is
decoded by the fastest licence-compatible pydicom plugin for its transfer syntax.

**Memory.** A file is read with its large values deferred (:func:`read_dataset`), so the
Pixel Data of an uncompressed image never sits in memory whole: it is read from the file in
slices of :data:`_SLICE_BYTES`, once for the histogram (only when there is no VOI) and once
through the table. Given a path, :func:`display_image` opens the file once: the header, the
deferred values and both pixel passes read through the same handle. Preparing such an image
takes the 8-bit output (Rows x Columns bytes) plus a few MiB; a compressed one takes its encoded bytes plus the decoded frame, which
ingest bounds with MAX_IMAGE_MB (docs/hardening.md). Histograms are counted in slices too:
``np.bincount`` of a whole 16-bit image would first copy it as 64-bit indices (4x its size).

Nothing here imports torch: the node process runs this in its "prepare" step.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from model.preprocess import resize_and_crop, shortest_edge_size

__all__ = [
    "ImagingError",
    "display_image",
    "display_lut",
    "model_input",
    "prepared_image",
    "read_dataset",
]

LOGGER = logging.getLogger(__name__)


class ImagingError(ValueError):
    """The object cannot be turned into a display image (not an image, no or bad pixels).

    The message names what was expected and what was found; it never contains patient data.
    """


# Little-endian native syntaxes whose Pixel Data can be viewed in place (pydicom has already
# inflated a deflated dataset when it read it).
_NATIVE_LE = frozenset(
    {ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
)

# Decoder plugins in order of preference, measured on 2500 x 2048 chest radiographs
# (bench/pixel.py): for JPEG-LS, CharLS (pyjpegls) takes about 90 ms where GDCM takes 155;
# for JPEG 2000, GDCM about 400 ms where pylibjpeg-openjpeg and Pillow take 540-590.
# pylibjpeg-libjpeg is deliberately absent (GPLv3): JPEG lossless goes to GDCM.
_PLUGIN_ORDER: dict[str, tuple[str, ...]] = {
    JPEGLSLossless: ("pyjpegls", "gdcm"),
    JPEGLSNearLossless: ("pyjpegls", "gdcm"),
    JPEG2000Lossless: ("gdcm", "pylibjpeg", "pillow"),
    JPEG2000: ("gdcm", "pylibjpeg", "pillow"),
}
_DEFAULT_PLUGIN_ORDER = ("gdcm", "pylibjpeg", "pyjpegls", "pillow", "pydicom")

# Share of pixels clipped at each end when an image carries no VOI at all.
_FALLBACK_PERCENTILE = 0.005

_CHUNK = 1 << 16  # pixels per np.take call: keeps the int index buffer in cache

#: Values longer than this stay in the file until used (Pixel Data above all).
_DEFER_BYTES = 1 << 20
#: Bytes of uncompressed Pixel Data read from the file at a time.
_SLICE_BYTES = 4 << 20
_PIXEL_DATA_TAG = 0x7FE00010
_UNDEFINED_LENGTH = 0xFFFFFFFF


# --------------------------------------------------------------------------- reading


def read_dataset(
    source: str | os.PathLike | BinaryIO | Dataset, *, stop_before_pixels: bool = False
) -> Dataset:
    """Return ``source`` as a pydicom Dataset, reading it if it is a path or an open file.

    Large values stay in the file until used. Read from an open file, they are read back
    through that same handle while it stays open (pydicom reopens the file by name only
    once it is closed).

    Raises
    ------
    ImagingError
        The file is missing, unreadable or not DICOM.
    """
    if isinstance(source, Dataset):
        return source
    name = getattr(source, "name", source)
    try:
        ds = pydicom.dcmread(source, stop_before_pixels=stop_before_pixels, defer_size=_DEFER_BYTES)
        if _transfer_syntax_or_none(ds) == DeflatedExplicitVRLittleEndian:
            # inflated in memory when read: deferred values could not be read back later
            if isinstance(source, io.IOBase):
                source.seek(0)
            ds = pydicom.dcmread(source, stop_before_pixels=stop_before_pixels)
        elif isinstance(source, io.BufferedReader):
            ds.buffer = source  # deferred values: this handle while it is open
        return ds
    except InvalidDicomError as exc:
        raise ImagingError(
            f"{os.fspath(name)!r} is not a DICOM Part-10 file (no DICM preamble): {exc}; "
            "expected a file as written by a C-STORE SCP"
        ) from exc
    except (
        OSError,
        EOFError,
        ValueError,
        KeyError,
        TypeError,
        NotImplementedError,
        BytesLengthException,
    ) as exc:
        # NotImplementedError: pydicom's answer to a value representation it does not know;
        # BytesLengthException: a value whose length does not fit its VR (a damaged File Meta
        # group, which ingest skips by its group length)
        raise _unreadable(name, exc) from exc


def _unreadable(name: Any, exc: Exception) -> ImagingError:
    return ImagingError(
        f"could not read {os.fspath(name)!r} as DICOM ({type(exc).__name__}: {exc}); "
        "the file may be truncated or corrupt — ask the sender to re-send it"
    )


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        if default is None:
            raise ImagingError(
                f"the Image Pixel module lacks {keyword}; cannot interpret Pixel Data"
            )
        return default
    return int(value)


def _first(value: Any) -> Any:
    """First value of a possibly multi-valued element (pydicom MultiValue or list)."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        return value
    values = list(value)
    return values[0] if values else None


def _check_image(ds: Dataset) -> None:
    if "PixelData" not in ds:
        what = f"SOP Class {ds.get('SOPClassUID', '?')}, Modality {ds.get('Modality', '?')}"
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise ImagingError(
                f"object ({what}) has float pixel data; expected integer Pixel Data of a radiograph"
            )
        raise ImagingError(
            f"object ({what}) has no Pixel Data; expected an image such as CR or DX — "
            "the sender may have sent a report, a presentation state or a header-only object"
        )
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if rows <= 0 or cols <= 0:
        raise ImagingError(f"image has Rows={rows}, Columns={cols}; expected both > 0")


def _transfer_syntax_or_none(ds: Dataset) -> UID | None:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(ts) if ts is not None else None


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is None:
        raise ImagingError(
            "dataset has no file meta Transfer Syntax UID; expected a Part-10 file or a "
            "dataset with file_meta set (pass the path instead)"
        )
    return UID(ts)


# --------------------------------------------------------------------------- decoding


def _native_frame(ds: Dataset, rows: int, cols: int, bits_allocated: int) -> np.ndarray:
    """First frame of little-endian native Pixel Data, viewed without a copy."""
    dtype = np.dtype("<u2") if bits_allocated == 16 else np.dtype("u1")
    data = ds.PixelData
    need = rows * cols * dtype.itemsize
    if len(data) < need:
        raise ImagingError(
            f"Pixel Data holds {len(data)} bytes but one {rows}x{cols} frame of "
            f"{bits_allocated}-bit samples needs {need}; the file is truncated — re-send it"
        )
    return np.frombuffer(data, dtype=dtype, count=rows * cols).reshape(rows, cols)


def _deferred_native(ds: Dataset, rows: int, cols: int, bits_allocated: int) -> Any:
    """(open file or file name, offset, dtype) of uncompressed little-endian Pixel Data that
    is still in its file (deferred when read), or None when it is in memory or not plain."""
    if _transfer_syntax_or_none(ds) not in _NATIVE_LE or bits_allocated not in (8, 16):
        return None
    raw = ds.get_item(_PIXEL_DATA_TAG, keep_deferred=True)
    handle = getattr(ds, "buffer", None)  # the file the header came from, if still open
    open_file = isinstance(handle, io.BufferedReader) and not handle.closed
    where = handle if open_file else getattr(ds, "filename", None)
    if getattr(raw, "value", b"") is not None or not isinstance(where, str | io.BufferedReader):
        return None
    if raw.length == _UNDEFINED_LENGTH or raw.value_tell is None:
        return None
    dtype = np.dtype("<u2") if bits_allocated == 16 else np.dtype("u1")
    need = rows * cols * dtype.itemsize
    if raw.length < need:
        raise ImagingError(
            f"Pixel Data holds {raw.length} bytes but one {rows}x{cols} frame of "
            f"{bits_allocated}-bit samples needs {need}; the file is truncated — re-send it"
        )
    return where, raw.value_tell, dtype


def _file_slices(
    source: str | io.BufferedReader, offset: int, count: int, dtype: np.dtype
) -> Iterable[np.ndarray]:
    """``count`` samples of ``dtype`` from ``offset`` of a file (a name, or a file already
    open, which is left open), in slices."""
    per_slice = max(1, _SLICE_BYTES // dtype.itemsize)
    handle = open(source, "rb") if isinstance(source, str) else source  # noqa: SIM115
    try:
        handle.seek(offset)
        for start in range(0, count, per_slice):
            block = np.empty(min(per_slice, count - start), dtype=dtype)
            if handle.readinto(memoryview(block).cast("B")) != block.nbytes:
                raise ImagingError("Pixel Data ends early; the file is truncated — re-send it")
            yield block
    finally:
        if handle is not source:
            handle.close()


def _histogram(slices: Iterable[np.ndarray], size: int) -> np.ndarray:
    """How many pixels hold each word, counted a slice at a time."""
    hist = np.zeros(size, dtype=np.int64)
    for block in slices:
        flat = block.reshape(-1)
        for start in range(0, flat.size, 16 * _CHUNK):
            hist += np.bincount(flat[start : start + 16 * _CHUNK], minlength=size)
    return hist


def _display_from_file(ds: Dataset, source: Any, rows: int, cols: int) -> np.ndarray:
    """The display image of deferred uncompressed pixels, read from the file in slices: the
    histogram pass (only when there is no VOI) and the table pass."""
    where, offset, dtype = source
    index_bits = 8 * dtype.itemsize
    table = _lut_for(
        ds,
        index_bits,
        lambda: _histogram(_file_slices(where, offset, rows * cols, dtype), 1 << index_bits),
    )
    out = np.empty(rows * cols, dtype=np.uint8)
    position = 0
    for block in _file_slices(where, offset, rows * cols, dtype):
        out[position : position + block.size] = _apply(table, block)
        position += block.size
    return out.reshape(rows, cols)


def _decoded_frame(ds: Dataset, ts: UID, *, raw: bool = True) -> np.ndarray:
    """First frame through pydicom's decoders, trying plugins in our order of preference."""
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise ImagingError(
            f"no decoder for transfer syntax {ts} ({ts.name}); expected uncompressed, RLE, "
            "JPEG lossless, JPEG-LS or JPEG 2000 — ask the sender to transcode"
        ) from exc
    available = list(decoder.available_plugins) if not decoder.is_native else [""]
    order = [p for p in _PLUGIN_ORDER.get(ts, _DEFAULT_PLUGIN_ORDER) if p in available]
    order += [p for p in available if p not in order]
    if not order:
        raise ImagingError(
            f"no installed plugin decodes {ts.name}; install python-gdcm or pylibjpeg-openjpeg"
        )
    errors = []
    for plugin in order:
        try:
            arr, _ = decoder.as_array(ds, index=0, raw=raw, decoding_plugin=plugin)
            return arr
        except Exception as exc:  # each plugin fails in its own way; try the next one
            errors.append(f"{plugin or 'native'}: {type(exc).__name__}: {exc}")
    raise ImagingError(f"could not decode {ts.name} pixel data ({'; '.join(errors)})")


def _stored_frame(ds: Dataset) -> np.ndarray:
    """Raw stored words of the first frame as an unsigned 8- or 16-bit array.

    The words are *not* masked or sign-extended: :func:`display_lut` tables absorb both.
    """
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    bits_allocated = _int(ds, "BitsAllocated")
    bits_stored = _int(ds, "BitsStored", bits_allocated)
    if not 1 <= bits_stored <= 16:
        raise ImagingError(f"BitsStored is {bits_stored}; expected 1..16 for a radiograph")
    ts = _transfer_syntax(ds)
    if ts in _NATIVE_LE and bits_allocated in (8, 16):
        arr = _native_frame(ds, rows, cols, bits_allocated)
    else:
        arr = _decoded_frame(ds, ts)
        if arr.ndim == 3:  # some plugins keep a frame axis
            arr = arr[0]
    if arr.dtype.kind == "i":
        arr = arr.view(np.dtype(arr.dtype.str.replace("i", "u")))  # same bits, unsigned
    if arr.dtype.itemsize > 2:
        arr = (arr & ((1 << bits_stored) - 1)).astype(np.uint16)
    return arr


# --------------------------------------------------------------------------- grayscale


def _lut_descriptor(item: Dataset, *, negative_input: bool) -> tuple[int, int, int]:
    """(entries, first mapped value, bits per entry) of a LUT Descriptor.

    The entry count is unsigned even when the element is SS (0 means 65536), and a first
    mapped value written as US for signed input is reinterpreted as two's complement.
    """
    elem = item.get("LUTDescriptor")
    if elem is None or len(elem) != 3:
        raise ImagingError(f"LUT Descriptor is {elem!r}; expected three values")
    n, first, bits = (int(v) for v in elem)
    if n <= 0:
        n += 65536
    if negative_input and first >= 32768 and item["LUTDescriptor"].VR == "US":
        first -= 65536
    return n, first, bits


def _lut_data(ds: Dataset, item: Dataset, n: int, bits: int) -> np.ndarray:
    elem = item["LUTData"]
    if isinstance(elem.value, bytes | bytearray):
        meta = getattr(ds, "file_meta", None)
        ts = meta.get("TransferSyntaxUID") if meta is not None else None
        little = UID(ts).is_little_endian if ts is not None else True
        data = np.frombuffer(elem.value, dtype="<u2" if little else ">u2")
    else:
        data = np.asarray(list(elem.value) if not isinstance(elem.value, int) else [elem.value])
    if len(data) < n and bits == 8 and len(data) * 2 >= n:
        data = np.frombuffer(
            data.astype("<u2").tobytes(), dtype=np.uint8
        )  # two 8-bit entries per word
    if len(data) < n:
        raise ImagingError(f"LUT Data has {len(data)} entries but the LUT Descriptor declares {n}")
    return data[:n].astype(np.float64)


def _modality(ds: Dataset, stored: np.ndarray, signed: bool) -> np.ndarray:
    """Modality values (float64) for an array of stored values (PS3.3 C.11.1)."""
    seq = ds.get("ModalityLUTSequence")
    if seq:
        item = seq[0]
        if "LUTDescriptor" in item and "LUTData" in item:
            n, first, bits = _lut_descriptor(item, negative_input=signed)
            table = _lut_data(ds, item, n, bits)
            return table[np.clip(stored - first, 0, n - 1)]
    slope = _float(ds.get("RescaleSlope"), 1.0)
    intercept = _float(ds.get("RescaleIntercept"), 0.0)
    if slope == 0.0:
        slope = 1.0  # a zero slope would flatten the image; treat as absent
    return stored.astype(np.float64) * slope + intercept


def _float(value: Any, default: float) -> float:
    value = _first(value)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _voi(ds: Dataset, mod: np.ndarray, counts: Callable[[], np.ndarray] | None) -> np.ndarray:
    """VOI output scaled to [0, 1] for modality values ``mod`` (PS3.3 C.11.2).

    ``counts`` returns, lazily, how many pixels hold each entry of ``mod``; only the
    no-VOI fallback needs it.
    """
    seq = ds.get("VOILUTSequence")
    if seq and "LUTDescriptor" in seq[0] and "LUTData" in seq[0]:
        item = seq[0]
        n, first, bits = _lut_descriptor(item, negative_input=bool(mod.size and mod.min() < 0))
        table = _lut_data(ds, item, n, bits)
        out_max = float((1 << bits) - 1)
        top = int(table.max()) if table.size else 0
        if 0 < top < (1 << (bits - 1)):
            # Descriptor claims more bits than the data uses (a common vendor slip, e.g. 16
            # declared for 12-bit entries): scale by what the entries can actually reach.
            out_max = float((1 << top.bit_length()) - 1)
        idx = np.clip(np.rint(mod).astype(np.int64) - first, 0, n - 1)
        return np.clip(table[idx] / out_max, 0.0, 1.0)

    center = _float(ds.get("WindowCenter"), np.nan)
    width = _float(ds.get("WindowWidth"), np.nan)
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if np.isfinite(center) and np.isfinite(width) and width > 0:
        if function == "SIGMOID":
            return 1.0 / (1.0 + np.exp(-4.0 * (mod - center) / width))
        if function == "LINEAR_EXACT":
            return np.clip((mod - center) / width + 0.5, 0.0, 1.0)
        if function != "LINEAR":
            LOGGER.warning("unknown VOI LUT Function %r; using LINEAR", function)
        if width <= 1.0:  # LINEAR with width 1 is a threshold at center - 0.5
            return (mod > center - 0.5).astype(np.float64)
        return np.clip((mod - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)

    # No usable VOI: window on the image's own range, ignoring the extreme 0.5 % at each end
    # (burnt-in markers, dead pixels, collimator edges).
    weights = counts() if counts is not None else np.ones_like(mod)
    order = np.argsort(mod, kind="stable")
    cum = np.cumsum(weights[order])
    total = cum[-1] if cum.size else 0
    if total <= 0:
        return np.zeros_like(mod)
    lo = mod[order][
        min(np.searchsorted(cum, _FALLBACK_PERCENTILE * total, side="right"), cum.size - 1)
    ]
    hi = mod[order][
        min(np.searchsorted(cum, (1 - _FALLBACK_PERCENTILE) * total, side="left"), cum.size - 1)
    ]
    if hi <= lo:
        return (mod > lo).astype(np.float64)
    return np.clip((mod - lo) / (hi - lo), 0.0, 1.0)


def _inverted(ds: Dataset) -> bool:
    """MONOCHROME1 and Presentation LUT Shape INVERSE both mean "high value = dark".

    DX requires INVERSE exactly when the data are MONOCHROME1 (PS3.3 C.8.11.3.1.2), so the
    two describe one inversion, not two.
    """
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    return photometric == "MONOCHROME1" or shape == "INVERSE"


def display_lut(ds: Dataset, raw: np.ndarray) -> np.ndarray:
    """The ``uint8`` table that maps raw stored words to display values.

    Parameters
    ----------
    ds
        Dataset with the Image Pixel, Modality LUT, VOI LUT and Presentation attributes.
    raw
        The raw stored words of the frame (unsigned 8- or 16-bit view, as decoded).  Its
        dtype sets the table size; its histogram is read only when the dataset has no VOI
        and the window must come from the image itself.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of 2**16 entries (2**8 for 8-bit words): ``table[word]`` is the
        display value of a pixel stored as ``word``, unused high bits and sign included.
    """
    index_bits = 8 * raw.dtype.itemsize
    if raw.dtype.kind != "u" or index_bits > 16:
        raise ImagingError(f"raw stored words must be uint8 or uint16, got {raw.dtype}")
    return _lut_for(ds, index_bits, lambda: _histogram([raw], 1 << index_bits))


def _lut_for(ds: Dataset, index_bits: int, histogram: Callable[[], np.ndarray]) -> np.ndarray:
    """:func:`display_lut` for words of ``index_bits`` bits; ``histogram`` returns, lazily,
    how many pixels hold each word (only an image without VOI needs it)."""
    bits_stored = min(_int(ds, "BitsStored", _int(ds, "BitsAllocated")), index_bits)
    signed = _int(ds, "PixelRepresentation", 0) == 1
    mask = (1 << bits_stored) - 1
    words = np.arange(1 << index_bits, dtype=np.int64)
    stored_of_word = words & mask
    if signed:
        sign = 1 << (bits_stored - 1)
        stored_of_word = np.where(
            stored_of_word & sign, stored_of_word - (1 << bits_stored), stored_of_word
        )
    smin = -(1 << (bits_stored - 1)) if signed else 0
    stored = np.arange(smin, smin + (1 << bits_stored), dtype=np.int64)

    def counts() -> np.ndarray:
        hist = histogram()
        per_value = np.bincount(stored_of_word - smin, weights=hist, minlength=stored.size)
        padding = ds.get("PixelPaddingValue")
        if padding is not None and smin <= int(padding) < smin + stored.size:
            per_value[int(padding) - smin] = 0  # padding is "not image" (PS3.3 C.7.5.1.1.2)
        return per_value

    value = _voi(ds, _modality(ds, stored, signed), counts)
    if _inverted(ds):
        value = 1.0 - value
    table = np.rint(np.clip(value, 0.0, 1.0) * 255.0).astype(np.uint8)
    return table[stored_of_word - smin]


def _apply(table: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """``table[raw]`` in cache-sized chunks (one full-size intp index copy is slower)."""
    flat = np.ascontiguousarray(raw).reshape(-1)
    out = np.empty(flat.size, dtype=np.uint8)
    for start in range(0, flat.size, _CHUNK):
        stop = min(start + _CHUNK, flat.size)
        np.take(table, flat[start:stop], out=out[start:stop])
    return out.reshape(raw.shape)


def display_image(source: str | os.PathLike | Dataset) -> np.ndarray:
    """Decode an image and render its first frame as a radiologist would see it.

    Parameters
    ----------
    source
        Path of a DICOM Part-10 file, or a dataset read with its pixels.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of shape (Rows, Columns): lungs dark, bones bright, whatever the
        photometric interpretation.  Colour images (RGB, YBR) are converted with the PIL luma
        transform, as the reference model code does for its inputs.

    Raises
    ------
    ImagingError
        Not DICOM, no pixel data, truncated pixel data, an unsupported photometric
        interpretation or transfer syntax, or a decoder failure.
    """
    if isinstance(source, Dataset):
        return _render(source)
    try:
        handle = open(source, "rb")  # noqa: SIM115
    except OSError as exc:
        raise _unreadable(source, exc) from exc
    with handle:  # one open: header, deferred values and pixels through the same handle
        return _render(read_dataset(handle))


def _render(ds: Dataset) -> np.ndarray:
    try:
        return _display(ds)
    except ImagingError:
        raise
    except Exception as exc:  # an attribute pydicom cannot convert (a broken VR, a bad number)
        raise ImagingError(
            f"the image's attributes cannot be read ({type(exc).__name__}: {exc}); the file "
            "is damaged — ask the sender to re-send it"
        ) from exc


def _display(ds: Dataset) -> np.ndarray:
    _check_image(ds)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if _int(ds, "SamplesPerPixel", 1) != 1:
            raise ImagingError(
                f"{photometric} image has SamplesPerPixel {ds.SamplesPerPixel}; expected 1"
            )
        rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
        in_file = _deferred_native(ds, rows, cols, _int(ds, "BitsAllocated"))
        if in_file is not None:
            bits_stored = _int(ds, "BitsStored", _int(ds, "BitsAllocated"))
            if not 1 <= bits_stored <= 16:
                raise ImagingError(f"BitsStored is {bits_stored}; expected 1..16 for a radiograph")
            return _display_from_file(ds, in_file, rows, cols)
        raw = _stored_frame(ds)
        return _apply(display_lut(ds, raw), raw)
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT"):
        return _color_to_gray(ds, photometric)
    raise ImagingError(
        f"Photometric Interpretation {photometric or '(missing)'} is not supported; expected "
        "MONOCHROME1, MONOCHROME2 or RGB"
    )


def prepared_image(
    source: str | os.PathLike | Dataset, size: int = 512, *, exact: bool = True
) -> np.ndarray:
    """The model's ``size`` x ``size`` input for a DICOM image: :func:`model_input` of its
    :func:`display_image`."""
    return model_input(display_image(source), size, exact=exact)


def model_input(display: np.ndarray, size: int = 512, *, exact: bool = True) -> np.ndarray:
    """The model's ``size`` x ``size`` input from an 8-bit display image: LANCZOS on the
    shortest edge, centre crop.

    Parameters
    ----------
    display
        ``uint8`` (H, W) display image.
    size
        Output edge in pixels (the model uses 512).
    exact
        True returns exactly ``model.preprocess.resize_and_crop(display)``, the reference
        preprocessing. False takes a cheaper road to nearly the same picture: only the part
        of the image that can reach the crop is resampled, and PIL's ``reducing_gap=2``
        box-reduces by an integer factor before LANCZOS. On 2500 x 2048 chest radiographs
        that is several times faster; the result differs from the exact one by about
        0.1-0.3 grey levels on average and at most a few levels at sharp edges (measured in
        ``bench/pixel.py`` and bounded in ``tests/imaging``).
    """

    h, w = display.shape
    if exact or min(h, w) < 2 * size:
        return resize_and_crop(display, size)
    new_h, new_w = shortest_edge_size(h, w, size)
    sx, sy = w / new_w, h / new_h
    top, left = (new_h - size) // 2, (new_w - size) // 2
    # Source window that can reach the crop: LANCZOS support is 3 output pixels, plus one
    # reduction bin; aligned to 8 so the box-reduce bins fall where they would on the full image.
    margin_y, margin_x = 4.0 * sy + 8, 4.0 * sx + 8
    y0 = max(0, int(top * sy - margin_y) // 8 * 8)
    x0 = max(0, int(left * sx - margin_x) // 8 * 8)
    y1 = min(h, int(np.ceil((top + size) * sy + margin_y)))
    x1 = min(w, int(np.ceil((left + size) * sx + margin_x)))
    region = Image.fromarray(np.ascontiguousarray(display[y0:y1, x0:x1]))
    box = (left * sx - x0, top * sy - y0, (left + size) * sx - x0, (top + size) * sy - y0)
    out = region.resize((size, size), Image.Resampling.LANCZOS, box=box, reducing_gap=2.0)
    return np.asarray(out)


def _color_to_gray(ds: Dataset, photometric: str) -> np.ndarray:

    if _int(ds, "BitsAllocated") != 8:
        raise ImagingError(f"{photometric} image has BitsAllocated {ds.BitsAllocated}; expected 8")
    rgb = _decoded_frame(ds, _transfer_syntax(ds), raw=False)
    if rgb.ndim == 4:
        rgb = rgb[0]
    return np.asarray(
        Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB").convert("L")
    )
