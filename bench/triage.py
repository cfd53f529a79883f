"""Triage and self-consistency benchmark: how fast an urgent draft is announced, and what k
samples cost.

    .venv/bin/python bench/triage.py [--studies 40] [--node-studies 20] [--k 5]

1. **Urgent path, model time excluded.** For each of ``--studies`` studies a stored image and
   an inferred job with a known urgent result (pneumothorax present; the tiny model writes
   random text, so the finding is given, as the triage tests do) are recorded; the clock
   starts when the result is recorded (the moment the model's time ends) and stops when a real
   HTTP receiver has the signed webhook call: triage, the SR, SC and ORU built and written,
   the rows, the urgent entry and the notification committed, the announcement sent
   (``build_outputs`` + ``notify.send_due``, what the outputs worker does). Run on SQLite (the
   embedded mode's database) and on PostgreSQL (the distributed mode's), one study at a time;
   p50 / p95 / max. Not included: the quiet period (SETTLE_SECONDS, a site setting), the
   prepare step and the broker hops before the model (bench/pipeline.py measures those).
2. **Urgent path through a real node**, embedded and Redis + PostgreSQL (``cxrnode serve``
   with its workers, the tiny checkpoint sampled at T = 1, studies sent with storescu one at
   a time, ``--node-studies``). The tiny model's text is random, so the bench ranks every
   finding stat (a site may rank any finding) and measures the drafts that came out urgent:
   webhook received minus the last image's arrival, less the model's own time and the quiet
   period (SETTLE_SECONDS = 1 s, a site setting); p50 / p95 / max.
3. **k samples vs 1.** The same study drafted with k = 1 and k = ``--k`` on the tiny model,
   or on ``--consensus-model DIR`` (e.g. full width with 2 decoder layers, bf16) (CPU,
   sampled at T = 0.2, ``--consensus-tokens`` new tokens per answer, all three turns), in
   alternating warmed blocks of one run; best and median of each; the ratio is what
   self-consistency costs in wall time (goal <= 2x). ``--consensus-only`` runs only this.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "hl7")]

import dicomgen  # noqa: E402
import pydicom  # noqa: E402
from loop_helpers import inferred_job_from_file, model_result  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from services import fresh_database, postgres_server  # noqa: E402

from cxrnode import notify  # noqa: E402
from cxrnode.db import (  # noqa: E402
    Instance,
    Job,
    Study,
    make_engine,
    make_sessionmaker,
)
from cxrnode.db.migrate import upgrade  # noqa: E402
from cxrnode.outputs.build import build_outputs  # noqa: E402
from cxrnode.settings import Settings  # noqa: E402


class Receiver:
    """A webhook receiver that notes when each call arrived."""

    def __init__(self) -> None:
        arrivals: list[float] = []
        bodies: dict[str, float] = {}  # study UID -> wall-clock arrival of its announcement

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                arrivals.append(time.perf_counter())
                bodies[json.loads(body)["study_instance_uid"]] = time.time()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.arrivals = arrivals
        self.bodies = bodies
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def p95(values: list[float]) -> float:
    """The 95th percentile by nearest rank (the largest value when there are fewer than 20)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def record_inferred(settings: Settings, sessions: Any, source: Path) -> int:
    """A stored image (``source`` as a new study) and an inferred job with a known urgent
    result; returns the job id."""
    study = pydicom.dcmread(source)
    study.StudyInstanceUID, study.SOPInstanceUID = generate_uid(), generate_uid()
    study.file_meta.MediaStorageSOPInstanceUID = study.SOPInstanceUID
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "study.dcm"
        study.save_as(copy)
        result = model_result({"pneumothorax": "present"})
        return inferred_job_from_file(settings, sessions, copy, result, calling_aet="BENCH")


