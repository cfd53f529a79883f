"""A real Orthanc (the Debian package) as the PACS of the end-to-end tests.

Each server runs the demo PACS's configuration and routing script (``config/orthanc/``:
CR/DX go to the modality named ``cxrnode``) with its own storage and index in a temporary
directory, free ports and the test node's address. Tests talk to it
through its REST API, as an admin or a viewer would.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services import REPO, free_port, port_open, wait_for

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DEMO_CONFIG = REPO / "config" / "orthanc" / "orthanc.json"
AUTOROUTE_LUA = REPO / "config" / "orthanc" / "autoroute.lua"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")

#: Appended after the routing script: records every stored instance (one SOP Instance UID a
#: line) so a test can count deliveries, then routes as the demo PACS does.
COUNTING_LUA = """
local route = OnStoredInstance
function OnStoredInstance(instanceId, tags, metadata, origin)
  local log = io.open("{log}", "a")
  log:write(tags["SOPInstanceUID"] .. " " .. (tags["Modality"] or "") .. "\\n")
  log:close()
  route(instanceId, tags, metadata, origin)
end
"""


@dataclass
class Orthanc:
    """An Orthanc process; ``start``/``stop`` may be called repeatedly (same storage)."""

    root: Path
    node_aet: str = "CXRNODE"
    node_port: int = 11112
    aet: str = "ORTHANC"
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    check_called_aet: bool = True
    proc: subprocess.Popen | None = None

    @property
    def destination(self) -> str:
        """This PACS as a cxrnode destination entry."""
        return f"{self.aet}@127.0.0.1:{self.dicom_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def stored_log(self) -> Path:
        return self.root / "stored.log"

    def config(self) -> dict[str, Any]:
        """The demo PACS's configuration (config/orthanc/orthanc.json) with this server's
        paths, ports and node address, and the counting script after the routing one."""
        counting = self.root / "counting.lua"
        counting.write_text(COUNTING_LUA.replace("{log}", str(self.stored_log)))
        config: dict[str, Any] = json.loads(DEMO_CONFIG.read_text())
        config.update(
            {
                "StorageDirectory": str(self.root / "storage"),
                "IndexDirectory": str(self.root / "index"),
                "DicomAet": self.aet,
                "DicomPort": self.dicom_port,
                "HttpPort": self.http_port,
                "RemoteAccessAllowed": False,
                "AuthenticationEnabled": False,
                "DicomCheckCalledAet": self.check_called_aet,
                "DicomModalities": {"cxrnode": [self.node_aet, "127.0.0.1", self.node_port]},
                "LuaScripts": [str(AUTOROUTE_LUA), str(counting)],
                "StableAge": 1,
                "ConcurrentJobs": 2,
                "DicomScuTimeout": 10,
            }
        )
        config.pop("RegisteredUsers", None)
        if not DICOMWEB_PLUGIN.is_file():
            config.pop("Plugins", None)
            config.pop("DicomWeb", None)
        return config

    def start(self) -> Orthanc:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(self.config(), indent=2))
        log = (self.root / "orthanc.log").open("ab")
        self.proc = subprocess.Popen(
            [ORTHANC, str(path)], stdout=log, stderr=subprocess.STDOUT, cwd=self.root
        )
        wait_for(self._answers, 30, "Orthanc's REST API", interval=0.2)
        wait_for(lambda: port_open(self.dicom_port), 10, "Orthanc's DICOM port")
        return self

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited early:\n{self.log()}")
        try:
            return bool(self.get("/system"))
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        deadline = time.monotonic() + 10
        while port_open(self.dicom_port) and time.monotonic() < deadline:
            time.sleep(0.1)

    def log(self) -> str:
        path = self.root / "orthanc.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    # ----------------------------------------------------------------------------- REST API
    def request(self, method: str, path: str, body: Any = None) -> Any:
        if body is None or isinstance(body, bytes):
            data = body
        else:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            payload = response.read()
        if response.headers.get_content_type() == "application/json":
            return json.loads(payload)
        return payload

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self.request("POST", path, body)

    def study(self, study_uid: str) -> str | None:
        """Orthanc's id of a study, or None when it does not hold it."""
        found = self.post("/tools/lookup", study_uid)  # the raw UID, not JSON
        ids = [item["ID"] for item in found if item["Type"] == "Study"]
        return ids[0] if ids else None

    def instances_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        """Every instance of a study with its simplified tags (``Tags``) and series."""
        study = self.study(study_uid)
        if study is None:
            return []
        result = []
        for instance in self.get(f"/studies/{study}/instances"):
            tags = self.get(f"/instances/{instance['ID']}/simplified-tags")
            result.append({"ID": instance["ID"], "Tags": tags})
        return result

    def file(self, instance_id: str) -> bytes:
        return self.get(f"/instances/{instance_id}/file")

    def stored_uids(self) -> list[str]:
        """SOP Instance UIDs in the order Orthanc stored them (repeats included)."""
        if not self.stored_log.is_file():
            return []
        return [line.split()[0] for line in self.stored_log.read_text().splitlines() if line]
