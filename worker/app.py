"""The Celery application of the workers (`cxrnode worker`, or `celery -A worker.app`)."""

from __future__ import annotations

from cxrnode.jobs.broker import celery_app
from cxrnode.settings import get_settings

app = celery_app(get_settings())
app.conf.include = ["worker.tasks"]


def run_worker(queues: list[str], concurrency: int, loglevel: str = "INFO") -> None:
    """Run a worker consuming ``queues`` with a thread pool of ``concurrency`` threads.

    Threads, not processes: inference needs one model per process and many waiting tasks
    to batch; the node-side tasks are I/O-bound or release the GIL in numpy and zlib.
    """
    import worker.tasks  # noqa: F401  (registers the tasks)

    name = "-".join(queues)
    app.worker_main(
        [
            "worker",
            f"--queues={','.join(queues)}",
            "--pool=threads",
            f"--concurrency={concurrency}",
            f"--loglevel={loglevel}",
            f"--hostname={name}@%h",
            "--without-mingle",
            "--without-gossip",
        ]
    )
