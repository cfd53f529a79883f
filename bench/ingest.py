"""Ingest benchmark: C-STORE throughput of cxrnode against dcmtk ``storescp`` and Orthanc.

dcmtk ``storescu`` sends N full-size DX radiographs (2500 x 2048, 16 bits allocated, about
10.5 MB each, from ``tests/dicomgen.make_large_dx``) over loopback to each receiver in turn,
over one association (one ``storescu``) and over four (four ``storescu`` processes, each
with a quarter of the files), all in the same run:

- **cxrnode**: ``cxrnode serve --no-workers`` with a fresh data directory and SQLite
  database, the settle period set to an hour so study grouping stays out of the way;
- **cxrnode+workers**: ``cxrnode serve`` with its workers (embedded defaults, the tiny test
  checkpoint as its model, ``--model none`` for none) and a settle period of one second, sent
  to once ``/readyz`` says the workers are up and the model is loaded (a node at work, not one
  still starting): every study settles during the burst, and whatever background work the
  node lets run then (prepare, inference, outputs) competes with the listeners for the cores.
  Its ratio to **cxrnode** (same run) is what receive-first promises to keep near 1;
- **storescp**: dcmtk ``storescp`` (plain for one association, ``--fork`` for four);
- **orthanc**: the Debian ``Orthanc`` binary with a generated configuration (own storage and
  index directory, no plugins, ``MaximumPduLength`` 131072).

Every receiver gets a fresh storage directory for every run (so no run sees duplicates), is
stopped after it, and the page cache is synced before the next run (so one receiver's
unwritten pages do not slow down the next). Every sender uses ``--max-send-pdu`` with the
largest PDU dcmtk allows (131072 bytes) and every receiver accepts that size. After each run
the benchmark checks that the receiver holds all N instances.

Time is ``storescu`` wall clock, from starting the senders to the last one exiting; MB/s is
over the bytes of the files sent (1 MB = 10**6 bytes). Medians over ``--repeat`` runs, the
runs of the receivers interleaved so a busy moment of the machine hits all of them.

Durability differs, and the table says how: ``storescp`` acknowledges once the file is
written to the page cache (no fsync); Orthanc fsyncs the file (``SyncStorageArea``, default
true since 1.7.4) and commits its SQLite index in WAL mode with synchronous=NORMAL (its
binary's pragma: the last commits can be lost on power failure, not on a crash); cxrnode fsyncs the file and its directory and
commits the instance row (SQLite WAL, synchronous=FULL) before it answers success.

The physical ceiling is measured in the same run: the same files' bytes written by a plain
loop (open, write, fsync, close; one file after the other) with as many writers as there are
associations, into a fresh directory on the same file system. cxrnode's figure divided by it
is the share of the disk's durable-write rate that the node achieves.

Run: ``.venv/bin/python bench/ingest.py [--n 200] [--associations 1 4] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/model.py would shadow the model package (the tiny checkpoint for cxrnode+workers)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import dicomgen  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from cxrnode.settings import Settings  # noqa: E402

BIN = Path(sys.executable).parent
PDU = 131072  # the largest PDU dcmtk sends or accepts
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
PEERS = ("cxrnode", "cxrnode+workers", "storescp", "orthanc")
CEILING = "fsync loop"
DURABILITY = {
    "cxrnode": "fsync file + directory, SQLite row committed (WAL, synchronous=FULL)",
    "cxrnode+workers": "as cxrnode, with prepare, inference and outputs running meanwhile",
    "storescp": "no fsync: acknowledged once in the page cache",
    "orthanc": "fsync file (SyncStorageArea); SQLite index WAL, synchronous=NORMAL (no fsync at commit)",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def echo_ok(port: int, aet: str) -> bool:
    answer = subprocess.run(
        ["/usr/bin/echoscu", "-to", "2", "-aec", aet, "127.0.0.1", str(port)],
        capture_output=True,
        timeout=30,
    )
    return answer.returncode == 0


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not answer within {timeout:.0f} s")


def stop(proc: subprocess.Popen, group: bool = False) -> None:
    """SIGTERM (the whole process group for forking servers), then SIGKILL after 20 s."""
    if proc.poll() is not None:
        return
    if group:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
    else:
        proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait(10)


@dataclass
class Receiver:
    """A running receiver: where to send, and how to count what it stored."""

    aet: str
    port: int
    count: Callable[[], int]


# ------------------------------------------------------------------------------- receivers


#: The checkpoint ``cxrnode+workers`` serves (set by main: ``--model``).
MODEL: dict[str, str | None] = {"path": None}


@contextlib.contextmanager
def cxrnode(work: Path, associations: int, processes: int | None) -> Iterator[Receiver]:
    with _cxrnode(work, processes, workers=False) as receiver:
        yield receiver


@contextlib.contextmanager
def cxrnode_with_workers(
    work: Path, associations: int, processes: int | None
) -> Iterator[Receiver]:
    with _cxrnode(work, processes, workers=True) as receiver:
        yield receiver


@contextlib.contextmanager
def _cxrnode(work: Path, processes: int | None, workers: bool) -> Iterator[Receiver]:
    data = work / "cxrnode"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXRNODE_")}
    http_port = free_port()
    env.update(
        CXRNODE_DATA_DIR=str(data),
        CXRNODE_DICOM_PORT=str(port),
        CXRNODE_HTTP_PORT=str(http_port),
        CXRNODE_SETTLE_SECONDS="1" if workers else "3600",
        CXRNODE_MIN_FREE_DISK_MB="256",
        CXRNODE_LOG_LEVEL="WARNING",
        PATH=f"{BIN}:{env.get('PATH', '')}",
    )
    if processes:
        env["CXRNODE_SCP_PROCESSES"] = str(processes)
    if workers and MODEL["path"]:
        env["CXRNODE_MODEL"] = MODEL["path"]
    data.mkdir(parents=True)
    with (work / "cxrnode.log").open("ab") as log:
        proc = subprocess.Popen(
            [str(BIN / "cxrnode"), "serve", "--workers" if workers else "--no-workers"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(
            lambda: _alive(proc, work / "cxrnode.log") and echo_ok(port, "CXRNODE"), 60, "cxrnode"
        )
        if workers:  # a node at work: its workers up and its model loaded, not still starting
            wait_until(
                lambda: _alive(proc, work / "cxrnode.log") and _ready(http_port, MODEL["path"]),
                180,
                "cxrnode's workers (and model) to be ready",
            )

        def count() -> int:
            with contextlib.closing(sqlite3.connect(data / "cxrnode.db")) as db:
                rows = db.execute("SELECT count(*) FROM instances").fetchone()[0]
            files = sum(1 for _ in (data / "instances").rglob("*.dcm"))
            return min(rows, files)

        yield Receiver("CXRNODE", port, count)
    finally:
        stop(proc, group=True)


def _ready(http_port: int, model: str | None) -> bool:
    """``/readyz``: every check passes, or without a model every check but the model's."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=5) as answer:
            return answer.status == 200
    except urllib.error.HTTPError as refused:  # 503: which checks fail is in the body
        checks = json.loads(refused.read() or b"{}").get("checks", {})
        failing = {name for name, check in checks.items() if not check.get("ok")}
        return model is None and failing == {"model"}
    except OSError:
        return False


