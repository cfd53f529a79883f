"""The JSON API against a node that processed studies: summary, studies, one study, actions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from webnode import Site, delivered, status_json


def test_summary_counts_every_state_with_live_workers_and_the_model(site: Site) -> None:
    summary = site.get("/api/v1/summary")
    assert summary["mode"] == "embedded"
    assert summary["studies"]["skipped"] >= 1
    assert summary["jobs"]["done"] >= 4 and summary["jobs"]["failed"] >= 1
    assert summary["outputs"]["delivered"] >= 4
    assert set(summary["queues"]) == {"prepare", "infer", "outputs", "send"}
    queues = {q for worker in summary["workers"] for q in worker["queues"]}
    assert queues == {"prepare", "infer", "outputs", "send"}
    (infer,) = [w for w in summary["workers"] if "infer" in w["queues"]]
    assert infer["model"] == "loaded" and len(infer["model_hash"]) == 64
    failure = next(f for f in summary["failures"] if f["study_instance_uid"] == site.failed)
    assert "image cannot be read" in failure["error"]
    assert summary["last_hour"]["done"] >= 4 and len(summary["last_hour"]["buckets"]) == 12
    assert summary["disk"]["free_bytes"] > summary["disk"]["reserve_bytes"] > 0


def test_cxrnode_status_prints_the_same_summary(site: Site) -> None:
    api, cli = site.get("/api/v1/summary"), status_json(site)
    for part in ("studies", "instances", "queues"):
        assert cli[part] == api[part]
    assert {w["name"] for w in cli["workers"]} == {w["name"] for w in api["workers"]}
    text = site.node.cli("status").stdout
    assert "worker" in text and "model loaded" in text and "failed" in text


def test_studies_filter_by_state_and_arrival_and_page(site: Site) -> None:
    failed = site.get("/api/v1/studies?state=failed")
    assert [s["study_instance_uid"] for s in failed["items"]] == [site.failed]
    assert "image cannot be read" in failed["items"][0]["error"]
    skipped = site.get("/api/v1/studies?state=skipped")["items"]
    assert [s["study_instance_uid"] for s in skipped] == [site.skipped]
    assert skipped[0]["error"] == "only lateral views"

    everything = site.get("/api/v1/studies?limit=500")
    assert everything["total"] >= 6
    page = site.get("/api/v1/studies?limit=3&offset=2")
    assert [s["study_instance_uid"] for s in page["items"]] == [
        s["study_instance_uid"] for s in everything["items"][2:5]
    ]
    today = datetime.now(UTC).date()
    assert site.get(f"/api/v1/studies?received_from={today}")["total"] == everything["total"]
    yesterday = today - timedelta(days=1)
    assert site.get(f"/api/v1/studies?received_to={yesterday}")["total"] == 0
    assert site.api("GET", "/api/v1/studies?state=bogus").status_code == 422


def test_study_detail_has_history_timings_draft_findings_and_delivery_attempts(
    site: Site,
) -> None:
    detail = site.study(site.delivered[0])
    (job,) = detail["jobs"]
    assert [e["to_state"] for e in job["events"]] == [
        "pending", "queued", "prepared", "inferred", "done"
    ]  # fmt: skip
    assert all(job["stages"][stage] is not None for stage in ("settle", "prepare", "infer"))
    assert job["stages"]["total"] >= job["stages"]["settle"] >= 0.9  # SETTLE_SECONDS=1
    result = job["result"]
    assert isinstance(result["report"], str) and len(result["findings"]) == 9
    assert result["timings"]["total"] > 0
    assert {o["kind"] for o in detail["outputs"]} == {"text_sr", "sc"}
    for output in detail["outputs"]:
        assert output["state"] == "delivered"
        assert [(a["attempt"], a["state"], a["status"]) for a in output["history"]] == [
            (1, "delivered", "0x0000")
        ]
    (instance,) = detail["instances"]
    assert instance["chosen"] and instance["view"] == "PA"

    for output in site.study(site.dead)["outputs"]:
        first = output["history"][0]  # later ones when a test resent every dead letter
        assert (first["attempt"], first["state"], first["status"]) == (1, "dead", "no-connection")
        assert "cannot connect" in first["error"]


def test_unknown_study_is_404_and_a_skipped_study_cannot_be_rerun(site: Site) -> None:
    assert site.api("GET", "/api/v1/studies/1.2.3.4").status_code == 404
    assert site.api("POST", "/api/v1/studies/1.2.3.4/rerun").status_code == 404
    refused = site.api("POST", f"/api/v1/studies/{site.skipped}/rerun")
    assert refused.status_code == 409 and "no image the model can read" in refused.text
    assert site.api("POST", "/api/v1/outputs/999999/resend").status_code == 404


def test_rerun_makes_a_new_version_whose_draft_is_delivered(site: Site) -> None:
    uid = site.delivered[1]
    answer = site.api("POST", f"/api/v1/studies/{uid}/rerun")
    assert answer.status_code == 202, answer.text
    made = answer.json()
    assert made["version"] == 2 and made["superseded_jobs"] == []
    detail = site.wait_study(uid, lambda d: d["version"] == 2 and delivered(d), "the re-run")
    newest, first = detail["jobs"]
    assert (newest["version"], newest["state"], first["state"]) == (2, "done", "done")
    assert newest["events"][0]["detail"] == "re-run requested by an admin"
    assert newest["stages"]["settle"] is None and newest["stages"]["send"] is not None
    versions = sorted({o["version"] for o in detail["outputs"]})
    assert versions == [1, 2]
    new_uids = {o["sop_instance_uid"] for o in detail["outputs"] if o["version"] == 2}
    assert new_uids <= set(site.pacs.received())


def test_resend_of_one_dead_output_delivers_it(site: Site) -> None:
    uid, (output, other) = site.fresh_dead_letters()
    answer = site.api("POST", f"/api/v1/outputs/{output['id']}/resend")
    assert answer.status_code == 202 and answer.json() == {"output_ids": [output["id"]]}

    def resent(detail: dict) -> bool:
        mine = next(o for o in detail["outputs"] if o["id"] == output["id"])
        return mine["state"] == "delivered"

    detail = site.wait_study(uid, resent, "the resent output", timeout=60)
    mine = next(o for o in detail["outputs"] if o["id"] == output["id"])
    assert [(a["attempt"], a["state"]) for a in mine["history"]] == [
        (1, "dead"), (0, "pending"), (1, "delivered")
    ]  # fmt: skip
    assert mine["sop_instance_uid"] in site.pacs.received()
    still = next(o for o in detail["outputs"] if o["id"] == other["id"])
    assert still["state"] == "dead", "only the chosen output was resent"


def test_resend_of_all_dead_letters_delivers_them(site: Site) -> None:
    uid, outputs = site.fresh_dead_letters()
    dead_before = {d["id"] for d in site.get("/api/v1/summary")["dead_letters"]}
    assert {o["id"] for o in outputs} <= dead_before
    answer = site.api("POST", "/api/v1/outputs/resend-dead")
    assert answer.status_code == 202
    assert set(answer.json()["output_ids"]) == dead_before

    def all_delivered(_: dict) -> bool:
        states = {}
        for study in (uid, site.dead):
            states.update({o["id"]: o["state"] for o in site.study(study)["outputs"]})
        return all(states.get(i) == "delivered" for i in dead_before)

    site.wait_study(uid, all_delivered, "every dead letter to be delivered", timeout=60)
    summary = site.get("/api/v1/summary")
    assert summary["dead_letters"] == [] and summary["outputs"]["dead"] == 0
