"""Durable files under DATA_DIR.

A file is written to DATA_DIR/tmp, fsynced, renamed into place and its directory fsynced, so
after :func:`write_durably` returns the bytes survive a crash of the process or the machine.
:func:`adopt_durably` does the same for a file someone else already wrote into DATA_DIR/tmp
(the listener's chunked receive), without copying its bytes again.
Paths are built only from UIDs that passed :func:`is_valid_uid`, never from raw peer input.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

#: Names of partial files in DATA_DIR/tmp: ours, and pynetdicom's chunked-receive files
#: (``NamedTemporaryFile(suffix=".dcm")`` in the listener, whose temporary directory is
#: DATA_DIR/tmp).
PARTIAL_PATTERNS = ("*.part", "tmp*.dcm")

#: Permissions of stored files: owner read/write, group read (workers may run as another user
#: of the node's group).
FILE_MODE = 0o640

#: errno values of os.link that mean "no hard link possible here", not a failing disk
_CANNOT_LINK = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP})

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
    ensure_dir(final.parent)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{uuid.uuid4().hex}.part"
    size = 0
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
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


def adopt_durably(written: Path, final: Path, tmp_dir: Path) -> int:
    """Make a complete file that is already in ``tmp_dir`` durable as ``final``; return its size.

    The bytes are fsynced where they lie and the file is hard-linked into place (through a
    temporary name, so an existing ``final`` is replaced atomically), then the directory is
    fsynced. Nothing is copied: for a 10 MB image this saves writing it a second time (where
    hard links are impossible it falls back to a copy). The original name stays for its owner
    to remove (pynetdicom unlinks its temporary file after the C-STORE handler returns), so
    no one else's file is ever renamed away under it; the owner must not write to it again.
    """
    fd = os.open(written, os.O_RDONLY)
    try:
        os.fchmod(fd, FILE_MODE)  # temporary files are created 0600
        os.fsync(fd)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    ensure_dir(final.parent)
    link = tmp_dir / f"{uuid.uuid4().hex}.part"
    try:
        os.link(written, link)
    except OSError as exc:
        if exc.errno not in _CANNOT_LINK:
            raise
        # A file system without hard links, or DATA_DIR/tmp on another one: copy instead.
        with open(written, "rb") as source:
            return write_durably(final, iter(lambda: source.read(1 << 20), b""), tmp_dir)
    try:
        os.replace(link, final)
    except BaseException:
        link.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)
    return size


def ensure_dir(directory: Path) -> None:
    """Create ``directory`` if needed; a new directory's own entry is fsynced into its parent,
    so a file renamed into it later cannot lose its path after a power cut."""
    if directory.is_dir():
        return
    directory.mkdir(parents=True, exist_ok=True)
    fsync_dir(directory.parent)


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


def clean_tmp(tmp_dir: Path, older_than: float | None = None) -> int:
    """Remove partial files left by a crash or an aborted transfer; return how many.

    With ``older_than`` (seconds) only files not modified for that long go: a running node
    uses this for transfers whose association died, while live transfers keep writing.
    """
    if not tmp_dir.is_dir():
        return 0
    cutoff = None if older_than is None else time.time() - older_than
    removed = 0
    for pattern in PARTIAL_PATTERNS:
        for part in tmp_dir.glob(pattern):
            try:
                if cutoff is not None and part.stat().st_mtime > cutoff:
                    continue
                part.unlink()
            except FileNotFoundError:  # its owner removed it first
                continue
            removed += 1
    return removed
