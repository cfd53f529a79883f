"""Idle CPU of a node: `cxrnode serve` with no traffic, embedded and Redis + PostgreSQL.

    .venv/bin/python bench/idle.py [--seconds 60] [--settle 20]

Starts each node (tiny checkpoint, workers included), waits ``--settle`` seconds for start-up
to finish, then reads the CPU time (user + system, from /proc) of the node's whole process
tree, its embedded broker included, at the start and the end of ``--seconds``. Orthanc 1.10,
idle over the same window, is the peer measured in the same run. Goal: <= 1 % of one core.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from services import Node, fresh_database, node_env, postgres_server, redis_server  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / TICKS


def idle_share(root: int, seconds: float) -> tuple[float, int]:
    """Share of one core used by ``root``'s tree over ``seconds``, and the process count."""
    pids = descendants(root)
    before = cpu_seconds(pids)
    start = time.monotonic()
    time.sleep(seconds)
    after = cpu_seconds(pids)
    return (after - before) / (time.monotonic() - start), len(pids)


def measure_node(name: str, settings: dict[str, str], model: Path, work: Path, args) -> dict:
    data = work / name
    node = Node(data, node_env(data, model=str(model), **settings)).start()
    try:
        time.sleep(args.settle)
        share, count = idle_share(node.proc.pid, args.seconds)
    finally:
        node.stop()
    return {"what": f"cxrnode {name}", "core_share": share, "processes": count}


def measure_orthanc(work: Path, args) -> dict:
    from e2e_orthanc import Orthanc

    orthanc = Orthanc(work / "orthanc").start()
    try:
        time.sleep(args.settle)
        share, count = idle_share(orthanc.proc.pid, args.seconds)
    finally:
        orthanc.stop()
    return {"what": "Orthanc 1.10", "core_share": share, "processes": count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--settle", type=float, default=20)
    args = parser.parse_args()

    from model.tiny import make_tiny_checkpoint

    sys.path.insert(0, str(REPO / "tests" / "e2e"))
    sys.modules.setdefault("e2e_orthanc", __import__("orthanc_server"))
    with tempfile.TemporaryDirectory(prefix="cxrnode-idle-") as tmp:
        work = Path(tmp)
        model = make_tiny_checkpoint(work / "tiny")
        results = [measure_node("embedded", {}, model, work, args)]
        with postgres_server() as admin, redis_server() as broker, fresh_database(admin) as db:
            settings = {"database_url": db, "broker_url": broker + "/0"}
            results.append(measure_node("redis+postgresql", settings, model, work, args))
        results.append(measure_orthanc(work, args))
    print(
        f"\n{'idle for ' + str(int(args.seconds)) + ' s':<28} {'% of one core':>14} {'processes':>10}"
    )
    for r in results:
        print(f"{r['what']:<28} {100 * r['core_share']:>13.2f}% {r['processes']:>10}")
    print("goal: <= 1 % of one core for each mode")
    print(json.dumps({"idle": results, "seconds": args.seconds}))


if __name__ == "__main__":
    main()
