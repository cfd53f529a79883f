"""The receive tuning module (cxrnode.net.receive) on the installed pynetdicom: it applies, and
its write-behind file keeps the bytes while it starts writing them out as they arrive."""

from __future__ import annotations

from pathlib import Path

from cxrnode.net import receive


def test_the_installed_pynetdicom_passes_the_check() -> None:
    assert receive.check() is None


def test_write_behind_starts_each_megabyte_and_keeps_every_byte(tmp_path: Path) -> None:
    assert receive._sync_file_range is not None, "Linux has sync_file_range"
    chunks = [bytes([index % 251]) * 300_000 for index in range(12)]  # 3.6 MB, as PDUs come
    handle = receive.writeback_temporary_file(delete=False, dir=tmp_path, suffix=".dcm")
    started = []
    for chunk in chunks:
        handle.write(chunk)
        handle.file.flush()
        started.append(handle.file._started)
    handle.close()
    assert Path(handle.name).read_bytes() == b"".join(chunks)
    # writeback asked for at 1.2, 2.4 and 3.6 MB: each time everything written so far
    assert sorted(set(started)) == [0, 1_200_000, 2_400_000, 3_600_000]
