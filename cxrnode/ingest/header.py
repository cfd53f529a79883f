"""Header rules: what the node decides from a radiograph's header alone (no pixels).

Which projection an image is (PA, AP, lateral), whether it shows the chest, and the study
facts the model may use (age, sex, view; no identifiers). Ingest applies these to every
arriving instance and records the answers, so later steps never read the header again.
"""

from __future__ import annotations

import math
import re
from datetime import date
from typing import Any

from pydicom import config
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from model.contracts import StudyContext

# pydicom checks each value as it reads it and, by default, logs and warns an invalid one
# quoting it ("Invalid value for VR DA: '1962-03-15'"): patient data in the node's logs, from
# the C-STORE handler on. The node checks what it copies itself (cxrnode.ingest.vr, through
# cxrnode.ingest.record) and logs only the attribute's keyword; every process that reads a
# header imports this module.
config.settings.reading_validation_mode = config.IGNORE

__all__ = [
    "RADIOGRAPH_SOP_CLASSES",
    "SECONDARY_CAPTURE_SOP_CLASSES",
    "age_years",
    "chest_skip_reason",
    "classify_view",
    "clean_text",
    "decoded_frame_bytes",
    "is_chest",
    "is_radiograph",
    "secondary_capture_refusal",
    "study_context",
]

#: CR Image Storage, Digital X-Ray Image Storage For Presentation and For Processing.
RADIOGRAPH_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1",
        "1.2.840.10008.5.1.4.1.1.1.1",
        "1.2.840.10008.5.1.4.1.1.1.1.1",
    }
)

#: Secondary Capture Image Storage and the multi-frame grayscale byte and word SC classes:
#: digitised films and re-wrapped radiographs arrive so. Accepted only when the header says
#: chest radiograph (:func:`secondary_capture_refusal`).
SECONDARY_CAPTURE_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.5.1.4.1.1.7.2",
        "1.2.840.10008.5.1.4.1.1.7.3",
    }
)

#: Modalities of a projection radiograph. A CT slice sent under the CR SOP class is not one.
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX"})

# --------------------------------------------------------------------------- study facts

# Lenient on purpose (the outputs never copy what this accepts unchecked, see
# cxrnode.ingest.record): "62" and "62 Y" are read as the "062Y" the standard asks for.
_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY]?)\s*$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def _parse_date(value: Any) -> date | None:
    text = str(value or "").strip().replace(".", "")
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def age_years(ds: Dataset) -> float | None:
    """Patient age in years from PatientAge ("045Y", "006M", "002W", "010D"; a number
    without a unit, "62", is read as years, its one clear meaning), else from
    PatientBirthDate and the study (or series, acquisition, content) date; None if unknown
    or implausible (negative or over 130)."""
    match = _AGE.match(str(ds.get("PatientAge", "") or ""))
    if match:
        years = int(match.group(1)) * _AGE_UNIT_YEARS[match.group(2).upper() or "Y"]
    else:
        born = _parse_date(ds.get("PatientBirthDate"))
        seen = next(
            (
                d
                for d in (
                    _parse_date(ds.get(k))
                    for k in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")
                )
                if d is not None
            ),
            None,
        )
        if born is None or seen is None:
            return None
        years = (seen - born).days / 365.25
    return round(years, 3) if 0.0 <= years <= 130.0 else None


def study_context(ds: Dataset) -> StudyContext:
    """What the model may know about the study: age, sex and view.

    No identifiers, names or dates leave this function.
    """
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    view = classify_view(ds)
    return StudyContext(
        age_years=age_years(ds),
        sex=sex if sex in ("M", "F", "O") else None,
        view=view if view in ("PA", "AP") else None,
    )


# --------------------------------------------------------------------------- view and anatomy

