"""End-to-end pipeline benchmark: studies/min, node overhead per study and source-file reads.

    .venv/bin/python bench/pipeline.py [--studies 16] [--latency-studies 10] [--no-pixel]

Starts real `cxrnode serve` nodes, embedded and Redis + PostgreSQL (tiny checkpoint, greedy,
few tokens so the model is not what is measured), sends studies with dcmtk `storescu`, and
reads the timeline from the database:

* node overhead of a study = (job done) - (quiet period over) - (model time reported by the
  engine): scheduling, broker hops, DICOM decode and prepare, result storage and the outputs
  (the SR and SC built and written; no destination, so no network send);
* throughput = studies / (last job done - first quiet period over), all sent at once;
* source-file reads per study: while the latency studies run one at a time, Linux inotify
  watches DATA_DIR/tmp (where the listener receives each dataset) and DATA_DIR/instances;
  every open of a received file that reads from it before it is closed counts as one read.
  Goal: 2 (the header at ingest, the pixels in prepare).

Then runs bench/pixel.py (the pixel path against the plain approach and bare decoding).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# bench/model.py would shadow the model package: import from the repository root instead
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import dicomgen  # noqa: E402
from services import Node, fresh_database, node_env, postgres_server, redis_server  # noqa: E402
from sqlalchemy import create_engine, func, select  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from cxrnode.db import Job, JobEvent, Study  # noqa: E402


def query(database_url: str, *statements: Any) -> list[list[Any]]:
    """The rows of each statement, read in one session of a short-lived engine."""
    engine = create_engine(database_url)
    try:
        with Session(engine) as session:
            return [list(session.execute(statement).all()) for statement in statements]
    finally:
        engine.dispose()


def timeline(database_url: str) -> list[tuple[float, float, float]]:
    """(quiet period over, done, model seconds) of every done job, epoch seconds."""
    (rows,) = query(
        database_url,
        select(Study.settle_at, JobEvent.at, Job.result)
        .join(Study, Study.id == Job.study_id)
        .join(JobEvent, (JobEvent.job_id == Job.id) & (JobEvent.to_state == "done"))
        .where(Job.state == "done"),
    )
    return [
        (settle.timestamp(), done.timestamp(), float(result["timings"].get("total", 0.0)))
        for settle, done, result in rows
    ]


class ReadCounter:
    """Counts reads of received DICOM files with Linux inotify (see the module docstring)."""

    IN_ACCESS, IN_OPEN, IN_CLOSE_NOWRITE, IN_CLOSE_WRITE = 0x1, 0x20, 0x10, 0x8
    IN_CREATE, IN_ISDIR = 0x100, 0x40000000

    def __init__(self, data_dir: Path) -> None:
        import ctypes
        import ctypes.util
        import struct
        import threading

        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._struct = struct
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK)
        self.watches: dict[int, Path] = {}
        for directory in (data_dir / "tmp", data_dir / "instances"):
            directory.mkdir(parents=True, exist_ok=True)
            self._watch(directory)
        self.reads = 0
        self._reading: dict[tuple[int, str], bool] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _watch(self, directory: Path) -> None:
        mask = self.IN_ACCESS | self.IN_OPEN | self.IN_CLOSE_NOWRITE | self.IN_CLOSE_WRITE
        wd = self._libc.inotify_add_watch(self.fd, str(directory).encode(), mask | self.IN_CREATE)
        if wd >= 0:
            self.watches[wd] = directory

    def _run(self) -> None:
        import select

        while not self._stop.is_set():
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if not ready:
                continue
            buffer = os.read(self.fd, 1 << 16)
            offset = 0
            while offset < len(buffer):
                wd, mask, _, length = self._struct.unpack_from("iIII", buffer, offset)
                name = buffer[offset + 16 : offset + 16 + length].rstrip(b"\0").decode()
                offset += 16 + length
                key = (wd, name)
                if mask & self.IN_ISDIR:
                    if mask & self.IN_CREATE:  # a new study directory
                        self._watch(self.watches[wd] / name)
                    continue  # listings of the directories themselves are not file reads
                if mask & self.IN_OPEN:
                    self._reading[key] = False
                elif mask & self.IN_ACCESS and key in self._reading:
                    self._reading[key] = True
                elif mask & (self.IN_CLOSE_NOWRITE | self.IN_CLOSE_WRITE):
                    self.reads += int(self._reading.pop(key, False))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        os.close(self.fd)


def stages(database_url: str, skip: int = 1) -> dict[str, list[float]]:
    """Seconds spent between the steps of each done job (the first ``skip`` jobs left out):
    from the quiet period's end to the job queued, queued -> prepared, prepared -> inferred
    less the model's own time, inferred -> done."""
    jobs, events = query(
        database_url,
        select(Job.id, Study.settle_at, Job.result)
        .join(Study, Study.id == Job.study_id)
        .where(Job.state == "done")
        .order_by(Job.id),
        select(JobEvent.job_id, JobEvent.to_state, JobEvent.at).order_by(JobEvent.id),
    )
    jobs = jobs[skip:]
    first: dict[tuple[int, str], float] = {}
    for job_id, state, at in events:
        first.setdefault((job_id, state), at.replace(tzinfo=UTC).timestamp())
    out: dict[str, list[float]] = {}
    for job_id, settle_at, result in jobs:
        model = float(((result or {}).get("timings") or {}).get("total", 0.0))
        settle = settle_at.replace(tzinfo=UTC).timestamp()
        marks = [first.get((job_id, s)) for s in ("queued", "prepared", "inferred", "done")]
        if None in marks:
            continue
        queued, prepared, inferred, done = marks
        for name, seconds in (
            ("settle->queued", queued - settle),
            ("queued->prepared", prepared - queued),
            ("prepared->inferred-model", inferred - prepared - model),
            ("inferred->done", done - inferred),
        ):
            out.setdefault(name, []).append(seconds)
    return out


