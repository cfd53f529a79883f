"""Synthetic DICOM Part-10 files for tests and benchmarks.

Every test area needs radiographs that look like what a PACS sends: CR and DX chest images in
either photometric interpretation, with windowing or a VOI LUT, 12 to 16 bits, compressed in
the transfer syntaxes sites actually use, and a few things that are *not* chest radiographs
(a hand, a CT slice, a file without pixels, a truncated file, garbage).

The chest pixels are a synthetic phantom defined as a float *display truth* in [0, 1] (0 =
black, 1 = white on a MONOCHROME2 display: lungs dark, bones bright, air outside the body
black).  :func:`make_chest` encodes that truth into stored values so that a correct display
pipeline (modality LUT -> VOI LUT or window -> MONOCHROME1/INVERSE inversion) recovers it
up to quantisation.  Tests compare renderings against :func:`phantom`.

This is a library module, not a test file: import it as ``from tests import dicomgen`` or
``import dicomgen`` with ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

#: ViewCodeSequence codes (DICOM CID 4010 "DX View", SNOMED CT), as listed in pydicom's
#: ``pydicom.sr._concepts_dict`` for CID 4010.  The legacy SNOMED-RT values are what older
#: modalities send with CodingSchemeDesignator "SRT"/"SNM3".
VIEW_CODES: dict[str, tuple[str, str, str]] = {
    # view: (SCT code, legacy SNOMED-RT code, code meaning)
    "PA": ("272479007", "R-10214", "postero-anterior"),
    "AP": ("399348003", "R-10206", "antero-posterior"),
    "LATERAL": ("399067008", "R-102CD", "lateral"),
    "LL": ("399173006", "R-10236", "left lateral"),
    "RL": ("399198007", "R-10232", "right lateral"),
}

#: Fraction of the stored range used by the encoded image (the rest stays free, so window
#: and LUT boundaries are not at the ends of the representable range).
_LOW, _HIGH = 0.08, 0.92

#: Gamma of the synthetic VOI LUT (LUT output = input ** _LUT_GAMMA): non-linear on purpose so
#: a reader that ignores the LUT and windows linearly does not pass by accident.
_LUT_GAMMA = 0.5


# --------------------------------------------------------------------------- pixels


@lru_cache(maxsize=16)
def _phantom_cached(rows: int, cols: int) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    y = (y + 0.5) / rows
    x = (x + 0.5) / cols
    img = np.zeros((rows, cols))

    # Body (soft tissue) fills most of the frame; the top corners stay air (black).
    body = ((x - 0.5) / 0.47) ** 2 + ((y - 0.72) / 0.78) ** 2 <= 1.0
    img[body] = 0.45

    # Lungs: low attenuation -> dark, slightly brighter towards the bases.
    lungs = np.zeros_like(body)
    for cx in (0.31, 0.69):
        lungs |= ((x - cx) / 0.15) ** 2 + ((y - 0.5) / 0.29) ** 2 <= 1.0
    img[lungs] = 0.12 + 0.10 * np.clip((y[lungs] - 0.25) / 0.5, 0.0, 1.0)

    # Ribs: curved bands across the lungs.
    ribs = lungs & (np.cos(2 * np.pi * (y * 9.0 + 2.0 * (x - 0.5) ** 2)) > 0.75)
    img[ribs] += 0.18

    # Clavicles: two tilted bands high in the chest.
    for sign in (-1.0, 1.0):
        cx = 0.5 + sign * 0.17
        line = 0.22 - 0.18 * (x - 0.5) * sign
        clav = (np.abs(y - line) < 0.018) & (np.abs(x - cx) < 0.16)
        img[clav] = 0.72

    # Mediastinum and heart (bright), spine brighter still.
    img[np.abs(x - 0.5) < 0.065] = np.maximum(img[np.abs(x - 0.5) < 0.065], 0.68)
    heart = ((x - 0.54) / 0.14) ** 2 + ((y - 0.64) / 0.17) ** 2 <= 1.0
    img[heart] = 0.70
    spine = (np.abs(x - 0.5) < 0.035) & body
    img[spine] = 0.85

    # Lead marker in the upper right corner: the brightest thing on the film.
    marker = (y > 0.04) & (y < 0.12) & (x > 0.84) & (x < 0.92)
    img[marker] = 1.0
    img[~body & ~marker] = 0.0
    img.setflags(write=False)
    return img


def phantom(rows: int = 256, cols: int = 256) -> np.ndarray:
    """Display truth of the synthetic chest: float64 ``rows x cols`` in [0, 1].

    0 is black and 1 white on a MONOCHROME2 display; lungs are dark (about 0.12-0.4),
    mediastinum, spine and clavicles bright (0.68-0.85), air outside the body 0 and a lead
    marker 1.  Both extremes cover more than 0.5 % of the pixels, so a percentile-based
    fallback window recovers the same range as min/max.
    """
    return _phantom_cached(int(rows), int(cols)).copy()


def regions(rows: int = 256, cols: int = 256) -> dict[str, tuple[slice, slice]]:
    """Boxes (row slice, column slice) well inside named phantom structures.

    Tests use them to check that a rendering puts lungs below mediastinum and spine.
    """

    def box(y0: float, y1: float, x0: float, x1: float) -> tuple[slice, slice]:
        return slice(int(y0 * rows), int(y1 * rows)), slice(int(x0 * cols), int(x1 * cols))

    return {
        "right_lung": box(0.40, 0.46, 0.26, 0.34),  # patient's right = image left
        "left_lung": box(0.40, 0.46, 0.66, 0.74),
        "spine": box(0.30, 0.50, 0.49, 0.51),
        "heart": box(0.60, 0.70, 0.60, 0.64),
        "air": box(0.0, 0.05, 0.0, 0.05),
    }


def _hand_phantom(rows: int, cols: int) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    y /= rows
    x /= cols
    img = np.zeros((rows, cols))
    palm = (np.abs(x - 0.5) < 0.22) & (y > 0.55) & (y < 0.95)
    img[palm] = 0.5
    for i, cx in enumerate((0.3, 0.42, 0.54, 0.66)):
        finger = (np.abs(x - cx) < 0.045) & (y > 0.12 + 0.04 * abs(i - 1.5)) & (y <= 0.6)
        img[finger] = 0.5
        bone = (np.abs(x - cx) < 0.02) & (y > 0.15 + 0.04 * abs(i - 1.5)) & (y <= 0.9)
        img[bone] = 0.9
    return img


def _stored_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    if signed:
        return -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    return 0, (1 << bits_stored) - 1


def _encode(
    truth: np.ndarray,
    *,
    bits_stored: int,
    signed: bool,
    invert: bool,
    voi: str,
    voi_function: str | None,
    rescale: tuple[float, float] | None,
    modality_lut: bool,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Stored values (int64) and the grayscale attributes that display them as ``truth``."""
    value = 1.0 - truth if invert else truth  # what the VOI stage must output, in [0, 1]
    smin, smax = _stored_range(bits_stored, signed)
    lo_s = smin + _LOW * (smax - smin)
    hi_s = smin + _HIGH * (smax - smin)
    attrs: dict[str, Any] = {}

    # Modality transform: stored -> modality value, and its inverse for encoding.
    if modality_lut:
        if bits_stored > 15:
            raise ValueError("modality_lut=True needs bits_stored <= 15 (LUT of 2**bits entries)")
        if rescale is not None:
            raise ValueError("a Modality LUT Sequence and rescale are mutually exclusive")
        n = smax - smin + 1
        table = np.round(40000.0 * np.sqrt(np.arange(n) / (n - 1)) + 1000.0).astype(np.int64)
        item = Dataset()
        item.LUTDescriptor = [n, smin, 16]
        item.LUTExplanation = "synthetic sqrt"
        item.ModalityLUTType = "US"  # unspecified
        item.LUTData = table.astype("<u2").tobytes()
        attrs["ModalityLUTSequence"] = DicomSequence([item])

        def to_mod(s: np.ndarray) -> np.ndarray:
            return table[np.asarray(s, dtype=np.int64) - smin].astype(np.float64)

        def from_mod(m: np.ndarray) -> np.ndarray:
            idx = np.searchsorted(table, m, side="left")
            idx = np.clip(idx, 1, n - 1)
            nearer_low = np.abs(table[idx - 1] - m) <= np.abs(table[idx] - m)
            return (idx - nearer_low) + smin

    else:
        slope, intercept = rescale if rescale is not None else (1.0, 0.0)
        if rescale is not None:
            attrs["RescaleSlope"] = _ds(slope)
            attrs["RescaleIntercept"] = _ds(intercept)
            attrs["RescaleType"] = "US"

        def to_mod(s: np.ndarray) -> np.ndarray:
            return np.asarray(s, dtype=np.float64) * slope + intercept

        def from_mod(m: np.ndarray) -> np.ndarray:
            return np.round((np.asarray(m) - intercept) / slope).astype(np.int64)

    m_lo, m_hi = sorted(
        (float(to_mod(np.array(round(lo_s)))), float(to_mod(np.array(round(hi_s)))))
    )

    if voi == "window":
        func = (voi_function or "LINEAR").upper()
        if voi_function is not None:
            attrs["VOILUTFunction"] = func
        if func == "LINEAR":
            width = float(_ds(m_hi - m_lo + 1.0))
            center = float(_ds((m_lo + m_hi) / 2.0 + 0.5))
            modval = center - 0.5 + (value - 0.5) * (width - 1.0)
        elif func == "LINEAR_EXACT":
            width = float(_ds(m_hi - m_lo))
            center = float(_ds((m_lo + m_hi) / 2.0))
            modval = center + (value - 0.5) * width
        elif func == "SIGMOID":
            width = float(_ds((m_hi - m_lo) / 2.0))
            center = float(_ds((m_lo + m_hi) / 2.0))
            v = np.clip(value, 0.01, 0.99)
            modval = center - width / 4.0 * np.log(1.0 / v - 1.0)
        else:
            raise ValueError(
                f"voi_function must be LINEAR, LINEAR_EXACT or SIGMOID, got {voi_function!r}"
            )
        attrs["WindowCenter"] = _ds(center)
        attrs["WindowWidth"] = _ds(width)
        attrs["WindowCenterWidthExplanation"] = "SYNTHETIC"
    elif voi == "lut":
        first = int(np.ceil(m_lo))
        n = int(np.floor(m_hi)) - first + 1
        if n > 65535:
            raise ValueError(f"VOI LUT would need {n} entries; use fewer bits or a smaller slope")
        lut = np.round(65535.0 * (np.arange(n) / (n - 1)) ** _LUT_GAMMA).astype("<u2")
        item = Dataset()
        # "US or SS": SS when the first mapped value is negative; the entry count stays
        # unsigned in meaning, so it must also fit a signed short then.
        if first < 0 and n > 32767:
            raise ValueError(
                f"a VOI LUT starting at {first} needs SS and at most 32767 entries, not {n}"
            )
        item.add_new(0x00283002, "SS" if first < 0 else "US", [n, first, 16])
        item.LUTExplanation = "SYNTHETIC GAMMA 0.5"
        item.LUTData = lut.tobytes()
        attrs["VOILUTSequence"] = DicomSequence([item])
        # invert the LUT: entry index whose output is nearest to the wanted value
        idx = np.round((n - 1) * np.clip(value, 0.0, 1.0) ** (1.0 / _LUT_GAMMA))
        modval = first + idx
    elif voi == "none":
        modval = m_lo + value * (m_hi - m_lo)
    else:
        raise ValueError(f"voi must be 'window', 'lut' or 'none', got {voi!r}")

    stored = np.clip(from_mod(modval), smin, smax)
    if voi == "lut" and not modality_lut:
        # Stored values must land on integral modality values or the LUT index is ambiguous.
        mod = to_mod(stored)
        if not np.allclose(mod, np.round(mod)):
            raise ValueError("voi='lut' needs a rescale that maps stored values to integers")
    return stored.astype(np.int64), attrs