# DICOM CID 4010 "DX View" (SNOMED CT, with the legacy SNOMED-RT values older modalities send),
# checked against pydicom.sr's concept dictionary.
_PA_CODES = frozenset({"272479007", "R-10214", "R-40888"})  # postero-anterior
_AP_CODES = frozenset({"399348003", "R-10206"})  # antero-posterior
_LATERAL_CODES = frozenset(
    {
        "399067008",  # lateral (R-102CD)
        "399173006",  # left lateral (R-10236)
        "399198007",  # right lateral (R-10232)
        "R-102CD",
        "R-10236",
        "R-10232",
    }
)
_VIEW_POSITION = {
    "PA": "PA",
    "AP": "AP",
    "LL": "LATERAL",
    "RL": "LATERAL",
    "LAT": "LATERAL",
    "LATERAL": "LATERAL",
    "LLAT": "LATERAL",
    "RLAT": "LATERAL",
}
# Whole tokens only ("PA" but not "PATIENT"); lookarounds instead of \b so "P.A." matches.
_TEXT_PA = re.compile(
    r"(?<!\w)(PA|P\.A\.?|P/A|P-A|POSTERO[- ]?ANTERIOR|DORSO[- ]?VENTRAL|D/V)(?!\w)"
)
_TEXT_AP = re.compile(
    r"(?<!\w)(AP|A\.P\.?|A/P|A-P|ANTERO[- ]?POSTERIOR|SUPINE|PORTABLE|BEDSIDE|V/D)(?!\w)"
)
_TEXT_LAT = re.compile(
    r"(?<!\w)(LAT|LATERAL|LATERALE|LL|RL|LLAT|RLAT|SEITLICH|PROFIL|PERFIL|LATERAAL)(?!\w)"
)


def _view_from_text(text: str) -> str | None:
    text = text.upper()
    found = {
        view
        for view, pattern in (("PA", _TEXT_PA), ("AP", _TEXT_AP), ("LATERAL", _TEXT_LAT))
        if pattern.search(text)
    }
    return found.pop() if len(found) == 1 else None


def classify_view(ds: Dataset) -> str | None:
    """Projection of one radiograph: "PA", "AP", "LATERAL" or None when unknown.

    Evidence in order of trust: ViewPosition (AP, PA, LL, RL and common vendor spellings),
    ViewCodeSequence (CID 4010 codes, then the code meaning), the image's own descriptions
    (SeriesDescription, ProtocolName, AcquisitionDeviceProcessingDescription; a text naming
    two different views, like "PA + LAT", is ignored), and last PatientOrientation, whose row
    direction is anterior/posterior only on a lateral.  StudyDescription is not used because
    it describes the whole study ("CHEST PA AND LATERAL").  Decubitus and oblique positions
    give None, as does a code that says only "frontal": callers should treat None as "not
    known to be lateral" and rank it below PA and AP.
    """
    position = str(ds.get("ViewPosition", "") or "").strip().upper()
    if position in _VIEW_POSITION:
        return _VIEW_POSITION[position]
    if position and position not in ("", "UNKNOWN", "OTHER"):
        from_text = _view_from_text(position)
        if from_text is not None:
            return from_text
    for item in ds.get("ViewCodeSequence") or []:
        code = str(item.get("CodeValue", "") or "").strip().upper()
        if code in _PA_CODES:
            return "PA"
        if code in _AP_CODES:
            return "AP"
        if code in _LATERAL_CODES:
            return "LATERAL"
        meaning = str(item.get("CodeMeaning", "") or "").replace("-", "")
        from_meaning = _view_from_text(meaning)
        if from_meaning is not None:
            return from_meaning
    for keyword in ("SeriesDescription", "ProtocolName", "AcquisitionDeviceProcessingDescription"):
        from_text = _view_from_text(str(ds.get(keyword, "") or ""))
        if from_text is not None:
            return from_text
    orientation = ds.get("PatientOrientation")
    if orientation is not None and not isinstance(orientation, str) and len(orientation) == 2:
        row = str(orientation[0]).strip().upper()
        if row[:1] in ("A", "P"):
            return "LATERAL"
    return None


