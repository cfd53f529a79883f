"""Load and faults against a whole node: real peers, a set time, figures at the end.

    .venv/bin/python bench/soak.py --minutes 10           # load + a fault every ~90 s
    .venv/bin/python bench/soak.py --minutes 3 --studies 50 --no-load
    .venv/bin/python bench/soak.py --minutes 10 --faults none   # load only: RSS growth

What runs: PostgreSQL, a Redis of its own (so it can be killed and restarted empty), Orthanc
as the PACS that receives the drafts, and `cxrnode serve` with its workers and a tiny model,
all with default settings except a one-second quiet period and short answers. Studies (one
chest image each) go in from sender threads, each its own pynetdicom association; a load
phase keeps ``--associations`` associations open at once. Faults, one at a time, spread over
the run: kill -9 of the whole node (then restarted), of the inference worker, of the
node-side worker, Redis killed and restarted empty, the destination stopped for 15 s.

Printed: instances/s, p95 C-STORE latency, refusals by reason, RSS at start and end of each
node process (by role and pid) and its growth, the recovery time after each fault (from the
fault until every job open at that moment is done with its drafts delivered, and a draft
made after the fault is delivered), and the end check: every study has exactly
one SR and one SC at the destination, and the database agrees (lost, duplicate, repeated).
``tests/faults`` runs a short version of the same code.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "e2e")]

import dicomgen  # noqa: E402
from orthanc_server import Orthanc  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from pynetdicom import AE, evt  # noqa: E402
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # noqa: E402
from services import (  # noqa: E402
    BIN,
    Node,
    free_port,
    fresh_database,
    node_env,
    port_open,
    postgres_server,
    wait_for,
)
from sqlalchemy import create_engine, text  # noqa: E402

from cxrnode.net.requestor import associate  # noqa: E402

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
FAULTS = ("node", "infer-worker", "node-worker", "redis-empty", "destination")


# ------------------------------------------------------------------------------- peers


@dataclass
class Redis:
    """A redis-server we may kill; restarted on the same port, empty (no persistence)."""

    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Redis:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(lambda: port_open(self.port), 10, "redis-server")
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)


def process_rss(node: Node) -> dict[str, int]:
    """RSS in bytes of each process of the node's group, by role and pid (a restarted
    process is a new entry)."""
    assert node.proc is not None
    out: dict[str, int] = {}
    pgid = os.getpgid(node.proc.pid)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            status = (entry / "status").read_text()
        except (OSError, ProcessLookupError):
            continue
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        if not match:
            continue
        if "redis-server" in cmd:
            role = "redis"
        elif "-m worker --queues" in cmd:
            role = "worker-" + cmd.split("--queues", 1)[1].split()[0]
        elif cmd.startswith("[celeryd: "):  # Celery's title: [celeryd: <queues>-<pid>@<host>...
            role = "worker-" + cmd.removeprefix("[celeryd: ").split("@", 1)[0].rsplit("-", 1)[0]
        elif cmd.startswith("cxrnode: listener") or cmd.startswith("cxrnode: web"):
            role = cmd.split()[1]  # the title a spawned child gives itself (cxrnode.process)
        elif "multiprocessing" in cmd:
            role = "child"  # spawned, before it titles itself
        elif " serve" in cmd:
            role = "serve"
        else:
            continue
        out[f"{role} [{entry.name}]"] = int(match.group(1)) * 1024
    return out


def worker_pids(node: Node, queues: str) -> list[int]:
    assert node.proc is not None
    found = []  # by command line before the worker titles itself, by Celery's title after
    for pattern in (f"-m worker --queues {queues}", rf"^\[celeryd: {queues}-[0-9]+@"):
        found += subprocess.run(
            ["pgrep", "-f", "--", pattern], capture_output=True, text=True
        ).stdout.split()
    pgid = os.getpgid(node.proc.pid)
    pids = []
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(int(pid)) == pgid:
                pids.append(int(pid))
    return pids


# ------------------------------------------------------------------------------- senders


@dataclass
class Traffic:
    latencies: list[float] = field(default_factory=list)
    refusals: Counter = field(default_factory=Counter)
    sent: list[str] = field(default_factory=list)  # study UIDs acknowledged
    lock: threading.Lock = field(default_factory=threading.Lock)


def send_one(port: int, path: Path, traffic: Traffic, hold: float = 0.0) -> bool:
    """One association, one C-STORE (kept open ``hold`` seconds more); True when stored."""
    ae = AE(ae_title="SOAK")
    ae.add_requested_context(ComputedRadiographyImageStorage, ["1.2.840.10008.1.2.1"])
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 30
    opened = threading.Event()
    asked = time.monotonic()
    assoc = associate(
        ae,
        "127.0.0.1",
        port,
        ae_title="CXRNODE",
        evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: opened.set())],
    )
    if not assoc.is_established:
        if assoc.is_rejected:
            p = assoc.acceptor.primitive
            reason = f"rejected {p.result}/{p.result_source}/{p.diagnostic}"
        elif not opened.is_set():
            reason = "no connection (node down?)"
        elif time.monotonic() - asked >= ae.acse_timeout:
            reason = "no answer to the association request"
        else:
            reason = "connection closed without an answer"
        with traffic.lock:
            traffic.refusals[reason] += 1
        return False
    try:
        started = time.monotonic()
        try:
            status = assoc.send_c_store(path)
        except Exception as exc:  # the node killed under us
            with traffic.lock:
                traffic.refusals[f"send failed: {type(exc).__name__}"] += 1
            return False
        elapsed = time.monotonic() - started
        code = int(status.Status) if status else -1
        with traffic.lock:
            if code == 0:
                traffic.latencies.append(elapsed)
            else:
                traffic.refusals[f"status {code:#06x}" if code >= 0 else "no response"] += 1
        if hold:
            time.sleep(hold)
        return code == 0
    finally:
        if assoc.is_established:
            assoc.release()


def study_file(directory: Path, index: int) -> tuple[str, Path]:
    study = generate_uid()
    path = dicomgen.make_chest(
        directory / f"study{index:05}.dcm", study_uid=study, modality="CR", seed=index % 97
    )
    return study, path


# --------------------------------------------------------------------------------- run


@dataclass
class Soak:
    workdir: Path
    minutes: float
    studies: int
    associations: int = 16
    cap: int = 16
    load: bool = True
    faults: tuple[str, ...] = FAULTS
    settings: dict[str, str] = field(default_factory=dict)
    model_dir: Path | None = None
    log: Any = print
    traffic: Traffic = field(default_factory=Traffic)
    recoveries: dict[str, float | None] = field(default_factory=dict)
    rss_start: dict[str, int] = field(default_factory=dict)
    rss_end: dict[str, int] = field(default_factory=dict)
    rss_warm: dict[str, int] = field(default_factory=dict)  # a minute in: caches filled
    warmup_seconds: float = 60.0

    def run(self) -> dict[str, Any]:
        with postgres_server() as admin, fresh_database(admin) as database:
            return self._run(database)

    def _run(self, database: str) -> dict[str, Any]:
        model = self.model_dir or self.workdir / "tiny-model"
        if not (model / "config.json").is_file():
            subprocess.run(
                [str(BIN / "cxrnode"), "model", "make-tiny", str(model)], check=True, timeout=600
            )
        redis = Redis().start()
        orthanc = Orthanc(self.workdir / "orthanc")
        settings = {
            "database_url": database,
            "broker_url": redis.url,
            "model": str(model),
            "destinations": orthanc.destination,
            "max_associations": str(self.cap),
            "settle_seconds": "1",
            "temperature": "0",
            "max_new_tokens": "8",
            **self.settings,
        }
        data_dir = self.workdir / "node"
        node = Node(data_dir, node_env(data_dir, **settings))
        orthanc.node_port, orthanc.node_aet = node.port, node.ae_title
        orthanc.start()
        node.start()
        self.engine = create_engine(database)
        try:
            return self._drive(node, redis, orthanc)
        finally:
            node.stop()
            orthanc.stop()
            redis.kill()
            self.engine.dispose()

    def _open_jobs(self) -> set[int]:
        """Jobs not finished, or whose drafts are not all delivered yet."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT id FROM jobs WHERE state NOT IN ('done', 'failed', 'superseded') "
                    "UNION SELECT job_id FROM outputs WHERE state IN ('pending', 'in_flight')"
                )
            )
            return {row[0] for row in rows}

    def _recovered(self, in_flight: set[int], moment: float) -> bool:
        """Every job open at the fault is finished and delivered, and some draft was delivered
        after the fault (the pipeline moves again; when every study was drafted before the
        fault, that delivery is one the fault held back)."""
        if in_flight & self._open_jobs():
            return False
        with self.engine.connect() as conn:
            count = conn.execute(
                text(
                    "SELECT count(*) FROM outputs WHERE state = 'delivered' "
                    "AND updated_at > to_timestamp(:t) AT TIME ZONE 'UTC'"
                ),
                {"t": moment},
            ).scalar()
        return bool(count)

    def _inject(self, fault: str, node: Node, redis: Redis, orthanc: Orthanc) -> None:
        self.log(f"  fault: {fault}")
        if fault == "infer-worker":
            for pid in worker_pids(node, "infer"):
                os.kill(pid, signal.SIGKILL)
        elif fault == "node-worker":
            for pid in worker_pids(node, "prepare,outputs,send"):
                os.kill(pid, signal.SIGKILL)
        elif fault == "redis-empty":
            redis.kill()
            time.sleep(1)
            redis.start()
        elif fault == "destination":
            orthanc.stop()
            time.sleep(15)
            orthanc.start()
        elif fault == "node":
            node.kill9()
            node.start(wait=True)

    def _drive(self, node: Node, redis: Redis, orthanc: Orthanc) -> dict[str, Any]:
        files = self.workdir / "studies"
        started = time.monotonic()
        end = started + self.minutes * 60
        self.rss_start = process_rss(node)
        stop = threading.Event()
        queue = [study_file(files, i) for i in range(self.studies)]
        pending = list(queue)
        pending_lock = threading.Lock()
        # the studies arrive over the first 75 % of the run, from 4 senders: still arriving
        # when the last fault strikes, so that every fault meets work in flight
        interval = 0.75 * self.minutes * 60 / max(1, self.studies) * 4

        def sender() -> None:
            while not stop.is_set():
                with pending_lock:
                    if not pending:
                        return
                    study, path = pending.pop(0)
                if send_one(node.port, path, self.traffic):
                    with self.traffic.lock:
                        self.traffic.sent.append(study)
                else:
                    time.sleep(1)
                    with pending_lock:
                        pending.append((study, path))  # a PACS sends again what failed
                time.sleep(interval)

        load_files = [dicomgen.make_chest(files / f"load{i}.dcm", modality="CR") for i in range(4)]

        def loader() -> None:  # keeps associations open; duplicates of the same 4 instances
            while not stop.is_set() and time.monotonic() < end - 20:
                send_one(node.port, random.choice(load_files), self.traffic, hold=0.5)

        threads = [threading.Thread(target=sender, daemon=True) for _ in range(4)]
        if self.load:
            threads += [
                threading.Thread(target=loader, daemon=True) for _ in range(self.associations - 4)
            ]

        def sample_warm() -> None:
            if not stop.wait(max(0.0, started + self.warmup_seconds - time.monotonic())):
                self.rss_warm = process_rss(node)

        threads.append(threading.Thread(target=sample_warm, daemon=True))
        for thread in threads:
            thread.start()
        fault_times: list[tuple[str, float]] = []
        spacing = max(20.0, (self.minutes * 60 - 60) / max(1, len(self.faults)))
        for index, fault in enumerate(self.faults):
            moment = started + 15 + index * spacing
            while time.monotonic() < moment:
                time.sleep(0.5)
            at = time.time()
            in_flight = self._open_jobs()
            self._inject(fault, node, redis, orthanc)
            fault_times.append((fault, at))
            try:
                wait_for(
                    lambda at=at, jobs=in_flight: self._recovered(jobs, at),
                    180,
                    f"recovery from {fault}",
                    1,
                )
                self.recoveries[fault] = time.time() - at
            except TimeoutError:
                self.recoveries[fault] = None
            self.log(f"  recovered from {fault} in {self.recoveries[fault]}")
        # with load: the whole set time (memory growth is measured over it); without: until
        # every study is in
        while time.monotonic() < end and (pending or self.load):
            time.sleep(1)
        stop.set()
        for thread in threads:
            thread.join(60)
        self.rss_end = process_rss(node)
        elapsed = time.monotonic() - started
        result = self._check(node, orthanc, queue)
        result.update(
            elapsed=elapsed,
            instances_per_s=len(self.traffic.latencies) / elapsed,
            p95_latency_s=_percentile(self.traffic.latencies, 0.95),
            refusals=dict(self.traffic.refusals),
            recoveries=dict(self.recoveries),
            rss_start=self.rss_start,
            rss_warm=self.rss_warm,
            rss_end=self.rss_end,
        )
        return result

    def _check(self, node: Node, orthanc: Orthanc, queue: list[tuple[str, Path]]) -> dict:
        """Wait for every study's drafts; then count what the PACS and the database hold."""
        studies = [study for study, _ in queue]

        def drafts() -> dict[str, dict[str, set[str]]]:
            found: dict[str, dict[str, set[str]]] = {}
            for study in studies:
                classes: dict[str, set[str]] = {SR_CLASS: set(), SC_CLASS: set()}
                for instance in orthanc.instances_of_study(study):
                    tags = instance["Tags"]
                    if tags.get("SOPClassUID") in classes:
                        classes[tags["SOPClassUID"]].add(tags["SOPInstanceUID"])
                found[study] = classes
            return found

        def complete() -> dict | None:
            got = drafts()
            return got if all(v[SR_CLASS] and v[SC_CLASS] for v in got.values()) else None

        try:
            arrived = wait_for(complete, 300, "every study's SR and SC at the PACS", 3)
        except TimeoutError:
            arrived = drafts()
        with self.engine.connect() as conn:
            delivered = {
                row[0]
                for row in conn.execute(
                    text("SELECT sop_instance_uid FROM outputs WHERE state = 'delivered'")
                )
            }
            jobs_done = conn.execute(
                text("SELECT count(DISTINCT study_id) FROM jobs WHERE state = 'done'")
            ).scalar()
        at_pacs = {uid for v in arrived.values() for uids in v.values() for uid in uids}
        repeats = Counter(orthanc.stored_uids())
        return {
            "studies": len(studies),
            "complete": sum(
                1 for v in arrived.values() if len(v[SR_CLASS]) == len(v[SC_CLASS]) == 1
            ),
            "lost": sum(1 for v in arrived.values() if not (v[SR_CLASS] and v[SC_CLASS])),
            "duplicates": sum(
                1 for v in arrived.values() if len(v[SR_CLASS]) > 1 or len(v[SC_CLASS]) > 1
            ),
            "database_agrees": at_pacs <= delivered and jobs_done >= len(studies),
            "repeated_deliveries": sum(n - 1 for uid, n in repeats.items() if uid in at_pacs),
        }


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(result: dict[str, Any]) -> str:
    lines = [
        f"elapsed {result['elapsed']:.0f} s; instances/s {result['instances_per_s']:.2f}; "
        f"p95 C-STORE latency {result['p95_latency_s'] or 0:.3f} s",
        f"studies {result['studies']}: complete {result['complete']}, lost {result['lost']}, "
        f"duplicates {result['duplicates']}, database agrees {result['database_agrees']}, "
        f"repeated deliveries of the same UID {result['repeated_deliveries']}",
        f"refusals: {result['refusals'] or 'none'}",
        "recovery after each fault (s): "
        + ", ".join(
            f"{k} {v:.0f}" if v is not None else f"{k} NONE"
            for k, v in result["recoveries"].items()
        ),
        "RSS by process (MiB: start, a minute in, end; growth from a minute in to the end):",
    ]
    warm_all = result["rss_warm"]
    for role in sorted(set(result["rss_start"]) | set(result["rss_end"]) | set(warm_all)):
        start, end = result["rss_start"].get(role), result["rss_end"].get(role)
        warm = warm_all.get(role)
        growth = f" ({(end - warm) / warm * 100:+.1f} %)" if warm and end else ""
        lines.append(
            f"  {role:36} {(start or 0) / 2**20:7.1f} {(warm or 0) / 2**20:7.1f} "
            f"{(end or 0) / 2**20:7.1f}{growth}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--studies", type=int, default=0, help="default: 12 a minute")
    parser.add_argument("--associations", type=int, default=16)
    parser.add_argument("--cap", type=int, default=16)
    parser.add_argument("--no-load", action="store_true")
    parser.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help=f"comma-separated, in order, from {', '.join(FAULTS)}; 'none' for load only",
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cxrnode-soak"))
    args = parser.parse_args()
    faults = () if args.faults == "none" else tuple(f for f in args.faults.split(",") if f)
    unknown = set(faults) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults {sorted(unknown)}; choose from {', '.join(FAULTS)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    soak = Soak(
        args.workdir / f"run-{int(time.time())}",
        model_dir=args.workdir / "tiny-model",
        minutes=args.minutes,
        studies=args.studies or int(12 * args.minutes),
        associations=args.associations,
        cap=args.cap,
        load=not args.no_load,
        faults=faults,
    )
    soak.workdir.mkdir(parents=True)
    result = soak.run()
    print(report(result))


if __name__ == "__main__":
    main()
