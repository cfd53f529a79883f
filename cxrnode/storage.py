"""Durable files under DATA_DIR.

A file is written to DATA_DIR/tmp, fsynced, renamed into place and its directory fsynced, so
after :func:`write_durably` returns the bytes survive a crash of the process or the machine.
Paths are built only from UIDs that passed :func:`is_valid_uid`, never from raw peer input.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

Chunk = bytes | bytearray | memoryview


def is_valid_uid(value: str | None) -> bool:
    """The DICOM UID grammar (PS3.5 9.1): digits and dots, no leading zeros, at most 64 chars."""
    return bool(value) and len(value) <= 64 and _UID_RE.match(value) is not None  # type: ignore[arg-type]


def instance_relpath(study_uid: str, sop_instance_uid: str) -> str:
    """Where an instance lives below DATA_DIR/instances; both UIDs must be valid."""
    for uid in (study_uid, sop_instance_uid):
        if not is_valid_uid(uid):
            raise ValueError(f"refusing to build a path from {uid!r}: not a valid DICOM UID")
    return f"{study_uid}/{sop_instance_uid}.dcm"


def write_durably(final: Path, chunks: Iterable[Chunk], tmp_dir: Path) -> int:
    """Write ``chunks`` to ``final`` atomically and durably; return the number of bytes.

    The temporary file lives in ``tmp_dir``, which must be on the same file system as
    ``final`` so the rename is atomic.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{uuid.uuid4().hex}.part"
    size = 0
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                written = os.write(fd, view)
                view = view[written:]
                size += written
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return size


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_bytes(path: Path) -> int:
    """Free space for an unprivileged writer on the file system holding ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free


def clean_tmp(tmp_dir: Path) -> int:
    """Remove partial files left by a crash; return how many were removed."""
    if not tmp_dir.is_dir():
        return 0
    removed = 0
    for part in tmp_dir.glob("*.part"):
        part.unlink(missing_ok=True)
        removed += 1
    return removed