def _ds(value: float) -> str:
    """A DS string (max 16 characters) for ``value``."""
    text = f"{value:.6g}"
    if "e" in text:
        text = f"{value:.1f}"
    return text


def _pixel_bytes(
    stored: np.ndarray, bits_allocated: int, bits_stored: int, overlay_noise: bool, seed: int
) -> bytes:
    if bits_allocated == 8:
        return stored.astype(np.uint8).tobytes()
    raw = stored.astype(np.int64) & 0xFFFF  # two's complement for signed values
    if overlay_noise and bits_stored < 16:
        # Put junk in the unused high bits (old overlay planes): readers must mask them.
        rng = np.random.default_rng(seed + 1)
        junk = rng.integers(0, 1 << (16 - bits_stored), size=raw.shape) << bits_stored
        raw = (raw & ((1 << bits_stored) - 1)) | junk
    return raw.astype("<u2").tobytes()


# --------------------------------------------------------------------------- datasets


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "CXRNODE_TESTS"
    return meta


def _base(
    *,
    sop_class: str,
    modality: str,
    study_uid: str | None,
    series_uid: str | None,
    sop_uid: str | None,
    patient_id: str,
    patient_age: str | None,
    patient_sex: str | None,
    body_part: str | None,
) -> Dataset:
    sop_uid = sop_uid or generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_uid)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20240315"
    ds.SeriesDate = "20240315"
    ds.ContentDate = "20240315"
    ds.StudyTime = "101500"
    ds.SeriesTime = "101500"
    ds.ContentTime = "101512"
    ds.AccessionNumber = "ACC0001"
    ds.Modality = modality
    ds.Manufacturer = "cxrnode synthetic"
    ds.InstitutionName = "Synthetic Hospital"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = ""
    ds.SeriesDescription = ""
    ds.PatientName = "SYNTHETIC^PATIENT"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = patient_sex or ""
    if patient_age is not None:
        ds.PatientAge = patient_age
    if body_part is not None:
        ds.BodyPartExamined = body_part
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    return ds


