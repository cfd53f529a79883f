"""Two GPU-worker hosts against one, in the same run: are both used, and what rate end to end?

    sudo .venv/bin/python bench/hosts.py                 # 20 studies per phase, the tiny model
    sudo .venv/bin/python bench/hosts.py --studies 60 --model /models/cxr-llava-v2

Real hosts: the broker (redis-server), the node (`serve --no-workers` and the node-side
worker) and two GPU-worker hosts (`cxrnode worker --queues infer`) each run in a network
namespace of their own, joined by a bridge (``tests/ha/netns.py``; root and iproute2
needed). Phase 1 sends ``--studies`` studies with both GPU hosts up; phase 2 stops the
second and sends as many again. Printed per phase: studies drafted per GPU host (from each
worker's finished infer tasks) and the end-to-end rate (first C-STORE to last draft).

On one machine the "hosts" share its CPU (and GPU): the rate shows that work is spread, not
what two real machines would give.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "ha")]

from netns import Host, Network, NsStream  # noqa: E402
from services import BIN, node_env, wait_for  # noqa: E402

DONE = f"""
import json, sys
sys.path[:0] = [{str(REPO / "tests" / "ha")!r}, {str(REPO / "tests")!r}]
from stream import drafts
print(json.dumps(sorted(drafts(sys.argv[1]).done)))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--model", type=Path, help="a checkpoint (default: make the tiny one)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cxrnode-hosts-"))
    model = args.model
    if model is None:
        model = root / "tiny-model"
        subprocess.run([str(BIN / "cxrnode"), "model", "make-tiny", str(model)], check=True)

    with Network() as net:
        broker, node = net.add_host("broker"), net.add_host("node")
        gpus = [net.add_host("gpu1"), net.add_host("gpu2")]
        net.start(
            broker, shutil.which("redis-server") or "/usr/bin/redis-server",
            "--bind", broker.address, "--port", "6379", "--save", "", "--protected-mode", "no",
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        common = {
            "model": str(model),
            "broker_url": f"redis://{broker.address}:6379/0",
            "temperature": "0",
            "max_new_tokens": "8",
        }
        data = root / "node"
        data.mkdir()
        env = node_env(data, **common)
        port = int(env["CXRNODE_DICOM_PORT"])
        logs: dict[str, Path] = {}
        procs = {}

        def start(host: Host, name: str, environment: dict[str, str], *command: str) -> None:
            logs[name] = root / f"{name}.log"
            with open(logs[name], "wb") as log:
                procs[name] = net.start(
                    host, str(BIN / "cxrnode"), *command, env=environment, stdout=log,
                    stderr=subprocess.STDOUT,
                )  # fmt: skip

        wait_for(
            lambda: (
                net.run(node, "redis-cli", "-h", broker.address, "ping").stdout.strip() == "PONG"
            ),
            30,
            "the broker",
        )
        start(node, "serve", env, "serve", "--no-workers")
        start(node, "node-worker", env, "worker", "--queues", "prepare,outputs,send")
        for gpu in gpus:
            start(gpu, gpu.name, node_env(root / gpu.name, **common), "worker", "--queues", "infer")
        wait_for(
            lambda: (
                net.run(
                    node, "/usr/bin/echoscu", "-aec", "CXRNODE", "127.0.0.1", str(port)
                ).returncode
                == 0
            ),
            180,
            "the node",
        )
        database = f"sqlite:///{data / 'cxrnode.db'}"

        def finished(name: str) -> int:
            lines = logs[name].read_text(errors="replace").splitlines()
            return sum("cxrnode.infer_report[" in line and "succeeded" in line for line in lines)

        def phase(label: str, seed: int) -> None:
            before = {gpu.name: finished(gpu.name) for gpu in gpus}
            stream = NsStream(net, node, port, root / label, args.studies, every=0.0, seed=seed)
            started = time.monotonic()
            stream.thread.start()
            stream.thread.join(3600)

            def drafted() -> bool:
                answer = net.run(node, sys.executable, "-c", DONE, database, timeout=60)
                return set(json.loads(answer.stdout)) >= set(stream.studies)

            wait_for(drafted, 3600, f"{label}: every study drafted", interval=1.0)
            seconds = time.monotonic() - started
            per_host = {gpu.name: finished(gpu.name) - before[gpu.name] for gpu in gpus}
            print(
                f"{label}: {len(stream.studies)} studies in {seconds:.1f} s "
                f"({len(stream.studies) / seconds * 60:.1f} studies/min); drafted per GPU host "
                f"{per_host}"
            )

        phase("two GPU hosts", 5000)
        procs["gpu2"].terminate()
        procs["gpu2"].wait(60)
        phase("one GPU host", 9000)
    print(f"(logs under {root})")


if __name__ == "__main__":
    main()