_CHEST_BODY_PARTS = frozenset(
    {
        "CHEST",
        "THORAX",
        "LUNG",
        "LUNGS",
        "CHESTABDOMEN",  # neonatal chest + abdomen ("babygram") still shows the chest
        "CHEST_ABDOMEN",
        "TORAX",
        "TÓRAX",
        "TORACE",
        "BRUST",
        "BRUSTKORB",
        "THORAKS",
        "POITRINE",
        "PECHO",
        "CXR",
    }
)
_UNKNOWN_BODY_PARTS = frozenset({"", "UNKNOWN", "OTHER", "NONE", "N/A", "NA", "-"})
_CHEST_REGION_CODES = frozenset(
    {"816094009", "51185008", "43799004", "39607008", "T-D3000", "T-D3200", "T-28000"}
)
_CHEST_TEXT = re.compile(
    r"\b(CHEST|THORAX|TORAX|TÓRAX|TORACE|THORAKS|CXR|LUNGS?|BRUST|BRUSTKORB|POUMONS?|PECHO|RX\s*TX)\b"
)
_OTHER_ANATOMY_TEXT = re.compile(
    r"\b(SPINE|[CTL]-?SPINE|WIRBELS[ÄA]ULE|RIBS?|STERNUM|CLAVICLES?|SHOULDERS?|HUMERUS|ELBOW|"
    r"FOREARM|WRIST|HANDS?|FINGERS?|THUMB|PELVIS|HIPS?|FEMUR|KNEES?|TIBIA|FIBULA|ANKLES?|FOOT|FEET|"
    r"TOES?|CALCANEUS|SKULL|SINUS(ES)?|FACE|MANDIBLE|ABDOMEN|ABD|KUB|EXTREMITY|LEG|ARM)\b"
)
_DESCRIPTIONS = (
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "RequestedProcedureDescription",
    "PerformedProcedureStepDescription",
)


def is_chest(ds: Dataset, *, default: bool = True) -> bool:
    """Whether a radiograph shows the chest, from its header alone (no pixels needed).

    BodyPartExamined decides when it holds a real value: CHEST, THORAX, LUNG and local
    spellings (TORAX, BRUST...) are chest; anything else (HAND, KNEE, EXTREMITY...) is not.
    Then AnatomicRegionSequence: a chest/thorax/lung SNOMED code is chest, any other code is
    not.  Then the descriptions (Study, Series, Protocol, Requested and Performed Procedure):
    one naming the chest ("CHEST PA", "RX TORAX", "CXR") without also naming spine or ribs
    makes it chest; one naming other anatomy ("THORACIC SPINE", "XR HAND") makes it not.

    When nothing in the header speaks either way the answer is ``default``, True: the PACS
    routes chest radiographs to this node, and older CR units often leave BodyPartExamined
    and descriptions empty, so silence is more often a chest than not.  A site that prefers
    to skip such images passes ``default=False``.  Modality is not checked here (see
    :func:`is_radiograph`).
    """
    part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if part not in _UNKNOWN_BODY_PARTS:
        return part in _CHEST_BODY_PARTS or part.replace(" ", "") in _CHEST_BODY_PARTS
    regions = [
        str(item.get("CodeValue", "") or "").strip().upper()
        for item in ds.get("AnatomicRegionSequence") or []
    ]
    if any(code in _CHEST_REGION_CODES for code in regions):
        return True
    if any(regions):
        return False
    verdicts = set()
    for keyword in _DESCRIPTIONS:
        text = str(ds.get(keyword, "") or "").upper()
        chest, other = _CHEST_TEXT.search(text), _OTHER_ANATOMY_TEXT.search(text)
        if chest and not (other and other.group(1) in ("SPINE", "RIB", "RIBS") or "SPINE" in text):
            verdicts.add(True)
        elif other:
            verdicts.add(False)
    if verdicts:
        return True in verdicts
    return default


