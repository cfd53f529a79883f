"""The admin actions, shared by the API and the dashboard: re-run a study, resend one output,
resend every dead letter. Each commits first, then wakes the scheduler or publishes the job's
first message, and logs one line naming the action, its target and the client.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy.orm import sessionmaker

from cxrnode.jobs.broker import wake_scheduler
from cxrnode.jobs.rerun import rerun_study
from cxrnode.outputs import outbox
from cxrnode.settings import Settings

log = logging.getLogger(__name__)


class RerunAnswer(BaseModel):
    study_instance_uid: str
    job_id: int
    version: int = Field(description="The new job version.")
    superseded_jobs: list[int] = Field(description="Open jobs of older versions it replaced.")


class ResendAnswer(BaseModel):
    output_ids: list[int] = Field(description="Outputs now pending, due at once.")


class Actions:
    """Writes on behalf of an admin (the web app's only writers)."""

    def __init__(self, settings: Settings, writers: sessionmaker, redis: Any) -> None:
        self.settings = settings
        self.writers = writers
        self.redis = redis
        self._dispatcher: Any = None
        self._lock = threading.Lock()

    def _dispatch(self) -> Any:
        from cxrnode.jobs.dispatch import Dispatcher

        with self._lock:
            if self._dispatcher is None:
                self._dispatcher = Dispatcher(self.settings, redis=self.redis)
            return self._dispatcher

    def rerun(self, study_uid: str, client: str) -> RerunAnswer:
        """New job version of the study; raises LookupError / RerunRefused."""
        with self.writers() as session:
            made = rerun_study(session, study_uid)
        dispatcher = self._dispatch()
        with self._lock:
            dispatcher.prepare_image(made.work.job_id, made.work.version, made.work.node_host)
        log.info(
            "admin action from %s: re-run of study %s (job %d, version %d; superseded %s)",
            client,
            study_uid,
            made.work.job_id,
            made.work.version,
            made.superseded or "none",
        )
        return RerunAnswer(
            study_instance_uid=study_uid,
            job_id=made.work.job_id,
            version=made.work.version,
            superseded_jobs=made.superseded,
        )

    def resend_output(self, output_id: int, client: str) -> ResendAnswer:
        """One output again; raises LookupError."""
        with self.writers() as session:
            ids = outbox.resend(session, self.settings, output_id=output_id)
        wake_scheduler(self.redis)
        log.info("admin action from %s: resend of output %d -> %s", client, output_id, ids)
        return ResendAnswer(output_ids=ids)

    def resend_dead(self, client: str) -> ResendAnswer:
        with self.writers() as session:
            ids = outbox.resend(session, self.settings, dead=True)
        wake_scheduler(self.redis)
        log.info("admin action from %s: resend of %d dead letters", client, len(ids))
        return ResendAnswer(output_ids=ids)

    def close(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.celery.close()