def urgent_path(url: str, data_dir: Path, studies: int) -> dict[str, float]:
    engine = make_engine(url)
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    receiver = Receiver()
    settings = Settings(
        data_dir=data_dir,
        database_url=url,
        webhook_urls=[receiver.url],
        webhook_secret="bench-secret",
        destinations=["PACS@127.0.0.1:9"],  # rows recorded (not sent here)
    )
    source = dicomgen.make_chest(data_dir / "source.dcm", rows=512, cols=512)
    seconds = []
    try:
        for _ in range(studies):
            job_id = record_inferred(settings, sessions, source)
            started = time.perf_counter()  # the model's answer is recorded: model time ends
            with sessions() as session:
                build_outputs(session, settings, job_id)
            notify.send_due(sessions, settings)
            seconds.append(receiver.arrivals[-1] - started)
    finally:
        receiver.close()
        engine.dispose()
    seconds.sort()
    return {
        "studies": studies,
        "p50_s": round(statistics.median(seconds), 4),
        "p95_s": round(p95(seconds), 4),
        "max_s": round(seconds[-1], 4),
    }


#: A table that the tiny model's random text hits now and then (a site may rank any finding).
BENCH_TABLE = ",".join(
    f"{name}=stat"
    for name in (
        "atelectasis", "cardiomegaly", "consolidation", "edema", "pleural_effusion",
        "pneumothorax", "pneumonia", "lung_opacity",
    )
)  # fmt: skip


def node_mode(name: str, settings: dict[str, str], model: Path, work: Path, n: int) -> dict:
    """A real node (``cxrnode serve``): each study sent with storescu, one at a time; for each
    draft that triage made urgent, the webhook's arrival minus the last image's arrival, less
    the model's own time and the quiet period (SETTLE_SECONDS, a site setting)."""
    from services import Node, node_env
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import Session

    from cxrnode.db import UrgentDraft

    receiver = Receiver()
    data = work / name
    settle = 1.0
    env = node_env(
        data,
        model=str(model),
        temperature="1.0",
        max_new_tokens="48",
        settle_seconds=str(settle),
        triage_priorities=BENCH_TABLE,
        webhook_urls=receiver.url,
        **settings,
    )
    node = Node(data, env).start()
    database = settings.get("database_url") or f"sqlite:///{data / 'cxrnode.db'}"
    engine = create_engine(database)
    lags: list[float] = []
    drafts = 0
    try:
        for i in range(n):
            path = dicomgen.make_chest(work / f"{name}-{i}.dcm", rows=512, cols=512, seed=i)
            done = subprocess.run(
                [
                    "/usr/bin/storescu",
                    "-aec",
                    node.ae_title,
                    "127.0.0.1",
                    str(node.port),
                    str(path),
                ],
                capture_output=True,
            )
            if done.returncode != 0:
                raise RuntimeError(done.stderr.decode())
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                with Session(engine) as session:
                    row = session.execute(
                        select(Job.state, Job.result, UrgentDraft.id)
                        .join(Study, Study.id == Job.study_id)
                        .outerjoin(UrgentDraft, UrgentDraft.job_id == Job.id)
                        .where(Study.study_instance_uid == uid)
                    ).first()
                    arrived = session.scalar(
                        select(Instance.received_at).where(Instance.study_instance_uid == uid)
                    )
                if (
                    row is not None
                    and row[0] == "done"
                    and (row[2] is None or uid in receiver.bodies)
                ):
                    break
                time.sleep(0.05)
            else:
                raise TimeoutError(f"study {i} not done (or not announced) in 300 s")
            drafts += 1
            if row[2] is not None:
                model_s = float(row[1]["timings"].get("total", 0.0))
                arrival = arrived.replace(tzinfo=UTC).timestamp()
                lags.append(receiver.bodies[uid] - arrival - model_s - settle)
    finally:
        node.stop()
        engine.dispose()
        receiver.close()
    lags.sort()
    return {
        "drafts": drafts,
        "urgent": len(lags),
        "p50_s": round(statistics.median(lags), 3) if lags else None,
        "p95_s": round(p95(lags), 3) if lags else None,
        "max_s": round(lags[-1], 3) if lags else None,
    }


