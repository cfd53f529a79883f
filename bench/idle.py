"""Idle CPU of a node: `cxrnode serve` with no traffic, embedded and Redis + PostgreSQL;
and the memory of an idle embedded node without a model, process by process.

    .venv/bin/python bench/idle.py [--seconds 60] [--settle 20]
    .venv/bin/python bench/idle.py --memory [--settle 20]

Starts each node (tiny checkpoint, workers included), waits ``--settle`` seconds for start-up
to finish, then reads the CPU time (user + system, from /proc) of the node's whole process
tree, its embedded broker included, at the start and the end of ``--seconds``. Orthanc 1.10,
idle over the same window, is the peer measured in the same run. Goal: <= 1 % of one core.

``--memory`` starts an embedded node with no MODEL set (workers included), waits ``--settle``
seconds, and prints each process of its tree with its title (what ``ps`` shows) and its PSS
(proportional set size, from ``/proc/<pid>/smaps_rollup``: shared pages are divided among the
processes sharing them, so the sum is what the node costs), then the total. Goal: <= 600 MB
PSS over all its processes, every process titled.
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


def pss_kib(pid: int) -> int | None:
    """Proportional set size of ``pid`` in KiB (None: gone, or not ours to read)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def command_line(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def memory_rows(root: int) -> list[dict]:
    """Title and PSS of ``root`` and each process below it."""
    rows = []
    for pid in sorted(descendants(root)):
        pss = pss_kib(pid)
        if pss is not None:
            rows.append({"pid": pid, "title": command_line(pid), "pss_mb": pss / 1024})
    return rows


def measure_memory(work: Path, args) -> list[dict]:
    data = work / "memory"
    env = node_env(data)
    env.pop("CXRNODE_SCP_PROCESSES", None)  # the node's own default, as installed
    node = Node(data, env).start()
    try:
        time.sleep(args.settle)
        return memory_rows(node.proc.pid)
    finally:
        node.stop()


def print_memory(rows: list[dict]) -> None:
    print(f"\n{'pid':>8} {'PSS MB':>8}  title (idle embedded node, no model)")
    for row in rows:
        print(f"{row['pid']:>8} {row['pss_mb']:>8.1f}  {row['title'][:100]}")
    total = sum(row["pss_mb"] for row in rows)
    untitled = [r for r in rows if "multiprocessing" in r["title"] or "python" in r["title"]]
    print(f"{'total':>8} {total:>8.1f}  over {len(rows)} processes; goal <= 600 MB PSS")
    print(f"untitled processes: {len(untitled)}")
    print(json.dumps({"memory": rows, "pss_mb_total": total}))


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
    parser.add_argument(
        "--memory", action="store_true", help="PSS per process of an idle node without a model"
    )
    args = parser.parse_args()
    if args.memory:
        with tempfile.TemporaryDirectory(prefix="cxrnode-idle-") as tmp:
            print_memory(measure_memory(Path(tmp), args))
        return

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
