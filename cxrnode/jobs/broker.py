"""The Celery configuration shared by the node (which sends tasks by name) and the workers.

Queues: ``prepare`` (node side, CPU: DICOM → 8-bit image), ``infer`` (GPU side: the model),
``deliver`` (node side: store results, build outputs) and ``send`` (node side: C-STORE to the
PACS). The node never imports the task code (it would pull torch); it sends by task name.

Embedded mode uses kombu's SQLAlchemy transport on an SQLite file (no broker server);
distributed mode uses Redis. Messages are JSON.
"""

from __future__ import annotations

import contextlib
from typing import Any

from celery import Celery

from cxrnode.settings import Settings

QUEUES = ("prepare", "infer", "deliver", "send")

TASK_QUEUES = {
    "cxrnode.prepare": "prepare",
    "cxrnode.infer": "infer",
    "cxrnode.deliver": "deliver",
    "cxrnode.note": "deliver",
    "cxrnode.finish": "deliver",
    "cxrnode.send": "send",
}

#: above the longest task (a batch of 8 three-turn conversations on a slow GPU)
VISIBILITY_TIMEOUT = 2 * 3600


def celery_app(settings: Settings) -> Celery:
    """A Celery app configured for this node's broker; tasks are registered by ``worker``."""
    broker = settings.effective_broker_url
    app = Celery("cxrnode", broker=broker, set_as_current=False)
    conf: dict[str, Any] = dict(
        task_routes={name: {"queue": queue} for name, queue in TASK_QUEUES.items()},
        task_default_queue="deliver",
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        enable_utc=True,
    )
    if broker.startswith("sqla+"):
        import kombu.transport.sqlalchemy as sqla_transport

        # The transport hands every transport option to create_engine, so its polling
        # interval (seconds between empty polls) is set on the class.
        sqla_transport.Transport.polling_interval = 0.02
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        _use_wal(broker.removeprefix("sqla+"))
    else:
        conf.update(
            broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
            worker_send_task_events=True,  # Flower
            task_send_sent_event=True,
        )
    app.conf.update(conf)
    return app


def _use_wal(url: str) -> None:
    """Put the embedded broker's SQLite file in WAL mode (the mode is stored in the file, so
    kombu's own connections use it too): one fsync per commit instead of a rollback journal's
    several, for every message published, fetched and acknowledged."""
    if not url.startswith("sqlite:///"):
        return
    import sqlite3

    with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"), timeout=30)) as db:
        db.execute("PRAGMA journal_mode=WAL")


def queue_depths(settings: Settings) -> dict[str, int | None]:
    """Messages waiting in each queue (None when the broker cannot be asked)."""
    broker = settings.effective_broker_url
    depths: dict[str, int | None] = {queue: None for queue in QUEUES}
    try:
        if broker.startswith(("redis://", "rediss://")):
            import redis

            client = redis.Redis.from_url(broker, socket_timeout=2)
            for queue in QUEUES:
                depths[queue] = int(client.llen(queue))
        elif broker.startswith("sqla+"):
            from sqlalchemy import create_engine, text

            engine = create_engine(broker.removeprefix("sqla+"))
            try:
                with engine.connect() as conn:
                    tables = (
                        conn.exec_driver_sql(
                            "SELECT name FROM sqlite_master WHERE name='kombu_message'"
                        ).first()
                        if engine.dialect.name == "sqlite"
                        else True
                    )
                    if tables:
                        rows = conn.execute(
                            text(
                                "SELECT q.name, COUNT(m.id) FROM kombu_queue q LEFT JOIN "
                                "kombu_message m ON m.queue_id = q.id AND m.visible "
                                "GROUP BY q.name"
                            )
                        )
                        counts = dict(rows.all())
                        for queue in QUEUES:
                            depths[queue] = int(counts.get(queue, 0))
                    else:
                        depths = {queue: 0 for queue in QUEUES}
            finally:
                engine.dispose()
    except Exception:  # status must answer even when the broker is down
        pass
    return depths
