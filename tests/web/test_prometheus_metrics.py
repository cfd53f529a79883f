"""/metrics: parsed with prometheus-client's own parser, every named series there, moving
when a study is processed, and no patient data in any label."""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families
from services import wait_for
from webnode import (
    BIRTH_DATE,
    PATIENT_ID,
    PATIENT_NAME,
    Site,
    chest,
    delivered,
    metrics_text,
    study_uid,
)

from cxrnode.web.metrics import SETTLE_SECONDS

#: family name -> type, as documented in docs/admin.md
SERIES = {
    "cxrnode_cstore_requests": "counter",
    "cxrnode_cstore_received_bytes": "counter",
    "cxrnode_cstore_handling_seconds": "histogram",
    "cxrnode_stage_seconds": "histogram",
    "cxrnode_model_seconds": "histogram",
    "cxrnode_instances": "gauge",
    "cxrnode_studies": "gauge",
    "cxrnode_jobs": "gauge",
    "cxrnode_outputs": "gauge",
    "cxrnode_oldest_open_job_age_seconds": "gauge",
    "cxrnode_queue_depth": "gauge",
    "cxrnode_workers_live": "gauge",
    "cxrnode_inference_workers": "gauge",
    "cxrnode_model_loaded": "gauge",
    "cxrnode_model_info": "gauge",
    "cxrnode_disk_free_bytes": "gauge",
    "cxrnode_disk_total_bytes": "gauge",
    "cxrnode_disk_reserve_bytes": "gauge",
    "cxrnode_database_up": "gauge",
    "cxrnode_broker_up": "gauge",
}


def scrape(site: Site) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """sample name and labels -> value."""
    samples = {}
    for family in text_string_to_metric_families(metrics_text(site)):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_every_named_series_is_there_with_its_type(site: Site) -> None:
    families = {f.name: f for f in text_string_to_metric_families(metrics_text(site))}
    for name, kind in SERIES.items():
        assert name in families, f"{name} missing"
        assert families[name].type == kind, name
    samples = scrape(site)
    assert value(samples, "cxrnode_database_up") == 1 and value(samples, "cxrnode_broker_up") == 1
    for queue in ("prepare", "infer", "outputs", "send"):
        assert value(samples, "cxrnode_workers_live", queue=queue) == 1
    assert value(samples, "cxrnode_model_loaded") == 1
    (info,) = [k for k in samples if k[0] == "cxrnode_model_info"]
    assert dict(info[1])["device"] == "cpu" and len(dict(info[1])["model_hash"]) == 64
    assert value(samples, "cxrnode_studies", state="skipped") >= 1
    assert value(samples, "cxrnode_jobs", state="failed") >= 1
    assert value(samples, "cxrnode_disk_free_bytes") > value(samples, "cxrnode_disk_reserve_bytes")


def quiet(site: Site) -> dict:
    """A scrape once nothing is in flight and the stage latencies have caught up (they lag
    by SETTLE_SECONDS): work of earlier tests must not count as this test's."""

    def settled() -> dict | None:
        summary = site.get("/api/v1/summary")
        outputs = summary["outputs"]
        if summary["open_jobs"] or outputs["pending"] or outputs.get("in_flight"):
            return None
        first = scrape(site)
        time.sleep(SETTLE_SECONDS + 0.5)
        second = scrape(site)
        stages = [k for k in second if k[0] == "cxrnode_stage_seconds_count"]
        return second if all(first.get(k) == second[k] for k in stages) else None

    return wait_for(settled, 60, "the node to be quiet")


def test_the_series_move_when_a_study_is_processed(site: Site) -> None:
    before = quiet(site)
    image = chest(site.tmp, "metrics", seed=40)
    site.send(image)
    site.wait_study(study_uid(image), delivered, "the study to be delivered")

    def stages_observed() -> dict | None:
        now = scrape(site)  # stage latencies are read from the job history at each scrape
        total = "cxrnode_stage_seconds_count"
        grown = value(now, total, stage="total") > value(before, total, stage="total")
        return now if grown else None

    after = wait_for(stages_observed, 30, "the stage latencies of the study")

    def grew(name: str, by: float = 1, **labels: str) -> None:
        assert value(after, name, **labels) - value(before, name, **labels) == by, (name, labels)

    grew("cxrnode_cstore_requests_total", outcome="stored", status="0x0000")
    grew("cxrnode_cstore_handling_seconds_count")
    assert value(after, "cxrnode_cstore_received_bytes_total") > value(
        before, "cxrnode_cstore_received_bytes_total"
    )
    for stage in ("settle", "prepare", "infer", "deliver", "send", "total"):
        grew("cxrnode_stage_seconds_count", stage=stage)
    grew("cxrnode_model_seconds_count", phase="total")
    grew("cxrnode_instances", state="stored")
    grew("cxrnode_jobs", state="done")
    grew("cxrnode_outputs", by=2, state="delivered")
    settle = value(after, "cxrnode_stage_seconds_sum", stage="settle") - value(
        before, "cxrnode_stage_seconds_sum", stage="settle"
    )
    assert 0.9 <= settle < 30, "the quiet period (SETTLE_SECONDS=1) is in the settle stage"


def test_no_patient_data_in_any_label_or_anywhere_in_the_metrics(site: Site) -> None:
    text = metrics_text(site)
    secrets = [PATIENT_ID, BIRTH_DATE, "1947-03-19", *PATIENT_NAME.split("^")]
    for secret in secrets:
        assert secret.lower() not in text.lower()
    labels = {
        v
        for family in text_string_to_metric_families(text)
        for s in family.samples
        for v in s.labels.values()
    }
    assert labels and not any(secret.lower() in v.lower() for v in labels for secret in secrets)
