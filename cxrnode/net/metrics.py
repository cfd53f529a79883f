"""The listener's Prometheus instruments: C-STORE answers, bytes stored, handling time.

They live beside the listener that counts into them, not in the web app that exposes them:
a listener process imports this module and ``prometheus_client`` only. Each process writes
its counts into prometheus-client's multiprocess files in ``DATA_DIR/metrics``
(``PROMETHEUS_MULTIPROC_DIR``, emptied by ``cxrnode serve`` at each start and set before any
child starts); the web app adds them up at each scrape (:mod:`cxrnode.web.metrics`).

Label values are outcomes and DICOM statuses only, never patient data.
"""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import Counter, Histogram

from cxrnode.settings import Settings

__all__ = [
    "CSTORE_BYTES",
    "CSTORE_REQUESTS",
    "CSTORE_SECONDS",
    "MULTIPROCESS_ENV",
    "metrics_dir",
    "multiprocess",
    "observe_store",
    "prepare_metrics_dir",
]

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def metrics_dir(settings: Settings) -> Path:
    return settings.data_dir / "metrics"


def prepare_metrics_dir(settings: Settings) -> Path:
    """Empty the multiprocess directory and point this process's children at it.

    Called by ``cxrnode serve`` before it starts any child: counters start from zero with the
    node (Prometheus sees a restart), and the files of processes gone since are not added in.
    """
    directory = metrics_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    for leftover in directory.glob("*.db"):
        leftover.unlink(missing_ok=True)
    os.environ[MULTIPROCESS_ENV] = str(directory)
    return directory


def multiprocess() -> bool:
    return bool(os.environ.get(MULTIPROCESS_ENV))


# ------------------------------------------------------------------ listener instruments

CSTORE_REQUESTS = Counter(
    "cxrnode_cstore_requests",
    "C-STORE requests answered, by outcome (stored, duplicate, refused) and DICOM status.",
    ["outcome", "status"],
)
CSTORE_BYTES = Counter(
    "cxrnode_cstore_received_bytes", "Bytes of instances stored (duplicates not counted)."
)
CSTORE_SECONDS = Histogram(
    "cxrnode_cstore_handling_seconds",
    "From a dataset fully received to its C-STORE answer: header check, fsync, link, commit.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
CSTORE_REQUESTS.labels("stored", "0x0000")  # the common series exist from the start


def observe_store(status: int, duplicate: bool, size_bytes: int, seconds: float) -> None:
    """Count one C-STORE answer (called by the listener's handler)."""
    if status != 0x0000:
        outcome = "refused"
    elif duplicate:
        outcome = "duplicate"
    else:
        outcome = "stored"
        CSTORE_BYTES.inc(size_bytes)
    CSTORE_REQUESTS.labels(outcome, f"0x{status:04X}").inc()
    CSTORE_SECONDS.observe(seconds)
