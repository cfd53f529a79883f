"""A study stream for the fault tests, and the check that every study was drafted exactly once."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import dicomgen
import pydicom
from services import Node, storescu
from sqlalchemy import func, select

from cxrnode.db import Job, JobEvent, JobState, Study, make_engine, make_sessionmaker


@dataclass
class Stream:
    """Sends ``count`` one-image studies to ``node``, one every ``every`` seconds, from a
    thread; a study the node did not acknowledge is sent again (as a PACS would)."""

    node: Node
    directory: Path
    count: int
    every: float = 1.0
    sent: list[str] = field(default_factory=list)  # Study Instance UIDs acknowledged
    retries: int = 0
    _thread: threading.Thread | None = None

    def start(self) -> Stream:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="stream", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        for index in range(self.count):
            image = dicomgen.make_chest(
                self.directory / f"s{index}.dcm", modality="CR", seed=1000 + index
            )
            study = str(pydicom.dcmread(image, stop_before_pixels=True).StudyInstanceUID)
            for _ in range(60):
                answer = storescu(self.node.port, image, timeout=60)
                if (
                    answer.returncode == 0
                    and "Received Store Response (Success)" in answer.stderr + answer.stdout
                ):
                    self.sent.append(study)
                    break
                self.retries += 1
                time.sleep(1.0)
            time.sleep(self.every)

    def join(self, timeout: float) -> None:
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream did not finish"


@dataclass(frozen=True)
class Drafts:
    """Per study: jobs made, jobs done, and times a job's model result was recorded."""

    jobs: dict[str, int]
    done: dict[str, int]
    inferred: dict[str, int]

    def once(self, studies: list[str]) -> bool:
        return all(
            self.jobs.get(s) == 1 and self.done.get(s) == 1 and self.inferred.get(s) == 1
            for s in studies
        )


def drafts(database_url: str) -> Drafts:
    engine = make_engine(database_url, read_only=True)
    try:
        with make_sessionmaker(engine)() as session:
            jobs = dict(
                session.execute(
                    select(Study.study_instance_uid, func.count(Job.id))
                    .join(Job, Job.study_id == Study.id)
                    .group_by(Study.study_instance_uid)
                ).all()
            )
            done = dict(
                session.execute(
                    select(Study.study_instance_uid, func.count(Job.id))
                    .join(Job, Job.study_id == Study.id)
                    .where(Job.state == JobState.done)
                    .group_by(Study.study_instance_uid)
                ).all()
            )
            inferred = dict(
                session.execute(
                    select(Study.study_instance_uid, func.count(JobEvent.id))
                    .join(Job, Job.study_id == Study.id)
                    .join(JobEvent, JobEvent.job_id == Job.id)
                    .where(JobEvent.to_state == JobState.inferred.value)
                    .group_by(Study.study_instance_uid)
                ).all()
            )
            session.rollback()
    finally:
        engine.dispose()
    return Drafts(jobs, done, inferred)