def is_radiograph(ds: Dataset) -> bool:
    """CR or DX (For Presentation or For Processing) by SOP Class UID."""
    return str(ds.get("SOPClassUID", "")) in RADIOGRAPH_SOP_CLASSES


# --------------------------------------------------------------------------- the chest filter

#: Geometry no chest radiograph has: fewer pixels on an edge, a field whose longer edge is
#: shorter (a dental or finger detector, a fluoroscopy crop; a neonatal chest is ~15 cm),
#: or a strip longer than this ratio (a spine or leg stitch).
MIN_EDGE_PIXELS = 128
MIN_FIELD_MM = 120.0
MAX_ASPECT_RATIO = 2.5


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip().upper()


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _frames(ds: Dataset) -> int:
    return _int_or_none(ds.get("NumberOfFrames")) or 1


def decoded_frame_bytes(ds: Dataset) -> int | None:
    """Bytes of one decoded frame (Rows x Columns x Samples per Pixel x whole bytes per
    sample), or None when the header does not say."""
    rows, cols = _int_or_none(ds.get("Rows")), _int_or_none(ds.get("Columns"))
    bits = _int_or_none(ds.get("BitsAllocated"))
    samples = _int_or_none(ds.get("SamplesPerPixel", 1)) or 1
    if not rows or not cols or not bits:
        return None
    return rows * cols * samples * ((bits + 7) // 8)


def _geometry_reason(ds: Dataset) -> str | None:
    rows, cols = _int_or_none(ds.get("Rows")) or 0, _int_or_none(ds.get("Columns")) or 0
    if _frames(ds) > 1:
        return f"multi-frame image ({_frames(ds)} frames), not a single radiograph"
    if min(rows, cols) < MIN_EDGE_PIXELS:
        return f"image of {rows} x {cols} pixels is too small for a chest radiograph"
    if max(rows, cols) > MAX_ASPECT_RATIO * min(rows, cols):
        return f"image of {rows} x {cols} pixels is too elongated for a chest radiograph"
    for keyword in ("ImagerPixelSpacing", "PixelSpacing"):
        spacing = ds.get(keyword)
        try:
            row_mm, col_mm = (float(v) for v in spacing)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            continue
        if row_mm > 0 and col_mm > 0:
            field = max(rows * row_mm, cols * col_mm)
            if field < MIN_FIELD_MM:
                return f"field of view {field:.0f} mm is too small for a chest radiograph"
            break
    return None


def chest_skip_reason(ds: Dataset, max_frame_bytes: int | None = None) -> str | None:
    """Why the model should not read this image, from its header alone; None when it may.

    In order: Modality (CR or DX; an image whose SOP class says radiograph but whose
    Modality says CT is not one; an empty Modality is taken at the SOP class's word), body
    part (:func:`is_chest`), geometry (one frame, at least :data:`MIN_EDGE_PIXELS` on each
    edge, no longer than :data:`MAX_ASPECT_RATIO`, a field of at least :data:`MIN_FIELD_MM`
    where the pixel spacing is known), size (a decoded frame of more than
    ``max_frame_bytes`` is not prepared), and view (laterals are not read).
    """
    modality = _text(ds, "Modality")
    if modality and modality not in RADIOGRAPH_MODALITIES:
        return f"Modality {modality[:16]} is not a radiograph (CR or DX)"
    if not is_chest(ds):
        return "not a chest radiograph (body part / descriptions)"
    geometry = _geometry_reason(ds)
    if geometry:
        return geometry
    size = decoded_frame_bytes(ds)
    if max_frame_bytes is not None and size is not None and size > max_frame_bytes:
        return (
            f"image of {size / 2**20:.0f} MiB decoded exceeds MAX_IMAGE_MB "
            f"({max_frame_bytes / 2**20:.0f} MiB)"
        )
    if classify_view(ds) == "LATERAL":
        return "lateral view"
    return None


def secondary_capture_refusal(ds: Dataset) -> str | None:
    """Why a Secondary Capture is refused, or None when its header says chest radiograph.

    Accepted: Modality CR or DX (a re-wrapped radiograph), or Conversion Type DF (a
    digitised film), with a body part, anatomic region or description that names the chest
    (silence is not enough here), and one frame. Everything else, our own drafts (Modality
    OT, Conversion Type WSD) included, is refused as before SC was accepted.
    """
    modality = _text(ds, "Modality")
    conversion = _text(ds, "ConversionType")
    if modality not in RADIOGRAPH_MODALITIES and conversion != "DF":
        return (
            "Secondary Capture accepted only for radiographs (Modality CR or DX, or "
            f"Conversion Type DF); found Modality {modality[:16] or '(none)'}"
        )
    if not is_chest(ds, default=False):
        return "Secondary Capture accepted only when its header names the chest"
    if _frames(ds) > 1:
        return f"Secondary Capture of {_frames(ds)} frames; one frame expected"
    return None


# --------------------------------------------------------------------------- recorded header

#: The attributes ingest records for every instance, so that no later step reads the header
#: again: the SOP, patient, study and series identity that the outputs copy into the source
#: study (the Patient, General Study and Patient Study modules highdicom copies), the facts the
#: model may use (age, sex, view) and the image geometry. Never logged.
RECORDED_KEYWORDS: tuple[str, ...] = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    # Patient
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    # General Study and Patient Study
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
    "StudyDescription",
    "RequestedProcedurePriority",  # the order's priority: triage never goes below it
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    # Series and image
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "ViewPosition",
    "Laterality",
    "ImageLaterality",
    "InstanceNumber",
    "PatientOrientation",
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "PhotometricInterpretation",
)


