"""Hardening against real peers: the node-wide association cap, TLS-only mode, the chest
filter's Modality and geometry checks, UID conflicts recorded, chest Secondary Captures,
the memory bound of a huge instance, and the logs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dicomgen
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from services import echoscu, free_port, storescu, wait_for
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session
from test_crash_and_tls import pki  # noqa: F401 - the throw-away CA fixture

from cxrnode.db import AssociationLog, Instance, Refusal

SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
MULTIFRAME_BYTE_SC = "1.2.840.10008.5.1.4.1.1.7.2"


def rows(node, model: type) -> list:  # noqa: ANN001
    engine = create_engine(f"sqlite:///{node.data_dir / 'cxrnode.db'}")
    try:
        with Session(engine) as session:
            return list(session.scalars(select(model)).all())
    finally:
        engine.dispose()


def dcmsend(port: int, *files: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["/usr/bin/dcmsend", "-v", "-aec", "CXRNODE", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )


# ----------------------------------------------------------------------- association cap


def open_association(port: int):  # noqa: ANN201
    ae = AE(ae_title="CAPTEST")
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="CXRNODE")


def test_the_association_cap_holds_for_the_node_not_per_process(make_node) -> None:
    node = make_node("--no-workers", max_associations="4", scp_processes="2")
    held = [open_association(node.port) for _ in range(4)]
    try:
        assert all(a.is_established for a in held), "no refusal below the cap"
        over = open_association(node.port)
        assert over.is_rejected, "the fifth association is refused"
        rejection = over.acceptor.primitive
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (2, 3, 2), (
            "A-ASSOCIATE-RJ transient, service provider (presentation), local limit exceeded"
        )
        refused = echoscu(node.port)
        assert refused.returncode != 0 and "rejected" in (refused.stdout + refused.stderr).lower()
        held.pop().release()
        again = wait_for(
            lambda: (a := open_association(node.port)).is_established and a, 10, "a free slot"
        )
        held.append(again)
    finally:
        for assoc in held:
            assoc.release()
    # every slot comes back once the associations end, aborted ones included
    aborted = [open_association(node.port) for _ in range(4)]
    for assoc in aborted:
        assoc.abort()
    wait_for(lambda: echoscu(node.port).returncode == 0, 10, "slots given back after aborts")
    logged = [r for r in rows(node, AssociationLog) if not r.accepted]
    assert logged and all("cap" in r.reason for r in logged)


# ----------------------------------------------------------------------------- TLS only


def test_tls_only_closes_the_plain_port(make_node, pki: Path, tmp_path: Path) -> None:  # noqa: F811
    tls_port = free_port()
    node = make_node(
        "--no-workers",
        start=False,
        tls_only="true",
        tls_port=str(tls_port),
        tls_cert=str(pki / "server.crt"),
        tls_key=str(pki / "server.key"),
    )
    node.start(wait=False)
    tls = ("+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt"))
    wait_for(lambda: echoscu(tls_port, extra=tls).returncode == 0, 60, "the TLS listener")
    plain = echoscu(node.port)
    assert plain.returncode != 0
    assert "refused" in (plain.stdout + plain.stderr).lower(), plain.stderr
    image = dicomgen.make_chest(tmp_path / "tls-only.dcm")
    assert storescu(tls_port, image, extra=tls).returncode == 0
    assert len(rows(node, Instance)) == 1


def test_tls_only_without_a_tls_listener_is_a_settings_error(make_node) -> None:
    node = make_node("--no-workers", start=False, tls_only="true")
    result = node.cli("status", check=False)
    assert result.returncode != 0 and "TLS_ONLY" in result.stderr


# ----------------------------------------------------------------------- the chest filter


def test_a_ct_slice_under_the_cr_sop_class_is_stored_skipped_and_not_inferred(
    make_node, tmp_path: Path
) -> None:
    node = make_node("--no-workers", settle_seconds="1")
    ds = dicomgen.build_chest(modality="CR", rows=512, cols=512)
    ds.Modality = "CT"  # the header's own word, under CR Image Storage
    ds.save_as(tmp_path / "ct-as-cr.dcm", enforce_file_format=True)
    result = storescu(node.port, tmp_path / "ct-as-cr.dcm")
    assert result.returncode == 0 and "Success" in result.stdout + result.stderr
    (row,) = rows(node, Instance)
    assert row.state == "skipped" and "Modality CT" in row.skip_reason


# -------------------------------------------------------------------------- UID conflicts


def test_an_instance_uid_reused_in_another_study_is_refused_and_recorded(
    make_node, tmp_path: Path
) -> None:
    node = make_node("--no-workers")
    sop = generate_uid()
    first = dicomgen.make_chest(tmp_path / "first.dcm", sop_uid=sop)
    second = dicomgen.make_chest(tmp_path / "second.dcm", sop_uid=sop, study_uid=generate_uid())
    assert storescu(node.port, first).returncode == 0
    refused = storescu(node.port, second)
    assert "datasetdoesnotmatchsopclass" in (refused.stdout + refused.stderr).lower()  # 0xA900
    (refusal,) = rows(node, Refusal)
    assert (refusal.kind, refusal.status, refusal.sop_instance_uid) == ("uid-conflict", 0xA900, sop)
    assert refusal.calling_aet == "STORESCU"
    assert "ANON1" not in json.dumps(refusal.reason) and "SYNTHETIC" not in refusal.reason
    assert len(rows(node, Instance)) == 1


# ------------------------------------------------------------------- Secondary Captures


def test_a_chest_secondary_capture_is_accepted_and_other_scs_refused(
    make_node, tmp_path: Path
) -> None:
    node = make_node("--no-workers", settle_seconds="1")
    chest = dicomgen.chest_secondary_capture(tmp_path / "sc-chest.dcm")
    one_frame = dicomgen.chest_secondary_capture(tmp_path / "sc-one-frame.dcm", frames=1)
    assert pydicom.dcmread(chest).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    sent = dcmsend(node.port, chest, one_frame)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    stored = {r.sop_class_uid: r for r in rows(node, Instance)}
    assert stored[SC_CLASS].state == "stored" and stored[SC_CLASS].skip_reason is None
    assert stored[MULTIFRAME_BYTE_SC].state == "stored"

    drafts_like = dicomgen.chest_secondary_capture(
        tmp_path / "sc-ot.dcm", modality="OT", conversion="WSD"
    )
    hand = dicomgen.chest_secondary_capture(tmp_path / "sc-hand.dcm", body_part="HAND")
    three_frames = dicomgen.chest_secondary_capture(tmp_path / "sc-three.dcm", frames=3)
    for path in (drafts_like, hand, three_frames):
        refused = dcmsend(node.port, path)
        answer = (refused.stdout + refused.stderr).lower()
        assert "0x0122" in answer or "sopclassnotsupported" in answer, (path.name, answer)
    assert {r.kind for r in rows(node, Refusal)} == {"not-supported"}
    assert len(rows(node, Instance)) == 2


# ---------------------------------------------------------------------- memory and size


#: Prepares one image and prints the process's peak RSS: VmHWM, which starts afresh at exec
#: (ru_maxrss would carry over the forking test process's own size).
PEAK_SCRIPT = """
import re, sys
from pathlib import Path
from cxrnode.prepare.images import prepare_images
from cxrnode.settings import Settings
settings = Settings(data_dir=sys.argv[2])
prepare_images(settings, Path(sys.argv[1]), "1.2.3", "1.2.3.4")
status = Path("/proc/self/status").read_text()
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024)
"""


def huge_radiograph(path: Path, side: int = 10000, voi: str = "none") -> Path:
    """A native 16-bit chest radiograph of side x side pixels (10000: 191 MiB)."""
    ds = dicomgen.build_chest(rows=256, cols=256, voi=voi, bits_stored=12)
    ds.Rows = ds.Columns = side
    ds.PixelData = (np.arange(side * side, dtype=np.uint32) % 4093).astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_preparing_a_200_mb_instance_peaks_below_4x_its_size(tmp_path: Path) -> None:
    path = huge_radiograph(tmp_path / "huge.dcm")
    size = path.stat().st_size
    assert size > 190 * 2**20
    result = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(path), str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    peak = int(result.stdout.split()[-1])
    assert peak <= 4 * size, f"peak RSS {peak / 2**20:.0f} MiB for {size / 2**20:.0f} MiB"


def test_an_image_beyond_max_image_mb_is_stored_and_skipped(make_node, tmp_path: Path) -> None:
    node = make_node("--no-workers", max_image_mb="1")
    image = dicomgen.make_chest(tmp_path / "big.dcm", rows=1100, cols=1030)
    assert storescu(node.port, image).returncode == 0
    (row,) = rows(node, Instance)
    assert row.state == "skipped" and "MAX_IMAGE_MB" in row.skip_reason


# ----------------------------------------------------------------------------------- logs


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_logs_go_to_a_rotating_file_per_process_and_carry_no_patient_data(
    make_node, tmp_path: Path, log_format: str
) -> None:
    node = make_node(log_format=log_format, log_targets="file", log_file_max_mb="1")
    bad = dicomgen.make_chest(tmp_path / "bad.dcm", patient_id="PID-SECRET-99")
    dicomgen.truncate(bad, tmp_path / "trunc.dcm", 0.5)
    storescu(node.port, tmp_path / "trunc.dcm")
    assert storescu(node.port, dicomgen.make_chest(tmp_path / "ok.dcm")).returncode == 0
    logs = node.data_dir / "logs"
    # the monitor is a thread of serve; without MODEL one worker serves every queue
    expected = {
        "serve.log",
        "listener-0.log",
        "listener-1.log",
        "web.log",
        "worker-prepare-outputs-send-infer.log",
    }
    wait_for(lambda: expected <= {p.name for p in logs.glob("*.log")}, 90, f"log files {expected}")
    text = "".join(p.read_text() for p in logs.glob("*.log"))
    assert "refused" in text
    assert "PID-SECRET-99" not in text and "SYNTHETIC" not in text
    if log_format == "json":
        for line in text.splitlines():
            entry = json.loads(line)
            assert {"time", "level", "process", "logger", "message"} <= set(entry)
    assert "INFO" not in node.log(), "LOG_TARGETS=file: nothing on stderr"
