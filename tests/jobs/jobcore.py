"""A node's settings, database and ingest without its processes (for in-process tests)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import dicomgen
import pydicom
from sqlalchemy.orm import sessionmaker

from cxrnode.ingest.receive import Ingest
from cxrnode.settings import Settings


@dataclass
class Node:
    """A node's settings and database, without its processes."""

    settings: Settings
    sessions: sessionmaker
    readers: sessionmaker
    ingest: Ingest
    tmp: Path

    def receive(self, **image: object) -> Path:
        """Store one synthetic chest image as the listener would; return its source file."""
        path = dicomgen.make_chest(self.tmp / f"in{len(list(self.tmp.glob('in*')))}.dcm", **image)
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        self.settings.tmp_dir.mkdir(parents=True, exist_ok=True)
        received = self.settings.tmp_dir / f"recv-{path.name}"
        shutil.copyfile(path, received)
        try:
            outcome = self.ingest.receive_file(
                received,
                transfer_syntax=str(meta.TransferSyntaxUID),
                sop_class_uid=str(meta.MediaStorageSOPClassUID),
                sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
                calling_aet="UNIT",
                peer_host="127.0.0.1",
            )
        finally:
            received.unlink()
        assert outcome.status == 0, outcome.reason
        return path
