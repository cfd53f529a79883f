"""What the namespace tests share: a PostgreSQL host, and the scripts they run inside a
host to read the database and the broker (``python -c SCRIPT ARG`` in the host's namespace)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from netns import Host, Network
from services import _pg_bin, wait_for

HA = Path(__file__).resolve().parent

#: Jobs, drafts and instance rows of the database at argv[1], as JSON.
CHECK = f"""
import json, sys
sys.path[:0] = [{str(HA)!r}, {str(HA.parent)!r}]
from stream import drafts
from sqlalchemy import create_engine, text
url = sys.argv[1]
found = drafts(url)
engine = create_engine(url)
with engine.connect() as conn:
    rows = [r[0] for r in conn.execute(text("SELECT sop_instance_uid FROM instances"))]
print(json.dumps({{"jobs": found.jobs, "done": found.done, "inferred": found.inferred, "rows": rows}}))
"""

#: The live workers' heartbeats in the broker at host argv[1], as JSON.
WORKERS = f"""
import json, sys
sys.path[:0] = [{str(HA)!r}, {str(HA.parent)!r}]
import redis
client = redis.Redis(host=sys.argv[1], port=6379, socket_timeout=5)
print(json.dumps([json.loads(client.get(k)) for k in client.keys("cxrnode:worker:*")]))
"""


def postgres_host(net: Network, host: Host) -> str:
    """A PostgreSQL server of its own on ``host`` (trust from the test subnet); its URL."""
    root = Path(tempfile.mkdtemp(prefix="cxrnode-nspg-"))
    shutil.chown(root, "postgres")
    data = root / "data"
    as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [
            *as_postgres,
            _pg_bin("initdb") or "initdb",
            "-A",
            "trust",
            "-U",
            "postgres",
            "-D",
            str(data),
        ],
        check=True,
        capture_output=True,
    )
    with open(data / "pg_hba.conf", "a") as hba:
        hba.write(f"host all all {net.subnet}.0/24 trust\n")
    net.start(
        host,
        *as_postgres,
        _pg_bin("postgres") or "postgres",
        "-D", str(data), "-p", "5432", "-k", str(root), "-c", f"listen_addresses={host.address}",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    psql = _pg_bin("psql") or "psql"

    def created() -> bool:
        answer = net.run(
            host, psql, "-h", host.address, "-U", "postgres", "-c", "CREATE DATABASE cxrnode"
        )
        return answer.returncode == 0

    wait_for(created, 60, "PostgreSQL in its namespace", interval=0.5)
    return f"postgresql+psycopg://postgres@{host.address}:5432/cxrnode"
