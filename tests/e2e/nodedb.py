"""Read a node's (SQLite) database from a test, as `cxrnode status` would."""

from __future__ import annotations

from services import Node
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from cxrnode.db import Instance, Job, Output


def node_rows(node: Node, model: type) -> list:
    """Every row of one table, in id order."""
    engine = create_engine(f"sqlite:///{node.data_dir / 'cxrnode.db'}")
    try:
        with Session(engine) as session:
            return list(session.scalars(select(model).order_by(model.id)).all())
    finally:
        engine.dispose()


def outputs(node: Node) -> list[Output]:
    return node_rows(node, Output)


def jobs(node: Node) -> list[Job]:
    return node_rows(node, Job)


def instances(node: Node) -> list[Instance]:
    return node_rows(node, Instance)