@contextlib.contextmanager
def storescp(work: Path, associations: int, processes: int | None) -> Iterator[Receiver]:
    out = work / "storescp"
    out.mkdir(parents=True)
    port = free_port()
    fork = ["--fork"] if associations > 1 else []
    with (work / "storescp.log").open("ab") as log:
        proc = subprocess.Popen(
            [
                "/usr/bin/storescp",
                *fork,
                "-aet",
                "STORESCP",
                "-pdu",
                str(PDU),
                "-od",
                str(out),
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(
            lambda: _alive(proc, work / "storescp.log") and echo_ok(port, "STORESCP"),
            30,
            "/usr/bin/storescp",
        )
        yield Receiver("STORESCP", port, lambda: sum(1 for p in out.rglob("*") if p.is_file()))
    finally:
        stop(proc, group=True)


@contextlib.contextmanager
def orthanc(work: Path, associations: int, processes: int | None) -> Iterator[Receiver]:
    root = work / "orthanc"
    root.mkdir(parents=True)
    port, http = free_port(), free_port()
    config = {
        "Name": "cxrnode-bench",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "Plugins": [],
        "DicomAet": "ORTHANC",
        "DicomPort": port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "MaximumPduLength": PDU,
        "HttpPort": http,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "StorageCompression": False,
        "SyncStorageArea": True,  # the 1.10 default, stated so the table's note stays true
        "OverwriteInstances": False,
        "StableAge": 3600,
        "SaveJobs": False,
    }
    (root / "orthanc.json").write_text(json.dumps(config, indent=2))
    with (work / "orthanc.log").open("ab") as log:
        proc = subprocess.Popen(
            ["Orthanc", str(root / "orthanc.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(
            lambda: _alive(proc, work / "orthanc.log") and echo_ok(port, "ORTHANC"), 60, "Orthanc"
        )

        def count() -> int:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/statistics", timeout=30) as r:
                return int(json.load(r)["CountInstances"])

        yield Receiver("ORTHANC", port, count)
    finally:
        stop(proc, group=True)


RECEIVERS = {
    "cxrnode": cxrnode,
    "cxrnode+workers": cxrnode_with_workers,
    "storescp": storescp,
    "orthanc": orthanc,
}


def _alive(proc: subprocess.Popen, log: Path) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"receiver exited with {proc.returncode}; its log:\n{log.read_text()}")
    return True


# ---------------------------------------------------------------------------------- sending


def make_files(directory: Path, n: int) -> list[Path]:
    """N large DX files, two instances per study (a PA and its repeat, say)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    study = ""
    for index in range(n):
        if index % 2 == 0:
            study = generate_uid()
        files.append(
            dicomgen.make_large_dx(directory / f"{index:04}.dcm", modality="DX", study_uid=study)
        )
    return files


def send(receiver: Receiver, groups: list[list[Path]], log: Path) -> float:
    """Run one storescu per group at once; return the wall-clock seconds until all exit."""
    procs = []
    with log.open("ab") as out:
        start = time.perf_counter()
        for group in groups:
            procs.append(
                subprocess.Popen(
                    [
                        "/usr/bin/storescu",
                        "-aet",
                        "BENCHSCU",
                        "-aec",
                        receiver.aet,
                        "-R",  # propose only the SOP class the files need
                        "--max-send-pdu",
                        str(PDU),
                        "-pdu",
                        str(PDU),
                        "127.0.0.1",
                        str(receiver.port),
                        *map(str, group),
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
        codes = [proc.wait() for proc in procs]
        elapsed = time.perf_counter() - start
    if any(codes):
        raise RuntimeError(f"storescu exited with {codes}; see {log}")
    return elapsed


def split(files: list[Path], parts: int) -> list[list[Path]]:
    return [files[index::parts] for index in range(parts)]


def run_once(
    peer: str, files: list[Path], associations: int, work: Path, processes: int | None
) -> float:
    """Start a fresh receiver, send everything, check it was all stored; return MB/s."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{peer}-", dir=work))
    try:
        with RECEIVERS[peer](run_dir, associations, processes) as receiver:
            seconds = send(receiver, split(files, associations), run_dir / "storescu.log")
            stored = receiver.count()
            if stored != len(files):
                raise RuntimeError(
                    f"{peer} holds {stored} of {len(files)} instances after the run; "
                    f"logs in {run_dir}"
                )
        total = sum(path.stat().st_size for path in files)
        return total / seconds / 1e6
    finally:
        os.sync()  # flush what this receiver left dirty before the next one is timed
        shutil.rmtree(run_dir, ignore_errors=True)
        os.sync()


def fsync_ceiling(files: list[Path], writers: int, work: Path) -> float:
    """MB/s of writing the files' bytes durably with ``writers`` threads (the disk's ceiling)."""
    import threading

    out = Path(tempfile.mkdtemp(prefix="ceiling-", dir=work))
    payloads = [path.read_bytes() for path in files]

    def write(indices: list[int]) -> None:
        for index in indices:
            fd = os.open(out / f"{index:05}.dcm", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(payloads[index])
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)

    try:
        threads = [
            threading.Thread(target=write, args=(list(range(w, len(files), writers)),))
            for w in range(writers)
        ]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - start
        return sum(len(p) for p in payloads) / seconds / 1e6
    finally:
        os.sync()
        shutil.rmtree(out, ignore_errors=True)
        os.sync()


# ----------------------------------------------------------------------------------- report


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def report(results: dict[tuple[str, int], list[float]], associations: list[int]) -> str:
    lines = [
        f"{'receiver':<16} {'assoc':>5} {'MB/s (median)':>14} {'runs':<28} "
        f"{'vs storescp':>11} {'vs orthanc':>10} {'vs ceiling':>10} {'vs cxrnode':>10}",
    ]
    for count in associations:
        medians = {
            peer: statistics.median(results[(peer, count)])
            for peer in (*PEERS, CEILING)
            if results.get((peer, count))
        }
        for peer, value in medians.items():
            runs = ", ".join(f"{v:.0f}" for v in results[(peer, count)])
            lines.append(
                f"{peer:<16} {count:>5} {value:>14.0f} {runs:<28} "
                f"{ratio(value, medians.get('storescp')):>11} "
                f"{ratio(value, medians.get('orthanc')):>10} "
                f"{ratio(value, medians.get(CEILING)):>10} "
                f"{ratio(value, medians.get('cxrnode')):>10}"
            )
    lines.append("")
    lines.append("durability when success is answered:")
    for peer in PEERS:
        lines.append(f"  {peer:<16} {DURABILITY[peer]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="instances per run")
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    parser.add_argument(
        "--scp-processes",
        type=int,
        default=None,
        help="cxrnode listener processes (default: the node's own default)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where to put the files")
    parser.add_argument(
        "--model",
        choices=("tiny", "none"),
        default="tiny",
        help="cxrnode+workers: serve the tiny test checkpoint, or no model (jobs then wait)",
    )
    args = parser.parse_args()
    for tool in ("/usr/bin/storescu", "storescp", "echoscu", "Orthanc"):
        if shutil.which(tool) is None and (tool != "Orthanc" or "orthanc" in args.peers):
            sys.exit(f"{tool} is not on PATH: install dcmtk and orthanc (Debian packages)")

    work = Path(tempfile.mkdtemp(prefix="cxrnode-bench-ingest-", dir=args.workdir))
    try:
        started = time.perf_counter()
        files = make_files(work / "send", args.n)
        if "cxrnode+workers" in args.peers and args.model == "tiny":
            from model.tiny import make_tiny_checkpoint

            MODEL["path"] = str(make_tiny_checkpoint(work / "tiny"))
        size = sum(path.stat().st_size for path in files)
        # the node's default (the environment is not passed to the node, see cxrnode())
        processes = args.scp_processes or Settings.model_construct().effective_scp_processes
        print(
            f"{args.n} DX files, {size / 1e6:.0f} MB ({size / args.n / 1e6:.1f} MB each), "
            f"written in {time.perf_counter() - started:.0f} s; PDU {PDU} bytes; "
            f"{os.cpu_count()} CPUs; cxrnode listener processes: {processes}",
            flush=True,
        )
        results: dict[tuple[str, int], list[float]] = {}
        for repeat in range(args.repeat):
            for count in args.associations:
                for peer in args.peers:
                    value = run_once(peer, files, count, work, args.scp_processes)
                    results.setdefault((peer, count), []).append(value)
                    print(
                        f"  run {repeat + 1}: {peer:<15} {count} assoc {value:7.1f} MB/s",
                        flush=True,
                    )
                value = fsync_ceiling(files, count, work)
                results.setdefault((CEILING, count), []).append(value)
                print(
                    f"  run {repeat + 1}: {CEILING} {count} writers {value:7.1f} MB/s", flush=True
                )
        print()
        print(report(results, args.associations))
        summary = {f"{peer}/{count}": statistics.median(v) for (peer, count), v in results.items()}
        print(json.dumps({"ingest_mb_s": summary}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