_RECORDED_TAGS = tuple((keyword, tag_for_keyword(keyword)) for keyword in RECORDED_KEYWORDS)
_NUMBER_VRS = {"DS": float, "FL": float, "FD": float, "IS": int, "US": int, "SS": int, "UL": int}


def clean_text(value: Any, limit: int | None = None) -> str:
    """``value`` as text a database accepts: no NUL, no lone surrogates (what a wrong or
    unknown character set can leave), at most ``limit`` characters."""
    text = "" if value is None else str(value)
    text = text.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
    return text[:limit] if limit is not None else text


def recorded_header(ds: Dataset) -> dict[str, Any]:
    """The :data:`RECORDED_KEYWORDS` present in ``ds``, as a DICOM JSON object (PS3.18 F.2).

    Written here rather than with ``Dataset.to_json_dict`` (five times slower): it runs in
    the C-STORE handler for every instance, and these attributes have plain VRs.
    """
    out: dict[str, Any] = {}
    for _keyword, tag in _RECORDED_TAGS:
        if tag not in ds:
            continue
        element = ds[tag]
        vr = str(element.VR)
        value = element.value
        if value is None or value == "" or (isinstance(value, MultiValue) and not len(value)):
            out[f"{tag:08X}"] = {"vr": vr}
            continue
        values = list(value) if isinstance(value, MultiValue | list) else [value]
        if vr == "PN":
            encoded: list[Any] = [{"Alphabetic": clean_text(v)} for v in values]
        elif vr in _NUMBER_VRS:
            encoded = [n for n in (_number(_NUMBER_VRS[vr], v) for v in values) if n is not None]
        else:
            encoded = [clean_text(v) for v in values]
        out[f"{tag:08X}"] = {"vr": vr, "Value": encoded}
    return out


def _number(kind: type, value: Any) -> float | int | None:
    """A finite number, or None for what JSON (and PostgreSQL's jsonb) cannot hold."""
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def header_dataset(recorded: dict[str, Any] | None) -> Dataset:
    """The recorded header as a pydicom Dataset again (empty when nothing was recorded)."""
    if not recorded:
        return Dataset()
    return Dataset.from_json(recorded)
