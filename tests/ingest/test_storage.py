"""Durable file placement: the chunked-receive path (link into place) and its copy fallback."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from cxrnode.ingest import storage


def test_a_received_file_is_linked_into_place_without_a_second_copy(tmp_path: Path) -> None:
    tmp_dir = tmp_path / "tmp"
    tmp_dir.mkdir()
    received = tmp_dir / "tmpabc.dcm"
    received.write_bytes(b"DICM" * 1000)
    final = tmp_path / "instances" / "1.2" / "1.2.3.dcm"
    assert storage.adopt_durably(received, final, tmp_dir) == 4000
    assert final.read_bytes() == b"DICM" * 1000
    assert os.stat(final).st_ino == os.stat(received).st_ino  # same bytes on disk: no copy
    assert oct(os.stat(final).st_mode & 0o777) == oct(storage.FILE_MODE)
    assert not list(tmp_dir.glob("*.part"))


def test_where_hard_links_fail_the_file_is_copied_durably(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    def no_links(*_args: object) -> None:  # a file system without hard links (e.g. some NAS)
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    tmp_dir = tmp_path / "tmp"
    tmp_dir.mkdir()
    received = tmp_dir / "tmpdef.dcm"
    received.write_bytes(b"x" * 3_000_000)
    final = tmp_path / "out" / "f.dcm"
    assert storage.adopt_durably(received, final, tmp_dir) == 3_000_000
    assert final.read_bytes() == received.read_bytes()
    assert os.stat(final).st_ino != os.stat(received).st_ino


def test_old_partial_files_are_cleaned_and_fresh_ones_kept(tmp_path: Path) -> None:
    old, fresh = tmp_path / "a.part", tmp_path / "tmpfresh.dcm"
    old.write_bytes(b"1")
    fresh.write_bytes(b"2")
    past = time.time() - 3600
    os.utime(old, (past, past))
    assert storage.clean_tmp(tmp_path, older_than=600) == 1
    assert not old.exists() and fresh.exists()
    assert storage.clean_tmp(tmp_path) == 1  # at start-up everything partial goes