def wait_done(database_url: str, count: int, timeout: float = 600) -> list:
    """The timeline once ``count`` jobs are done.

    The poll is one COUNT on one connection kept for the wait: the bench runs at normal
    priority beside workers at nice +10, and a poll that built an engine and read the whole
    timeline five times a second took CPU from the steps it measures.
    """
    deadline = time.monotonic() + timeout
    engine = create_engine(database_url)
    done = select(func.count(Job.id)).where(Job.state == "done")
    try:
        with engine.connect() as conn:
            while time.monotonic() < deadline:
                if conn.execute(done).scalar_one() >= count:
                    return timeline(database_url)
                conn.rollback()
                time.sleep(0.2)
    finally:
        engine.dispose()
    raise TimeoutError(f"only {len(timeline(database_url))} of {count} jobs done")


def send(node: Node, files: list[Path]) -> None:
    result = subprocess.run(
        ["/usr/bin/storescu", "-aec", node.ae_title, "127.0.0.1", str(node.port), *map(str, files)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def run_mode(name: str, settings: dict[str, str], model: Path, work: Path, args) -> dict:
    data = work / name
    env = node_env(
        data, model=str(model), temperature="0", max_new_tokens="16", settle_seconds="1", **settings
    )
    node = Node(data, env).start()
    database = settings.get("database_url") or f"sqlite:///{data / 'cxrnode.db'}"
    try:
        files = [
            dicomgen.make_chest(work / f"{name}-{i}.dcm", rows=1024, cols=1024, seed=i)
            for i in range(args.latency_studies + args.studies)
        ]
        # warm-up (the model loads on first use), then latency: one study at a time
        warm_up = dicomgen.make_chest(work / f"{name}-warm.dcm", rows=1024, cols=1024)
        send(node, [warm_up])
        wait_done(database, 1)
        counter = ReadCounter(data)
        for index, path in enumerate(files[: args.latency_studies]):
            send(node, [path])
            wait_done(database, index + 2)
        time.sleep(1)
        counter.close()
        overheads = [done - settle - model for settle, done, model in timeline(database)[1:]]
        steps = {
            name: (statistics.median(values) * 1000, percentile(values, 95) * 1000)
            for name, values in stages(database).items()
        }
        # throughput: everything at once
        before = len(timeline(database))
        send(node, files[args.latency_studies :])
        rows = sorted(wait_done(database, before + args.studies))[before:]
        span = max(done for _, done, _ in rows) - min(settle for settle, _, _ in rows)
        return {
            "mode": name,
            "studies_per_min": args.studies / span * 60,
            "overhead_p50_ms": statistics.median(overheads) * 1000,
            "overhead_p95_ms": percentile(overheads, 95) * 1000,
            "overhead_slowest_ms": [round(v * 1000) for v in sorted(overheads)[-5:]],
            "slowest_study_index": overheads.index(max(overheads)),  # 0: first after warm-up
            "model_s_median": statistics.median(m for _, _, m in rows),
            "source_reads_per_study": counter.reads / args.latency_studies,
            "steps_p50_p95_ms": steps,
        }
    finally:
        node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=16)
    parser.add_argument("--latency-studies", type=int, default=10)
    parser.add_argument("--no-pixel", action="store_true")
    args = parser.parse_args()

    from model.tiny import make_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="cxrnode-bench-") as tmp:
        work = Path(tmp)
        model = make_tiny_checkpoint(work / "tiny")
        results = [run_mode("embedded", {}, model, work, args)]
        with postgres_server() as admin, redis_server() as broker, fresh_database(admin) as db:
            results.append(
                run_mode(
                    "redis+postgresql",
                    {"database_url": db, "broker_url": broker + "/0"},
                    model,
                    work,
                    args,
                )
            )
    header = f"{'mode':<18} {'studies/min':>11} {'overhead p50':>13} {'p95':>8} {'model s':>8}"
    print(f"\n{header} {'file reads/study':>17}")
    for r in results:
        print(
            f"{r['mode']:<18} {r['studies_per_min']:>11.1f} {r['overhead_p50_ms']:>10.0f} ms"
            f" {r['overhead_p95_ms']:>5.0f} ms {r['model_s_median']:>8.2f}"
            f" {r['source_reads_per_study']:>17.1f}"
        )
    for r in results:
        print(
            f"{r['mode']}: slowest overheads (ms): {r['overhead_slowest_ms']}"
            f" (the slowest: latency study {r['slowest_study_index'] + 1})"
        )
        print(f"{r['mode']}: where the overhead goes (p50 / p95 ms)")
        for name, (p50, p95) in r["steps_p50_p95_ms"].items():
            print(f"  {name:<26} {p50:7.0f} {p95:7.0f}")
    ratio = results[1]["studies_per_min"] / results[0]["studies_per_min"]
    print(f"redis / embedded throughput: {ratio:.2f}x (goal for overhead p95: <= 150 ms)")
    print(json.dumps({"pipeline": results}))
    if not args.no_pixel:
        print("\n# pixel path (bench/pixel.py)")
        subprocess.run([sys.executable, str(REPO / "bench" / "pixel.py")], check=True)


if __name__ == "__main__":
    main()
