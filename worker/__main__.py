"""``python -m worker --queues infer [--concurrency N] [--gpus all|0,1,...]``: run cxrnode's
Celery worker.

``cxrnode worker`` execs this after checking its options, so that the node's package never
imports the worker's (which imports the model and torch).

With ``--gpus``, this process starts one worker process per GPU instead of working itself,
each with ``CUDA_VISIBLE_DEVICES`` set to its GPU (so the engine inside sees it as ``cuda:0``
and batches on its own), restarts one that exits unexpectedly, and stops them all on SIGTERM.
It never imports torch (CUDA initialised in a parent is unusable in its children).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading

from cxrnode.logs import setup_logging
from cxrnode.settings import get_settings
from model.devices import parse_visible_devices, visible_gpus


def gpu_list(value: str) -> list[int]:
    """``all`` (every GPU this process may use) or a comma-separated list of indices."""
    gpus = visible_gpus() if value == "all" else parse_visible_devices(value)
    if not gpus:
        raise SystemExit(
            f"--gpus {value}: no GPU found (CUDA_VISIBLE_DEVICES, nvidia-smi -L); run without "
            "--gpus to use the CPU or the default device"
        )
    return gpus


def run_per_gpu(queues: str, concurrency: int, gpus: list[int]) -> int:
    """Supervise one worker process per GPU until SIGTERM/SIGINT."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def start(gpu: int) -> subprocess.Popen:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
        command = [sys.executable, "-m", "worker", "--queues", queues]
        return subprocess.Popen([*command, "--concurrency", str(concurrency)], env=env)

    children = {gpu: start(gpu) for gpu in gpus}
    print(f"worker: one inference process per GPU {gpus}", file=sys.stderr, flush=True)
    while not stop.wait(2.0):
        for gpu, child in list(children.items()):
            if child.poll() is not None:
                print(
                    f"worker: GPU {gpu} process exited with {child.returncode}; restarting",
                    file=sys.stderr,
                    flush=True,
                )
                children[gpu] = start(gpu)
    for child in children.values():
        child.terminate()
    for child in children.values():
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--queues", required=True, help="comma-separated queue names")
    parser.add_argument("--concurrency", type=int, required=True, help="worker threads")
    parser.add_argument("--gpus", help="all, or GPU indices: one worker process per GPU")
    args = parser.parse_args()
    settings = get_settings()
    setup_logging(settings.log_level)
    if args.gpus:
        sys.exit(run_per_gpu(args.queues, args.concurrency, gpu_list(args.gpus)))
    from worker.app import run_worker

    sys.exit(
        run_worker([q for q in args.queues.split(",") if q], args.concurrency, settings.log_level)
    )


if __name__ == "__main__":
    main()