def _image_pixel_module(
    ds: Dataset,
    rows: int,
    cols: int,
    bits_allocated: int,
    bits_stored: int,
    signed: bool,
    photometric: str,
) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0


def _write(ds: Dataset, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def build_chest(
    *,
    modality: str = "DX",
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    voi: str | None = None,
    voi_function: str | None = None,
    view: str | None = "PA",
    use_view_code: bool = False,
    body_part: str | None = "CHEST",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient_id: str = "ANON1",
    patient_age: str | None = "045Y",
    patient_sex: str | None = "F",
    rows: int = 256,
    cols: int = 256,
    presentation_lut_shape: str | None = None,
    rescale: tuple[float, float] | None = None,
    modality_lut: bool = False,
    signed: bool = False,
    overlay_noise: bool = False,
    frames: int = 1,
    seed: int = 0,
    for_processing: bool = False,
    truth: np.ndarray | None = None,
    extra: Mapping[str, Any] | None = None,
    remove: Sequence[str] = (),
) -> Dataset:
    """The dataset :func:`make_chest` writes (see there for the parameters)."""
    if modality not in ("DX", "CR"):
        raise ValueError(f"modality must be 'DX' or 'CR', got {modality!r}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    if not 8 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be 8..16, got {bits_stored}")
    if presentation_lut_shape not in (None, "IDENTITY", "INVERSE"):
        raise ValueError(
            f"presentation_lut_shape must be IDENTITY, INVERSE or None, got {presentation_lut_shape!r}"
        )

    if voi is None:
        voi = "none" if for_processing else "window"  # VOI is only allowed For Presentation
    if modality == "CR":
        sop_class = CR_IMAGE_STORAGE
    else:
        sop_class = DX_FOR_PROCESSING if for_processing else DX_FOR_PRESENTATION
    ds = _base(
        sop_class=sop_class,
        modality=modality,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        patient_id=patient_id,
        patient_age=patient_age,
        patient_sex=patient_sex,
        body_part=body_part,
    )
    bits_allocated = 8 if bits_stored == 8 else 16
    _image_pixel_module(ds, rows, cols, bits_allocated, bits_stored, signed, photometric)

    shape = presentation_lut_shape
    if shape is None and modality == "DX":
        shape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    if shape is not None:
        ds.PresentationLUTShape = shape
    invert = photometric == "MONOCHROME1" or shape == "INVERSE"

    if truth is None:
        truth = phantom(rows, cols)
        if seed:
            rng = np.random.default_rng(seed)
            truth = np.clip(truth + rng.normal(0.0, 0.004, truth.shape), 0.0, 1.0)
    if modality == "DX" and rescale is None and not modality_lut:
        rescale = (1.0, 0.0)  # Type 1 in the DX Image module
    stored, grayscale = _encode(
        truth,
        bits_stored=bits_stored,
        signed=signed,
        invert=invert,
        voi=voi,
        voi_function=voi_function,
        rescale=rescale,
        modality_lut=modality_lut,
    )
    for keyword, value in grayscale.items():
        setattr(ds, keyword, value)

    # Modules specific to CR / DX
    ds.ImageLaterality = "U"
    ds.PatientPosition = ""
    if view is not None and not use_view_code:
        ds.ViewPosition = view
    else:
        ds.ViewPosition = ""
    if view is not None and use_view_code:
        sct, _legacy, meaning = VIEW_CODES[view.upper()]
        code = Dataset()
        code.CodeValue = sct
        code.CodingSchemeDesignator = "SCT"
        code.CodeMeaning = meaning
        code.ViewModifierCodeSequence = DicomSequence([])
        ds.ViewCodeSequence = DicomSequence([code])
    spacing = ["0.139", "0.139"] if rows >= 1024 else ["1.0", "1.0"]
    if modality == "CR":
        ds.PixelSpacing = spacing
    else:
        ds.ImagerPixelSpacing = spacing
        ds.PresentationIntentType = "FOR PROCESSING" if for_processing else "FOR PRESENTATION"
        ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
        ds.BurnedInAnnotation = "NO"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1 if invert else -1
        ds.LossyImageCompression = "00"
        ds.DetectorType = "SCINTILLATOR"
        ds.AnatomicRegionSequence = DicomSequence(
            [_code("816094009", "SCT", "Chest")] if (body_part or "").upper() == "CHEST" else []
        )
        ds.PatientOrientation = ["P", "F"]
        ds.PositionerType = ""
        ds.AcquisitionContextSequence = DicomSequence([])

    if frames > 1:
        # Extra frames are the inverted picture, so a reader that shows the wrong frame fails.
        smin, smax = _stored_range(bits_stored, signed)
        others = [smin + smax - stored] * (frames - 1)
        stored = np.stack([stored, *others])
        ds.NumberOfFrames = frames
    ds.PixelData = _pixel_bytes(stored, bits_allocated, bits_stored, overlay_noise, seed)

    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    for keyword in remove:
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def make_chest(path: str | os.PathLike, **kwargs: Any) -> Path:
    """Write a synthetic chest radiograph and return its path.

    Parameters
    ----------
    path
        Destination file (parent directories are created).
    modality : {"DX", "CR"}
        DX writes Digital X-Ray Image Storage (For Presentation, or For Processing when
        ``for_processing``); CR writes CR Image Storage.
    photometric : {"MONOCHROME2", "MONOCHROME1"}
        MONOCHROME1 stores inverted values (high stored value = black).
    bits_stored : int
        8 to 16 (BitsAllocated is 16 above 8); HighBit = bits_stored - 1.
    voi : {None, "window", "lut", "none"}
        None means "window", or "none" when ``for_processing`` (the DX IOD allows VOI only
        For Presentation).  Window Center/Width, a (gamma 0.5) VOI LUT Sequence, or no VOI at all (the display
        must then fall back to the image range; min/max and 0.5/99.5 percentiles agree).
    voi_function : {None, "LINEAR", "LINEAR_EXACT", "SIGMOID"}
        VOI LUT Function for ``voi="window"``; None leaves the attribute out (= LINEAR).
    view : {"PA", "AP", "LATERAL", "LL", "RL", None}
        ViewPosition, or the ViewCodeSequence code when ``use_view_code`` (ViewPosition is
        then empty, as Type 2 allows).
    body_part : str or None
        BodyPartExamined; None leaves it out.
    study_uid, series_uid, sop_uid : str or None
        Fresh UIDs when None.
    patient_id, patient_age, patient_sex
        Patient module values (age "045Y" style; None leaves PatientAge out).
    rows, cols : int
        Image size.
    presentation_lut_shape : {None, "IDENTITY", "INVERSE"}
        None writes the DX default (INVERSE for MONOCHROME1, IDENTITY otherwise) and nothing
        for CR.  INVERSE on MONOCHROME2 means the stored values are inverted too.
    rescale : (slope, intercept) or None
        Rescale Slope/Intercept (DX always has them; default 1/0).
    modality_lut : bool
        Use a (sqrt-shaped) Modality LUT Sequence instead of rescale.
    signed : bool
        PixelRepresentation 1 (two's complement stored values).
    overlay_noise : bool
        Fill the unused bits above HighBit with junk, as old overlay planes did.
    frames : int
        NumberOfFrames; frames after the first hold the inverted image.
    seed : int
        0 writes the exact phantom; other values add small seeded noise (std 0.004).
    for_processing : bool
        DX For Processing SOP class and PresentationIntentType.
    extra : mapping
        Attributes set last (keyword -> value), e.g. ``{"SeriesDescription": "CHEST LAT"}``.
    remove : sequence of str
        Keywords deleted last, e.g. ``("BodyPartExamined",)``.
    """
    return _write(build_chest(**kwargs), path)


def make_non_chest(path: str | os.PathLike, *, body_part: str = "HAND", **kwargs: Any) -> Path:
    """A DX radiograph of a hand (or ``body_part``): bright phalanges on soft tissue."""
    rows = kwargs.pop("rows", 256)
    cols = kwargs.pop("cols", 256)
    kwargs.setdefault("view", "PA")
    extra = dict(kwargs.pop("extra", {}) or {})
    extra.setdefault("StudyDescription", f"XR {body_part}")
    ds = build_chest(
        body_part=body_part,
        rows=rows,
        cols=cols,
        truth=_hand_phantom(rows, cols),
        extra=extra,
        **kwargs,
    )
    if "AnatomicRegionSequence" in ds:
        codes = {"HAND": ("85562004", "Hand"), "KNEE": ("72696002", "Knee")}
        value, meaning = codes.get(body_part.upper(), ("85562004", "Hand"))
        ds.AnatomicRegionSequence = DicomSequence([_code(value, "SCT", meaning)])
    return _write(ds, path)


def make_ct(
    path: str | os.PathLike,
    *,
    rows: int = 64,
    cols: int = 64,
    body_part: str = "CHEST",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient_id: str = "ANON1",
) -> Path:
    """A CT Image Storage slice of the chest (signed 16-bit, HU via rescale -1024)."""
    ds = _base(
        sop_class=CT_IMAGE_STORAGE,
        modality="CT",
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        patient_id=patient_id,
        patient_age="060Y",
        patient_sex="M",
        body_part=body_part,
    )
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientPosition = "HFS"
    _image_pixel_module(ds, rows, cols, 16, 16, True, "MONOCHROME2")
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.SliceThickness = "1.0"
    ds.ImagePositionPatient = ["0", "0", "0"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = ["0.7", "0.7"]
    ds.KVP = "120"
    ds.AcquisitionNumber = 1
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    hu = np.where(phantom(rows, cols) < 0.3, -850, 40)
    ds.PixelData = (hu + 1024).astype("<i2").tobytes()
    return _write(ds, path)


def make_no_pixels(path: str | os.PathLike, **kwargs: Any) -> Path:
    """A CR chest with every image attribute but no Pixel Data element."""
    kwargs.setdefault("modality", "CR")
    ds = build_chest(**kwargs)
    del ds.PixelData
    return _write(ds, path)


def truncate(src: str | os.PathLike, dst: str | os.PathLike, fraction: float) -> Path:
    """Copy the first ``fraction`` of ``src``'s bytes to ``dst`` (an interrupted transfer)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    data = Path(src).read_bytes()
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def make_garbage(path: str | os.PathLike, nbytes: int = 4096, seed: int = 0) -> Path:
    """Random bytes (seeded) that are not DICOM."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes())
    return path


@lru_cache(maxsize=4)
def _large_template(rows: int, cols: int, modality: str, bits_stored: int) -> tuple[Dataset, bytes]:
    ds = build_chest(modality=modality, rows=rows, cols=cols, bits_stored=bits_stored)
    pixels = ds.PixelData
    del ds.PixelData
    return ds, pixels


def make_large_dx(
    path: str | os.PathLike,
    rows: int = 2500,
    cols: int = 2048,
    *,
    modality: str = "DX",
    bits_stored: int = 12,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient_id: str = "ANON1",
) -> Path:
    """A full-size (about 10 MB at 2500 x 2048) uncompressed chest radiograph.

    The pixel bytes are built once per size and shared; only the UIDs and patient id change
    between calls, so writing hundreds for an ingest benchmark is I/O-bound.
    """
    header, pixels = _large_template(rows, cols, modality, bits_stored)
    ds = copy.deepcopy(header)  # small; the pixel bytes below are shared, not copied
    ds.PixelData = pixels
    sop_uid = sop_uid or generate_uid()
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientID = patient_id
    return _write(ds, path)


# --------------------------------------------------------------------------- compression

COMPRESSIONS = ("jpeg-lossless", "jpeg-ls", "j2k")


def compress(src: str | os.PathLike, dst: str | os.PathLike, kind: str) -> Path:
    """Write a losslessly compressed copy of ``src``.

    ``kind`` is "jpeg-lossless" (dcmtk ``dcmcjpeg +e1``: JPEG Lossless process 14 SV1,
    1.2.840.10008.1.2.4.70), "jpeg-ls" (dcmtk ``dcmcjpls +el``: JPEG-LS Lossless,
    1.2.840.10008.1.2.4.80) or "j2k" (JPEG 2000 Lossless 1.2.840.10008.1.2.4.90, encoded by
    pydicom with pylibjpeg-openjpeg).
    """
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if kind in ("jpeg-lossless", "jpeg-ls"):
        tool, flag = (
            ("/usr/bin/dcmcjpeg", "+e1")
            if kind == "jpeg-lossless"
            else ("/usr/bin/dcmcjpls", "+el")
        )
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} (dcmtk) is needed for {kind!r} but is not on PATH")
        proc = subprocess.run([tool, flag, str(src), str(dst)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{tool} failed with {proc.returncode} on {src}: {proc.stderr.strip()}"
            )
        return dst
    if kind == "j2k":
        from pydicom import dcmread

        ds = dcmread(src)
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
        ds.save_as(dst, enforce_file_format=True)
        return dst
    raise ValueError(f"kind must be one of {COMPRESSIONS}, got {kind!r}")


# --------------------------------------------------------------------------- real data

PYDICOM_DATA_RADIOGRAPHS = (
    "RG1_UNCR",
    "RG1_UNCI",
    "RG1_J2KR",
    "RG1_J2KI",
    "RG3_UNCR",
    "RG3_UNCI",
    "RG3_J2KR",
    "RG3_J2KI",
)


def pydicom_data_chest(kind: str = "RG1_UNCR") -> Path:
    """Path of a real radiograph shipped in the PyPI package ``pydicom-data``.

    RG1_* is a CR PA chest (1955 x 1841, 15-bit MONOCHROME1, Window 15000/30000; UNCR
    uncompressed, J2KR lossless JPEG 2000, *I lossy); RG3_* is a CR of a tibia (non-chest,
    BodyPartExamined EXTREMITY).  The package exposes its files through
    ``data_store.DataStore().get_path(filename)``.
    """
    if kind not in PYDICOM_DATA_RADIOGRAPHS:
        raise ValueError(f"kind must be one of {PYDICOM_DATA_RADIOGRAPHS}, got {kind!r}")
    try:
        from data_store import DataStore
    except ImportError as exc:  # pragma: no cover - the test extra installs it
        raise RuntimeError(
            "pydicom-data is not installed; install the project's [test] extra"
        ) from exc
    return Path(DataStore().get_path(f"{kind}.dcm"))


def chest_secondary_capture(
    path: Path,
    *,
    modality: str = "CR",
    body_part: str = "CHEST",
    frames: int | None = None,
    conversion: str = "DF",
) -> Path:
    """An SC of a chest radiograph as a film digitiser or a re-wrapping PACS makes it:
    8-bit MONOCHROME2, Modality CR, BodyPartExamined CHEST, compressed to JPEG baseline
    with dcmtk (dcmcjpeg +eb), as the real sample that Orthanc failed to route."""
    ds = build_chest(modality="CR", rows=512, cols=480, bits_stored=8)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.2" if frames else "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.Modality = modality
    ds.BodyPartExamined = body_part
    ds.ConversionType = conversion
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTSequence", "PixelSpacing"):
        if keyword in ds:
            delattr(ds, keyword)
    pixels = (np.add.outer(np.arange(512), np.arange(480)) % 256).astype(np.uint8)
    if frames:
        ds.NumberOfFrames = frames
        ds.FrameIncrementPointer = 0x00181063
        pixels = np.repeat(pixels[None], frames, axis=0)
    ds.PixelData = pixels.tobytes()
    plain = path.with_suffix(".plain.dcm")
    ds.save_as(plain, enforce_file_format=True)
    subprocess.run(["/usr/bin/dcmcjpeg", "+eb", str(plain), str(path)], check=True)
    return path


# --------------------------------------------------------------------------- invalid values

#: Values a modality writes that are not valid for their VR, by keyword, as a PACS forwards
#: them: Patient's Age without its unit (the SIIM chest sample's ``62``), ISO dates and
#: times, a description longer than LO allows, an Accession Number longer than SH allows, a
#: name of six components, a lower-case code string, a TAB in a short string.
INVALID_VR_VALUES: dict[str, str] = {
    "PatientAge": "62",
    "PatientBirthDate": "1962-03-15",
    "StudyDate": "20241345",
    "StudyTime": "10:15:00",
    "StudyDescription": "CHEST PA " + "AND SOME VERY LONG PROTOCOL TEXT " * 3,
    "AccessionNumber": "ACC-0000000000000042",
    "ReferringPhysicianName": "Doe^John^Q^Dr^Jr^Extra",
    "PatientSex": "female",
    "StudyID": "ID\tTAB",
}


def build_invalid_vr_chest(**kwargs: Any) -> Dataset:
    """A synthetic chest (:func:`build_chest`) whose header carries every value of
    :data:`INVALID_VR_VALUES` (pydicom's checks are off meanwhile: writing them is the point,
    and its warnings would quote them)."""
    ds = build_chest(**kwargs)
    checks = pydicom_config.settings
    previous = checks.reading_validation_mode, checks.writing_validation_mode
    checks.reading_validation_mode = checks.writing_validation_mode = pydicom_config.IGNORE
    try:
        for keyword, value in INVALID_VR_VALUES.items():
            setattr(ds, keyword, value)
    finally:
        checks.reading_validation_mode, checks.writing_validation_mode = previous
    return ds
