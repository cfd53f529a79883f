"""The node the web tests share, its PACS, the invented patient and small helpers (the
fixtures that start them are in conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import dicomgen
import pydicom
import requests
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless
from services import Node, free_port, port_open, storescu, wait_for

TOKEN = "web-tests-token-8f3a9c2e41d7b605"
PATIENT_NAME = "Quillfeather^Ottoline"
PATIENT_ID = "PID-7391-QF"
BIRTH_DATE = "19470319"
#: Where screenshots and other artifacts go (outside the source tree).
ARTIFACTS = Path(os.environ.get("CXRNODE_TEST_ARTIFACTS", "/tmp/cxrnode-test-artifacts"))

FAST = {
    "temperature": "0",
    "max_new_tokens": "8",
    "settle_seconds": "1",
    "reconcile_interval": "5",
    "send_max_attempts": "1",  # one refused connection makes a dead letter
    "send_timeout": "3",
    "api_token": TOKEN,
}


@dataclass
class Pacs:
    """dcmtk storescp as the destination, started and stopped at will."""

    directory: Path
    port: int = field(default_factory=free_port)
    aet: str = "PACS"
    proc: subprocess.Popen | None = None

    @property
    def destination(self) -> str:
        return f"{self.aet}@127.0.0.1:{self.port}"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["/usr/bin/storescp", "-aet", self.aet, "-od", str(self.directory), str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: port_open(self.port), 10, "storescp")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def received(self) -> list[str]:
        """SOP Instance UIDs of what arrived."""
        return sorted(
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in self.directory.iterdir()
            if p.is_file()
        )


@dataclass
class Site:
    """The module's node, its PACS and the studies it processed."""

    node: Node
    pacs: Pacs
    base: str
    dead: str  # its outputs became dead letters (until a test resends every dead letter)
    delivered: list[str]  # [0] left alone, [1] re-run by a test, [2] for fresh dead letters
    failed: str
    skipped: str
    tmp: Path

    def api(self, method: str, path: str, token: str | None = TOKEN, **kwargs) -> requests.Response:
        headers = kwargs.pop("headers", {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return requests.request(method, self.base + path, headers=headers, timeout=30, **kwargs)

    def get(self, path: str) -> dict:
        response = self.api("GET", path)
        assert response.status_code == 200, response.text
        return response.json()

    def study(self, uid: str) -> dict:
        return self.get(f"/api/v1/studies/{uid}")

    def send(self, *files: Path, extra: tuple[str, ...] = ()) -> None:
        result = storescu(self.node.port, *files, extra=extra)
        assert result.returncode == 0, result.stderr

    def wait_study(self, uid: str, ready, what: str, timeout: float = 120) -> dict:  # noqa: ANN001
        def check() -> dict | None:
            response = self.api("GET", f"/api/v1/studies/{uid}")
            if response.status_code != 200:
                return None
            detail = response.json()
            return detail if ready(detail) else None

        return wait_for(check, timeout, what, interval=0.5)

    def fresh_dead_letters(self) -> tuple[str, list[dict]]:
        """Re-run a study while the PACS is down: its new outputs are dead letters.
        Returns the study and those outputs; the PACS is up again afterwards."""
        uid = self.delivered[2]
        self.pacs.stop()
        try:
            answer = self.api("POST", f"/api/v1/studies/{uid}/rerun")
            assert answer.status_code == 202, answer.text
            version = answer.json()["version"]

            def dead(detail: dict) -> bool:
                mine = [o for o in detail["outputs"] if o["version"] == version]
                return len(mine) == 2 and all(o["state"] == "dead" for o in mine)

            detail = self.wait_study(uid, dead, "fresh dead letters")
        finally:
            self.pacs.start()
        return uid, [o for o in detail["outputs"] if o["version"] == version]


def chest(directory: Path, name: str, seed: int, **kwargs) -> Path:
    """A small chest radiograph of the invented patient (large enough for the node's geometry
    checks: 160 pixels of 1 mm)."""
    extra = {"PatientName": PATIENT_NAME, "PatientBirthDate": BIRTH_DATE}
    extra.update(kwargs.pop("extra", {}))
    return dicomgen.make_chest(
        directory / f"{name}.dcm",
        seed=seed,
        rows=160,
        cols=160,
        patient_id=PATIENT_ID,
        extra=extra,
        **kwargs,
    )


def unreadable_chest(directory: Path, name: str, seed: int) -> Path:
    """A chest image whose header is fine and whose RLE pixel data cannot be decoded: it is
    stored and acknowledged, and its job fails in prepare."""
    path = chest(directory, name, seed)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([b"\x01\x00\x00\x00" + b"\x00" * 60 + b"not RLE" * 5])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def study_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def delivered(detail: dict) -> bool:
    outputs = [o for o in detail["outputs"] if o["version"] == detail["version"]]
    return bool(outputs) and all(o["state"] == "delivered" for o in outputs)


def all_dead(detail: dict) -> bool:
    return bool(detail["outputs"]) and all(o["state"] == "dead" for o in detail["outputs"])


def metrics_text(site: Site) -> str:
    response = requests.get(site.base + "/metrics", timeout=30)
    assert response.status_code == 200, response.text
    return response.text


def status_json(site: Site) -> dict:
    return json.loads(site.node.cli("status", "--json").stdout)
