"""Start-up reconciliation: a durable instance file without a row is recorded again, whatever
lost the row (a kill between link and commit, a database failover, a restore from backup);
what is not an instance of ours is quarantined, never deleted."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import dicomgen
import pydicom
from jobcore import Node as Core
from services import BIN, node_env
from sqlalchemy import delete, select

from cxrnode.db import Instance, Study
from cxrnode.ingest.reconcile import RECONCILED_AET, quarantine_dir, reconcile_files


def _uids(path: Path) -> tuple[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)


def test_files_without_rows_are_recorded_again_and_strays_quarantined(core: Core) -> None:
    settings = core.settings
    kept = core.receive(modality="CR")
    lost = core.receive(modality="CR", seed=2)
    study, lost_sop = _uids(lost)
    # the row of `lost` went with a failover or a restore; its file stayed
    with core.sessions() as session:
        session.execute(delete(Instance).where(Instance.sop_instance_uid == lost_sop))
        session.commit()
    # a file linked into place whose row was never committed (killed before the commit)
    unacked = dicomgen.make_chest(core.tmp / "unacked.dcm", modality="DX", seed=3)
    unacked_study, unacked_sop = _uids(unacked)
    (settings.instances_dir / unacked_study).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(unacked, settings.instances_dir / unacked_study / f"{unacked_sop}.dcm")
    # strays: not DICOM, a name that is no instance, a folder that is no study
    (settings.instances_dir / study / "1.2.3.4.dcm").write_bytes(b"not dicom at all")
    (settings.instances_dir / study / "notes.txt").write_text("left by someone")
    (settings.instances_dir / "lost+found").mkdir()

    found = reconcile_files(settings, core.sessions)

    assert sorted(found.recorded) == sorted([lost_sop, unacked_sop])
    assert sorted(p.name for p in found.quarantined) == ["1.2.3.4.dcm", "lost+found", "notes.txt"]
    assert all(p.is_relative_to(quarantine_dir(settings)) and p.exists() for p in found.quarantined)
    with core.readers() as session:
        rows = {r.sop_instance_uid: r for r in session.scalars(select(Instance))}
        studies = {s.study_instance_uid: s for s in session.scalars(select(Study))}
    assert set(rows) == {_uids(kept)[1], lost_sop, unacked_sop}
    assert rows[unacked_sop].calling_aet == RECONCILED_AET
    assert rows[unacked_sop].path == f"{unacked_study}/{unacked_sop}.dcm"
    assert rows[unacked_sop].study_id == studies[unacked_study].id
    assert studies[unacked_study].instance_count == 1
    assert (settings.instances_dir / study / f"{lost_sop}.dcm").exists()

    again = reconcile_files(settings, core.sessions)
    assert again.recorded == [] and again.quarantined == [] and again.studies_checked == 0


def test_cxrnode_db_reconcile_records_the_files_a_restored_database_lacks(tmp_path: Path) -> None:
    data = tmp_path / "node"
    env = node_env(data)
    subprocess.run(
        [str(BIN / "cxrnode"), "db", "upgrade"], env=env, check=True, capture_output=True
    )
    image = dicomgen.make_chest(tmp_path / "restored.dcm", modality="CR", seed=5)
    study, sop = _uids(image)
    (data / "instances" / study).mkdir(parents=True)
    shutil.copyfile(image, data / "instances" / study / f"{sop}.dcm")
    done = subprocess.run(
        [str(BIN / "cxrnode"), "db", "reconcile"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("1 instances recorded again, 0 stray files"), done.stdout
