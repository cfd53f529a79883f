"""A destination that failed is shown as down and probed; its outputs go as soon as it answers.

The in-process test drives the prober against real peers (dcmtk storescp answering C-ECHO, a
port where nothing listens) with a real database and Redis. The node test runs `cxrnode
serve` with the tiny model and a PACS that is down when the draft is made: `status`, the
summary API, the dashboard and /metrics say so, and once the PACS is back the draft arrives
long before the outbox's backoff would have tried again; a SIGTERM to all its processes at
once then stops it without a traceback.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pydicom
import redis as redis_lib
import requests
from jobcore import Node as Core
from services import Node, redis_server, storescu, wait_for
from sqlalchemy import select
from webnode import Pacs, chest

from cxrnode.db import Instance, Job, JobState, Output, OutputState, utcnow
from cxrnode.outputs.probe import HEALTH_KEY, Prober, destinations_down, unreachable


def _outputs(core: Core, rows: list[tuple[str, str, str]]) -> list[int]:
    """Outbox rows waiting after a failed try: (destination, kind, last status)."""
    core.receive(modality="CR")
    now = utcnow()
    with core.sessions() as session:
        instance = session.scalars(select(Instance)).one()
        job = Job(
            study_id=instance.study_id, instance_id=instance.id, version=1, state=JobState.done
        )
        session.add(job)
        session.flush()
        ids = []
        for destination, kind, status in rows:
            row = Output.pending(
                job_id=job.id,
                kind=kind,
                destination=destination,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.11",
                sop_instance_uid=f"1.2.3.{len(ids) + 1}",
                path=f"x/{kind}.dcm",
                now=now - timedelta(seconds=100),
            )
            row.attempts, row.last_status, row.last_error = 3, status, f"it failed: {status}"
            row.next_try_at = now + timedelta(seconds=300)
            session.add(row)
            session.flush()
            ids.append(row.id)
        session.commit()
    return ids


def test_unreachable_statuses_are_told_from_refusals() -> None:
    assert all(map(unreachable, ["no-connection", "no-response", "aborted", "HTTP 503"]))
    assert not any(map(unreachable, ["0xA700", "HTTP 404", "rejected-permanent", None]))


def test_the_prober_shows_a_dead_peer_down_and_makes_only_unreachable_outputs_due_when_it_answers(
    core: Core, tmp_path: Path
) -> None:
    down, refusing = Pacs(tmp_path / "down"), Pacs(tmp_path / "refusing")
    first, second, refused = _outputs(
        core,
        [
            (down.destination, "text_sr", "no-connection"),
            (down.destination, "sc", "no-connection"),
            (refusing.destination, "sc", "0xA700"),
        ],
    )
    settings = core.settings.model_copy(update={"destination_probe_seconds": 5.0})
    with redis_server() as url:
        client = redis_lib.Redis.from_url(url)
        prober = Prober(settings, core.sessions, core.readers, lambda: client)
        refusing.start()
        try:
            assert prober.run_once() == {down.destination: False, refusing.destination: True}
            with core.readers() as session:
                shown = {d.destination: d for d in destinations_down(session, client)}
                rows = {r.id: r for r in session.scalars(select(Output))}
            assert set(shown) == {down.destination, refusing.destination}
            dead = shown[down.destination]
            assert dead.waiting == 2 and dead.probe_ok is False
            assert "probe: C-ECHO: cannot connect" in (dead.last_error or "")
            assert dead.next_probe_at is not None and dead.next_probe_at > utcnow()
            assert dead.since <= utcnow() - timedelta(seconds=99)
            # the refusing peer answers C-ECHO but keeps its backoff: probing cannot help it
            assert rows[refused].next_try_at > utcnow() + timedelta(seconds=250)

            down.start()
            assert prober.run_once() == {down.destination: True, refusing.destination: True}
            with core.readers() as session:
                rows = {r.id: r for r in session.scalars(select(Output))}
            assert rows[first].next_try_at <= utcnow() and rows[second].next_try_at <= utcnow()
            assert rows[refused].next_try_at > utcnow() + timedelta(seconds=250)
        finally:
            down.stop()
            refusing.stop()

        with core.sessions() as session:  # the send task delivered them
            for output_id in (first, second):
                session.get(Output, output_id).state = OutputState.delivered
            session.commit()
        prober.run_once()
        with core.readers() as session:
            assert [d.destination for d in destinations_down(session, client)] == [
                refusing.destination
            ]
        assert set(client.hkeys(HEALTH_KEY)) == {refusing.destination.encode()}


def test_a_node_shows_its_pacs_down_and_delivers_as_soon_as_it_returns(
    make_node: Callable[..., Node], tiny_model: Path, tmp_path: Path
) -> None:
    pacs = Pacs(tmp_path / "pacs")
    node = make_node(
        model=str(tiny_model),
        destinations=pacs.destination,
        temperature="0",
        max_new_tokens="8",
        send_timeout="3",
        send_retry_base_seconds="600",  # the backoff alone would wait ten minutes
        send_retry_max_seconds="600",
        destination_probe_seconds="3",
        reconcile_interval="5",
    )
    image = chest(tmp_path, "probe", seed=31)
    assert storescu(node.port, image).returncode == 0
    study = str(pydicom.dcmread(image, stop_before_pixels=True).StudyInstanceUID)

    def status() -> dict:
        return json.loads(node.cli("status", "--json").stdout)

    def probed_down() -> dict | None:
        down = status()["destinations_down"]
        return down[0] if down and down[0]["probe_ok"] is False else None

    shown = wait_for(probed_down, 180, "the PACS shown down and probed", interval=1.0)
    assert shown["destination"] == pacs.destination and shown["waiting"] >= 2
    text = node.cli("status").stdout
    assert f"DOWN       {pacs.destination} since" in text and "next probe" in text, text
    base = f"http://127.0.0.1:{node.env['CXRNODE_HTTP_PORT']}"
    summary = requests.get(base + "/api/v1/summary", timeout=30).json()
    assert summary["destinations_down"][0]["destination"] == pacs.destination
    metrics = requests.get(base + "/metrics", timeout=30).text
    assert f'cxrnode_destination_up{{destination="{pacs.destination}"}} 0.0' in metrics
    page = requests.get(base + "/", timeout=30).text
    assert "Destinations down" in page and pacs.destination in page
    assert 'id="destinations" data-refresh hidden' not in page  # shown, not just present

    pacs.start()
    try:
        # the backoff's next try is ten minutes away: only the probe can send it this soon
        wait_for(lambda: len(pacs.received()) >= 2, 60, "the draft at the PACS", interval=0.5)
        wait_for(lambda: not status()["destinations_down"], 30, "the PACS shown up again", 1.0)
        metrics = requests.get(base + "/metrics", timeout=30).text
        assert f'cxrnode_destination_up{{destination="{pacs.destination}"}} 1.0' in metrics
    finally:
        pacs.stop()
    arrived = {str(pydicom.dcmread(p).StudyInstanceUID) for p in pacs.directory.iterdir()}
    assert arrived == {study}

    # and systemd's stop (SIGTERM to every process at once) ends it without a traceback
    assert node.proc is not None
    os.killpg(node.proc.pid, signal.SIGTERM)
    assert node.proc.wait(90) == 0, node.log()[-4000:]
    assert "Traceback" not in node.log() and "cxrnode stopped" in node.log(), node.log()[-6000:]
