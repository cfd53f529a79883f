"""Durability under kill -9, the disk reserve, and DICOM TLS with dcmtk."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import dicomgen
import pydicom
import pytest
from services import echoscu, free_port, storescu, wait_for
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from cxrnode.db import Instance


def test_every_acknowledged_instance_survives_kill9_of_the_node(make_node, tmp_path: Path) -> None:
    node = make_node("--no-workers")
    files = [
        dicomgen.make_large_dx(tmp_path / "send" / f"{i:03}.dcm", rows=512, cols=512)
        for i in range(120)
    ]
    sender = subprocess.Popen(
        [
            "/usr/bin/storescu",
            "-v",
            "-aec",
            "CXRNODE",
            "127.0.0.1",
            str(node.port),
            *map(str, files),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    acknowledged: list[Path] = []
    current: Path | None = None
    assert sender.stdout is not None
    for line in sender.stdout:
        if match := re.search(r"Sending file: (\S+)", line):
            current = Path(match.group(1))
        elif "Received Store Response (Success)" in line and current is not None:
            acknowledged.append(current)
            if len(acknowledged) == 40:
                node.kill9()  # mid-stream: storescu is sending the next file now
    sender.wait(60)
    assert 40 <= len(acknowledged) < len(files), "the kill must land mid-stream"

    node.start()  # same data directory and database
    engine = create_engine(f"sqlite:///{node.data_dir / 'cxrnode.db'}")
    with Session(engine) as session:
        recorded = {r.sop_instance_uid: r for r in session.scalars(select(Instance))}
    engine.dispose()
    for path in acknowledged:
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert uid in recorded, f"acknowledged {path.name} is not in the database"
        stored = node.data_dir / "instances" / recorded[uid].path
        assert stored.read_bytes()[-4096:] == path.read_bytes()[-4096:]
    assert not list((node.data_dir / "tmp").glob("*.part")), "partial files are cleaned at start"
    # Everything the sender did not see acknowledged can simply be sent again.
    assert storescu(node.port, *files).returncode == 0


def test_below_the_disk_reserve_associations_are_refused(make_node) -> None:
    node = make_node("--no-workers", min_free_disk_mb=str(1 << 40))  # a reserve no disk meets
    refused = echoscu(node.port)
    assert refused.returncode != 0
    assert "rejected" in (refused.stdout + refused.stderr).lower()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A throw-away CA with a server and a client certificate."""
    d = tmp_path / "pki"
    d.mkdir()
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=cxrnode test CA",
        cwd=d,
    )
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN=localhost-{name}",
            cwd=d,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "2",
            cwd=d,
        )
    return d


def test_a_tls_association_from_dcmtk_works_and_needs_a_client_certificate(
    make_node, pki: Path, tmp_path: Path
) -> None:
    tls_port = free_port()
    node = make_node(
        "--no-workers",
        tls_port=str(tls_port),
        tls_cert=str(pki / "server.crt"),
        tls_key=str(pki / "server.key"),
        tls_client_ca=str(pki / "ca.crt"),
    )
    with_cert = (
        "+tls",
        str(pki / "client.key"),
        str(pki / "client.crt"),
        "+cf",
        str(pki / "ca.crt"),
    )
    assert echoscu(tls_port, extra=with_cert).returncode == 0
    image = dicomgen.make_chest(tmp_path / "tls.dcm")
    assert storescu(tls_port, image, extra=with_cert).returncode == 0
    anonymous = ("+tla", "+cf", str(pki / "ca.crt"))
    assert echoscu(tls_port, extra=anonymous).returncode != 0

    def tls_alert() -> bool:  # the refused handshake is a Security Alert in the audit trail
        records = "".join(p.read_text() for p in (node.data_dir / "audit").glob("audit-*.log"))
        return 'csd-code="110113"' in records and "DICOM TLS handshake failed" in records

    wait_for(tls_alert, 20, "the TLS refusal's audit record")
    assert echoscu(node.port).returncode == 0  # the plain port keeps working beside it
