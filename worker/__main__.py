"""``python -m worker --queues infer [--concurrency N]``: run a Celery worker of cxrnode.

``cxrnode worker`` execs this after checking its options, so that the node's package never
imports the worker's (which imports the model and torch).
"""

from __future__ import annotations

import argparse

from cxrnode.logs import setup_logging
from cxrnode.settings import get_settings
from worker.app import run_worker


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--queues", required=True, help="comma-separated queue names")
    parser.add_argument("--concurrency", type=int, required=True, help="worker threads")
    args = parser.parse_args()
    settings = get_settings()
    setup_logging(settings.log_level)
    run_worker([q for q in args.queues.split(",") if q], args.concurrency, settings.log_level)


if __name__ == "__main__":
    main()
