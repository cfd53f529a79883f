"""Append-only, rotated audit files under ``DATA_DIR/audit/``: the record of truth and the
spool that the syslog forwarder reads.

- One message a line (:meth:`AuditMessage.xml` has no line breaks), appended with a single
  ``write`` on an ``O_APPEND`` descriptor under an exclusive ``flock`` and ``fdatasync``-ed
  before :meth:`AuditFiles.append` returns: every process of the node (listeners, web app,
  scheduler, workers) appends to the same current file without interleaving.
- Files are named ``audit-<number>-<UTC date>.log``; a new one begins when the current one
  would pass AUDIT_FILE_MAX_MB or the UTC day changes. The one it replaces is made read-only
  (0400): a rotated file is never written again. The node never deletes audit files
  (docs/security.md: the site's retention applies).
- The forwarder's position is a cursor ``(file number, byte offset)`` kept in ``.forwarded``
  (written to a temporary file, fsync-ed and renamed), so a restart resumes where the last
  acknowledged send ended.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

_NAME = re.compile(r"^audit-(\d{6})-(\d{8})\.log$")


@dataclass(frozen=True, order=True)
class Cursor:
    number: int
    offset: int


def _today() -> str:
    return datetime.now(UTC).strftime("%Y%m%d")


class AuditFiles:
    """The audit directory of one node (any number of processes may share it)."""

    def __init__(self, directory: Path, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._path: Path | None = None

    # --------------------------------------------------------------------------- writing
    def append(self, line: str) -> None:
        """Append one record (a line without line breaks) durably."""
        if "\n" in line or "\r" in line:
            raise ValueError("an audit record is one line; it holds a line break")
        data = (line + "\n").encode()
        with self._lock:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            lock_fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
                fd = self._current_fd(len(data))
                os.write(fd, data)
                os.fdatasync(fd)
            finally:
                os.close(lock_fd)  # releases the flock

    def _current_fd(self, adding: int) -> int:
        """The descriptor of the file to append to (holding the directory lock)."""
        files = self.files()
        newest = files[-1] if files else None
        today = _today()
        if newest is not None:
            number, day = _parts(newest)
            writable = os.stat(newest).st_mode & 0o200
            fits = os.stat(newest).st_size + adding <= self.max_bytes
            if writable and fits and day == today:
                return self._open(newest)
            next_number = number + 1
        else:
            next_number = 1
        path = self.directory / f"audit-{next_number:06d}-{today}.log"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        _fsync_dir(self.directory)
        if newest is not None:
            os.chmod(newest, 0o400)  # rotated: never written again
        self._close()
        self._fd, self._path = fd, path
        return fd

    def _open(self, path: Path) -> int:
        if self._path != path or self._fd is None:
            self._close()
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            self._path = path
        return self._fd

    def _close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = self._path = None

    def close(self) -> None:
        with self._lock:
            self._close()

    # --------------------------------------------------------------------------- reading
    def files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if _NAME.match(p.name))

    def records(self) -> Iterator[str]:
        """Every record, oldest first (complete lines only)."""
        for _, line in self.after(Cursor(0, 0)):
            yield line

    def after(self, cursor: Cursor, limit: int | None = None) -> Iterator[tuple[Cursor, str]]:
        """Records past ``cursor``, each with the cursor just after it."""
        count = 0
        for path in self.files():
            number, _ = _parts(path)
            if number < cursor.number:
                continue
            offset = cursor.offset if number == cursor.number else 0
            with open(path, "rb") as handle:
                handle.seek(offset)
                for raw in handle:
                    if not raw.endswith(b"\n"):
                        break  # being written: next time
                    offset += len(raw)
                    yield Cursor(number, offset), raw[:-1].decode()
                    count += 1
                    if limit is not None and count >= limit:
                        return

    # --------------------------------------------------------------------------- cursor
    @property
    def _cursor_path(self) -> Path:
        return self.directory / ".forwarded"

    def cursor(self) -> Cursor:
        try:
            data = json.loads(self._cursor_path.read_text())
            return Cursor(int(data["file"]), int(data["offset"]))
        except (OSError, ValueError, KeyError):
            return Cursor(0, 0)

    def save_cursor(self, cursor: Cursor) -> None:
        tmp = self._cursor_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps({"file": cursor.number, "offset": cursor.offset}).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._cursor_path)


def _parts(path: Path) -> tuple[int, str]:
    match = _NAME.match(path.name)
    assert match is not None
    return int(match.group(1)), match.group(2)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
