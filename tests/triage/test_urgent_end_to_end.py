"""Done-when of triage, end to end with real peers: a draft that codes pneumothorax present
reaches the RIS first as a stat ORU (a real MLLP peer), is announced by webhook (a real HTTP
server) and e-mail (a real SMTP server, STARTTLS), is marked in its objects, and waits on the
dashboard (a real browser) until acknowledged. A routine draft gets none of this.

The tiny model writes random text, so the drafts here are recorded results with known
findings, as the HL7 and viewer tests do (the model's part is tested in tests/model).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hl7"))

import dicomgen  # noqa: E402
from dicom_checks import dciodvfy  # noqa: E402
from loop_helpers import inferred_job_from_file, mllp_peer, model_result  # noqa: E402
from receivers import Hook, Mailbox  # noqa: E402
from services import free_port, wait_for  # noqa: E402

from cxrnode import notify  # noqa: E402
from cxrnode.db import (  # noqa: E402
    Job,
    JobState,
    Notification,
    NotificationState,
    Output,
    UrgentDraft,
    make_engine,
    make_sessionmaker,
)
from cxrnode.db.migrate import upgrade  # noqa: E402
from cxrnode.outputs.build import build_outputs  # noqa: E402
from cxrnode.outputs.outbox import due_outputs, send_batch  # noqa: E402
from cxrnode.settings import Settings  # noqa: E402

ARTIFACTS = Path("/tmp/cxrnode-test-artifacts/triage")
SECRET = "webhook-secret-for-tests"
URGENT = {"pneumothorax": "present", "cardiomegaly": "absent"}
ROUTINE = {"cardiomegaly": "present", "pneumothorax": "absent"}
#: The urgent draft was voted over five samples (self-consistency).
VOTED = {
    "samples": 5,
    "votes": {"pneumothorax": {"present": 4, "absent": 1}, "cardiomegaly": {"absent": 5}},
}


# ---------------------------------------------------------------------------- the node side


@dataclass
class Site:
    settings: Settings
    sessions: sessionmaker
    tmp: Path

    def drafted_job(
        self, findings: dict[str, str], accession: str, order_priority: str | None = None
    ) -> int:
        """A stored source image and an inferred job with a known result."""
        extra = {"AccessionNumber": accession}
        if order_priority:
            extra["RequestedProcedurePriority"] = order_priority
        source = dicomgen.make_chest(
            self.tmp / f"{generate_uid()}.dcm",
            study_uid=generate_uid(),
            rows=64,
            cols=64,
            extra=extra,
        )
        result = model_result(findings) | (VOTED if findings == URGENT else {})
        return inferred_job_from_file(self.settings, self.sessions, source, result)

    def outputs(self, job_id: int) -> list[Output]:
        with self.sessions() as session:
            return list(session.scalars(select(Output).where(Output.job_id == job_id)))


@pytest.fixture
def site(tmp_path: Path, webhook: Hook, mailbox: Mailbox) -> Iterator[Site]:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    upgrade(engine)
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'node.db'}",
        broker_url="redis://127.0.0.1:6379/15",
        send_timeout=3,
        webhook_urls=[f"http://127.0.0.1:{webhook.port}/hook"],
        webhook_secret=SECRET,
        smtp_host="127.0.0.1",
        smtp_port=mailbox.port,
        smtp_tls_ca=mailbox.ca,
        smtp_to=["oncall@example.org"],
    )
    try:
        yield Site(settings, make_sessionmaker(engine), tmp_path)
    finally:
        engine.dispose()


def _texts(item) -> list[str]:  # noqa: ANN001
    """Every TEXT value of an SR content tree."""
    found = [str(item.TextValue)] if "TextValue" in item else []
    for child in item.get("ContentSequence", []):
        found += _texts(child)
    return found


def _answers(url: str) -> bool:
    import requests

    try:
        return requests.get(url, timeout=2).status_code < 500
    except requests.ConnectionError:
        return False


def _obx_of(message, code: str):  # noqa: ANN001, ANN202
    return next(s for s in message.segments("OBX") if str(s(3)).startswith(code))


def test_an_urgent_draft_is_sent_first_announced_marked_and_waits_for_acknowledgement(
    site: Site, webhook: Hook, mailbox: Mailbox
) -> None:
    with mllp_peer("AA") as peer:
        site.settings = site.settings.model_copy(
            update={
                "hl7_destinations": [f"mllp://127.0.0.1:{peer.port}"],
                "destinations": [f"PACS@127.0.0.1:{free_port()}"],  # down: the rows stay
            }
        )
        routine_job = site.drafted_job(ROUTINE, "ACC-ROUTINE")
        urgent_job = site.drafted_job(URGENT, "ACC-URGENT")
        with site.sessions() as session:  # the routine draft is recorded first...
            routine_ids = build_outputs(session, site.settings, routine_job)
        with site.sessions() as session:
            urgent_ids = build_outputs(session, site.settings, urgent_job)
        # ...yet the claim hands out the urgent one first, and it is sent first.
        with site.sessions() as session:
            batches = due_outputs(session)
        assert set(batches[0].output_ids) <= set(urgent_ids)
        for batch in batches:
            with site.sessions() as session:
                send_batch(session, site.settings, batch.destination, batch.output_ids)
        first, second = peer.messages()
    assert str(first.segment("OBR")(3)) == "ACC-URGENT"
    assert str(first.segment("TQ1")(9)).startswith("S^")
    assert str(_obx_of(first, "36118008")(8)) == "AA"  # pneumothorax, critically abnormal
    assert str(second.segment("OBR")(3)) == "ACC-ROUTINE"
    assert str(second.segment("TQ1")(9)).startswith("R^")
    assert all(str(obx(8)) == "" for obx in second.segments("OBX"))

    # Announced: one webhook call (signed) and one e-mail (over STARTTLS), urgent draft only.
    assert notify.send_due(site.sessions, site.settings) == 2
    ((headers, body),) = webhook.received
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers[notify.SIGNATURE_HEADER] == expected
    payload = json.loads(body)
    assert payload["priority"] == "stat" and payload["suspected"] == ["pneumothorax"]
    assert payload["accession_number"] == "ACC-URGENT"
    ((content, recipients, tls),) = mailbox.messages
    assert tls and recipients == ["oncall@example.org"]
    assert b"SUSPECTED PNEUMOTHORAX" in content
    with site.sessions() as session:
        states = session.scalars(select(Notification.state)).all()
        urgent_rows = session.scalars(select(UrgentDraft)).all()
        priorities = dict(session.execute(select(Job.id, Job.priority)).all())
    assert states == [NotificationState.sent, NotificationState.sent]
    assert [(u.job_id, u.priority, u.suspected) for u in urgent_rows] == [
        (urgent_job, "stat", "pneumothorax")
    ]
    assert priorities == {routine_job: "routine", urgent_job: "stat"}

    # Marked in the objects the radiologist sees; the routine draft is not.
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for job_id, marked in ((urgent_job, True), (routine_job, False)):
        assert {row.kind for row in site.outputs(job_id)} == {"hl7", "text_sr", "sc"}
        for row in site.outputs(job_id):
            if row.kind == "hl7":
                continue
            path = site.settings.outputs_dir / row.path
            ds = pydicom.dcmread(path)
            assert ds.SeriesDescription.startswith("SUSPECTED PNEUMOTHORAX") == marked
            assert len(ds.SeriesDescription) <= 64
            assert dciodvfy(path).errors == []
            if row.kind == "text_sr":
                notices = [
                    item.TextValue
                    for item in ds.ContentSequence
                    if getattr(item, "ValueType", "") == "TEXT"
                ]
                banner = "AI DRAFT — SUSPECTED PNEUMOTHORAX — NOT VERIFIED"
                assert (notices[0] == banner) == marked
                text = "\n".join(_texts(ds))
                assert ("Pneumothorax: Present, 4 of 5 samples" in text) == marked
                assert ("Cardiomegaly: Absent, 5 of 5 samples" in text) == marked
            if row.kind == "sc":
                from PIL import Image

                name = "sc-urgent.png" if marked else "sc-routine.png"
                Image.fromarray(ds.pixel_array).save(ARTIFACTS / name)
    assert routine_ids and urgent_ids


def metric_reads(base: str, line: str, timeout: float = 10) -> None:
    """Wait until /metrics holds ``line`` (the gauge is read on each scrape)."""
    import requests

    wait_for(lambda: line in requests.get(f"{base}/metrics", timeout=10).text, timeout, line)


@pytest.mark.slow  # a browser / a Redis server of its own
def test_the_dashboard_lists_the_urgent_draft_until_acknowledged_and_metrics_count_it(
    site: Site,
) -> None:
    import requests
    import uvicorn
    from playwright.sync_api import expect, sync_playwright

    from cxrnode.web.app import create_app

    urgent_job = site.drafted_job(URGENT, "ACC-URGENT")
    routine_job = site.drafted_job(ROUTINE, "ACC-ROUTINE")
    for job_id in (urgent_job, routine_job):
        with site.sessions() as session:
            build_outputs(session, site.settings, job_id)
    port = free_port()
    settings = site.settings.model_copy(update={"http_host": "127.0.0.1", "http_port": port})
    server = uvicorn.Server(uvicorn.Config(create_app(settings), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(f"{base}/healthz"), 30, "the web app")
        metrics = requests.get(f"{base}/metrics", timeout=10).text
        assert "cxrnode_urgent_unacknowledged 1.0" in metrics
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path="/usr/bin/chromium",
                args=["--headless", "--no-sandbox", "--disable-gpu"],
            )
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(base + "/")
            panel = page.locator("#urgent")
            assert "Suspected pneumothorax" in panel.inner_text()
            assert "STAT" in panel.inner_text()
            assert panel.locator("tbody tr").count() == 1  # the routine draft is not listed
            page.screenshot(path=str(ARTIFACTS / "dashboard-urgent.png"))
            study_url = panel.locator("a.uid").get_attribute("href")
            page.goto(base + study_url)
            findings = page.locator("table.findings").inner_text()
            assert "4 of 5 samples" in findings and "5 of 5 samples" in findings
            assert "STAT" in page.locator(".urgent-note").inner_text()
            page.screenshot(path=str(ARTIFACTS / "study-votes.png"), full_page=True)
            page.goto(base + "/")
            panel.get_by_role("button", name="Acknowledge").click()
            page.get_by_role("status").filter(has_text="Urgent draft acknowledged").wait_for()
            expect(page.locator("#urgent")).to_be_hidden()
            metric_reads(base, "cxrnode_urgent_unacknowledged 0.0")
            # a new urgent draft while the dashboard stays open: the refresh shows it
            later = site.drafted_job(URGENT, "ACC-LATER")
            with site.sessions() as session:
                build_outputs(session, site.settings, later)
            expect(page.locator("#urgent")).to_be_visible(timeout=25_000)
            assert "Suspected pneumothorax" in page.locator("#urgent").inner_text()
            browser.close()
        with site.sessions() as session:
            first, _later = session.scalars(select(UrgentDraft).order_by(UrgentDraft.id)).all()
        assert first.acknowledged_at is not None and first.acknowledged_by
        metric_reads(base, "cxrnode_urgent_unacknowledged 1.0")  # the later one
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.mark.slow  # a browser / a Redis server of its own
def test_the_outputs_task_sends_an_urgent_draft_ahead_of_queued_sends(
    site: Site, webhook: Hook, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's record_result: a routine draft's sends wait in the send queue (no send
    worker runs here); an urgent draft recorded after it is announced and delivered by the
    outputs task itself, so it reaches the RIS while the routine one still waits."""
    import redis as redis_py
    from services import redis_server

    from cxrnode.jobs.messages import RecordResult, host_queue
    from cxrnode.settings import get_settings
    from model.contracts import ModelResult
    from worker import tasks

    with redis_server() as broker, mllp_peer("AA") as peer:
        env = {
            "CXRNODE_DATA_DIR": str(site.settings.data_dir),
            "CXRNODE_DATABASE_URL": site.settings.database_url or "",
            "CXRNODE_BROKER_URL": broker,
            "CXRNODE_HL7_DESTINATIONS": f"mllp://127.0.0.1:{peer.port}",
            "CXRNODE_WEBHOOK_URLS": f"http://127.0.0.1:{webhook.port}/hook",
        }
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        for cached in (get_settings, tasks.sessions, tasks.dispatcher):
            cached.cache_clear()
        # the worker's Celery app was configured at import, before this test's broker existed
        monkeypatch.setattr(tasks.app.conf, "broker_url", broker)
        try:
            routine_job = site.drafted_job(ROUTINE, "ACC-ROUTINE")
            urgent_job = site.drafted_job(URGENT, "ACC-URGENT")
            for job_id in (routine_job, urgent_job):
                # record_result takes a prepared job and the model's answer for it
                with site.sessions() as session:
                    job = session.get(Job, job_id)
                    version, result = job.version, dict(job.result)
                    job.state, job.result = JobState.prepared, None
                    session.commit()
                message = RecordResult(job_id, version, ModelResult.from_dict(result))
                outcome = tasks.record_result(message.to_wire())
                # a routine draft's sends are published; an urgent one's are sent in-process
                assert ("SendOutputs" in outcome) == (job_id != urgent_job), outcome
            (message,) = peer.messages()  # only the urgent ORU went out
            assert str(message.segment("OBR")(3)) == "ACC-URGENT"
            assert len(webhook.received) == 1
            # the send queue of this node host (a queue per node host, see jobs.messages)
            send_queue = host_queue("send", get_settings().node_host)
            queued = redis_py.Redis.from_url(broker).llen(send_queue)
            assert queued == 1  # the routine draft's send message still waits
        finally:
            tasks.app.close()  # drop connections to this test's broker
            for cached in (get_settings, tasks.sessions, tasks.dispatcher):
                cached.cache_clear()


def test_a_stat_order_keeps_its_priority_without_making_the_draft_urgent(site: Site) -> None:
    """The order said STAT, the draft finds nothing urgent: the outputs keep the order's
    priority (never lowered), but nothing is announced or listed as a suspected finding."""
    site.settings = site.settings.model_copy(update={"destinations": ["PACS@127.0.0.1:9"]})
    job_id = site.drafted_job(ROUTINE, "ACC-STAT-ORDER", order_priority="STAT")
    with site.sessions() as session:
        build_outputs(session, site.settings, job_id)
    with site.sessions() as session:
        job = session.get(Job, job_id)
        assert job.priority == "stat"
        assert session.scalars(select(UrgentDraft)).all() == []
        assert session.scalars(select(Notification)).all() == []
    assert {row.priority for row in site.outputs(job_id)} == {0}
    for row in site.outputs(job_id):
        ds = pydicom.dcmread(site.settings.outputs_dir / row.path, stop_before_pixels=True)
        assert ds.SeriesDescription.startswith("AI DRAFT")