def consensus_cost(
    k: int, model_dir: Path | None = None, repeats: int = 5, tokens: int = 48
) -> dict[str, Any]:
    """k samples against 1 for one study, in alternating warmed blocks of the same run.

    ``model_dir`` takes any checkpoint (loaded in bf16 on the CPU), e.g. one made with
    ``cxrnode model make-random DIR --size full --layers 2``: the real widths, where a decode
    step reads the weights once for the whole batch, as on the full model.
    """
    import numpy as np
    import torch

    from model.pipeline import ReportEngine
    from model.tiny import make_tiny_checkpoint

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        if model_dir is None:
            engine = ReportEngine.load(
                make_tiny_checkpoint(Path(tmp) / "tiny", seed=0), device="cpu"
            )
        else:
            engine = ReportEngine.load(model_dir, device="cpu", dtype="bfloat16")
        image = np.random.default_rng(0).integers(0, 256, (600, 560), dtype=np.uint8)
        options = {"temperature": 0.2, "max_new_tokens": tokens, "ignore_eos": True, "seed": 1}
        times: dict[int, list[float]] = {1: [], k: []}
        for samples in (1, k, 1, k):  # each block: a warm-up (the scheduler is made), then timed
            engine.generate([image], samples=samples, **options)
            for _ in range(repeats):
                t0 = time.perf_counter()
                engine.generate([image], samples=samples, **options)
                times[samples].append(time.perf_counter() - t0)
    best = {n: min(t) for n, t in times.items()}
    median = {n: statistics.median(t) for n, t in times.items()}
    return {
        "k": k,
        "model": "tiny" if model_dir is None else str(model_dir),
        "new_tokens_per_answer": tokens,
        "k1_best_s": round(best[1], 3),
        f"k{k}_best_s": round(best[k], 3),
        "ratio_best": round(best[k] / best[1], 2),
        "k1_median_s": round(median[1], 3),
        f"k{k}_median_s": round(median[k], 3),
        "ratio_median": round(median[k] / median[1], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--node-studies", type=int, default=20)
    parser.add_argument(
        "--consensus-only", action="store_true", help="only part 3 (k samples vs 1)"
    )
    parser.add_argument(
        "--consensus-model", type=Path, help="checkpoint for part 3 (default: the tiny one)"
    )
    parser.add_argument("--consensus-repeats", type=int, default=5)
    parser.add_argument("--consensus-tokens", type=int, default=48)
    args = parser.parse_args()
    out: dict[str, Any] = {}
    consensus = {
        "model_dir": args.consensus_model,
        "repeats": args.consensus_repeats,
        "tokens": args.consensus_tokens,
    }
    if args.consensus_only:
        print(json.dumps({"consensus": consensus_cost(args.k, **consensus)}, indent=2))
        return
    root = Path(tempfile.mkdtemp(prefix="cxrnode-bench-triage-"))
    try:
        out["urgent_path_sqlite"] = urgent_path(
            f"sqlite:///{root / 'node.db'}", root / "sqlite", args.studies
        )
        with postgres_server() as admin, fresh_database(admin) as url:
            out["urgent_path_postgresql"] = urgent_path(url, root / "pg", args.studies)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    from services import redis_server

    from model.tiny import make_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="cxrnode-bench-triage-") as tmp:
        work = Path(tmp)
        model = make_tiny_checkpoint(work / "tiny")
        out["node_embedded"] = node_mode("embedded", {}, model, work, args.node_studies)
        with postgres_server() as admin, redis_server() as broker, fresh_database(admin) as db:
            out["node_redis_postgresql"] = node_mode(
                "distributed",
                {"database_url": db, "broker_url": broker + "/0"},
                model,
                work,
                args.node_studies,
            )
    out["consensus"] = consensus_cost(args.k, **consensus)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
