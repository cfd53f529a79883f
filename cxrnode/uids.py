"""Deterministic UIDs for the objects the node emits.

Why deterministic: a redelivered task, a manual re-run or a resend must produce the *same*
SR, SC and PDF instances, so that the PACS replaces what it already has instead of piling up
copies (docs/dicom.md, promise 3). So every UID we mint is a pure function of its inputs.

How: DICOM PS3.5 §B.2 allows UIDs of the form ``2.25.<integer>`` where the integer is the
128-bit value of a UUID (ISO/IEC 9834-8). We take a name-based UUID (version 5, SHA-1) of
the inputs under a fixed namespace, so no organisation root has to be registered, the
result is at most 44 characters (limit 64), and its components never have leading zeros.

What goes in:

- SOP Instance UID of an output: source SOP Instance UID, model hash, pipeline version,
  output kind and the version number. A new version (for example after a late image)
  therefore gets a new instance, and the same inputs always give the same instance.
- Series Instance UID of an output: Study Instance UID, model hash, pipeline version and
  output kind, *not* the source image nor the version: every version of the draft made by
  one model and pipeline for one study lands in one series, so a viewer shows one
  "AI DRAFT" series per kind whose instances are numbered by version.
- Device UID (Device Observer UID in the SR, Device UID in Contributing Equipment): the
  model hash alone, so it changes exactly when the model changes (IHE AI Results).

The model *hash* is used rather than the model id, because the id is a path or hub name
that can differ between hosts serving the same weights.
"""

from __future__ import annotations

import enum
import re
import uuid
from dataclasses import dataclass

__all__ = [
    "OutputKind",
    "OutputUIDs",
    "device_uid",
    "is_valid_uid",
    "output_uids",
    "uid_from_key",
]

# Fixed namespace for every cxrnode UID; changing it would change every UID we ever emitted.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:cxrnode:dicom-uid")
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_SEPARATOR = "\x1f"  # ASCII unit separator: cannot occur in a UID, hash or version string


class OutputKind(enum.StrEnum):
    """The kinds of object the node can emit; the values are what ``OUTPUTS`` lists and
    what the outbox records (at most 8 characters: the ``outputs.kind`` column)."""

    TEXT_SR = "text_sr"  # text-report SR (TID 2000 shape): what the radiologist reads
    AIR_SR = "air_sr"  # TID 1500 SR for IHE AI Results consumers
    SC = "sc"  # Secondary Capture: radiograph and draft under a banner
    PDF = "pdf"  # Encapsulated PDF of the draft


@dataclass(frozen=True)
class OutputUIDs:
    """UIDs of one emitted object."""

    series_instance_uid: str
    sop_instance_uid: str


def is_valid_uid(uid: str) -> bool:
    """Tell whether ``uid`` follows the DICOM UID grammar (PS3.5 §9.1).

    Numeric components separated by dots, no leading zeros in a component, at most 64
    characters.
    """
    return isinstance(uid, str) and 0 < len(uid) <= 64 and _UID_RE.match(uid) is not None


def uid_from_key(*parts: str) -> str:
    """Return the ``2.25.`` UID that the given key parts name.

    Raises
    ------
    ValueError
        If no part is given, a part is not a string, or a part contains the separator
        character (which would make two different keys collide).
    """
    if not parts:
        raise ValueError("uid_from_key needs at least one key part; got none")
    for part in parts:
        if not isinstance(part, str):
            raise ValueError(f"UID key parts must be strings; got {type(part).__name__}")
        if _SEPARATOR in part:
            raise ValueError("UID key parts must not contain the ASCII unit separator (0x1F)")
    return f"2.25.{uuid.uuid5(_NAMESPACE, _SEPARATOR.join(parts)).int}"


def device_uid(model_hash: str) -> str:
    """Device UID of the AI "device": changes exactly when the model weights change."""
    _require_text("model_hash", model_hash)
    return uid_from_key("device", model_hash)


def output_uids(
    *,
    study_instance_uid: str,
    source_sop_instance_uid: str,
    model_hash: str,
    pipeline_version: str,
    kind: OutputKind | str,
    version: int = 1,
) -> OutputUIDs:
    """Series and SOP Instance UIDs of an emitted object (see the module docstring).

    Parameters
    ----------
    study_instance_uid, source_sop_instance_uid
        UIDs of the study and of the image the draft was made from.
    model_hash
        Hash of the model weights and configuration (``ModelResult.model_hash``).
    pipeline_version
        Version of the node's pipeline (prompting, labelling, rendering).
    kind
        One of :class:`OutputKind` (``"text_sr"``, ``"air_sr"``, ``"sc"``, ``"pdf"``).
    version
        1 for the first draft of a study, 2, 3, ... for replacements.

    Raises
    ------
    ValueError
        If a UID argument is not a valid UID, a text argument is empty, ``kind`` is
        unknown or ``version`` is not a positive integer.
    """
    for name, value in (
        ("study_instance_uid", study_instance_uid),
        ("source_sop_instance_uid", source_sop_instance_uid),
    ):
        if not is_valid_uid(value):
            raise ValueError(
                f"{name} must be a valid DICOM UID (digits and dots, at most 64 "
                f"characters); got {value!r}"
            )
    _require_text("model_hash", model_hash)
    _require_text("pipeline_version", pipeline_version)
    try:
        kind = OutputKind(kind)
    except ValueError:
        raise ValueError(
            f"kind must be one of {[k.value for k in OutputKind]}; got {kind!r}"
        ) from None
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be an integer >= 1; got {version!r}")
    series = uid_from_key("series", study_instance_uid, model_hash, pipeline_version, kind.value)
    instance = uid_from_key(
        "instance",
        source_sop_instance_uid,
        model_hash,
        pipeline_version,
        kind.value,
        str(version),
    )
    return OutputUIDs(series_instance_uid=series, sop_instance_uid=instance)


def _require_text(name: str, value: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string; got {value!r}")
