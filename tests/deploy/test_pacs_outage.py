"""A PACS outage with a real node and a real Orthanc: a draft superseded while its outputs wait
is never sent, and retention leaves the study alone until the newer draft is delivered.

The node keeps files for about two seconds after delivery here (RETENTION_DAYS=0.00002) and
looks every second, so anything it removed too early would show.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import dicomgen
import pytest
from nodedb import instances, jobs, outputs
from orthanc_server import Orthanc
from pydicom.uid import generate_uid
from services import Node, storescu

pytestmark = pytest.mark.slow

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def wait_until(predicate: Callable[[], object], timeout: float, what: str, node: Node) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{node.log()[-5000:]}")


def test_a_superseded_draft_is_never_sent_and_retention_waits_for_the_delivery(
    e2e_node: Callable[..., Node], orthanc: Orthanc, tmp_path: Path
) -> None:
    node = e2e_node(retention_days="0.00002", retention_interval_seconds="1")
    node.start()  # the PACS is down: nothing listens on its port
    study = generate_uid()
    ap = dicomgen.make_chest(tmp_path / "ap.dcm", study_uid=study, modality="DX", view="AP")
    assert storescu(node.port, ap).returncode == 0

    def first_draft_waiting() -> bool:
        rows = outputs(node)
        return len(rows) == 2 and all(r.state == "pending" and r.attempts >= 1 for r in rows)

    wait_until(first_draft_waiting, 240, "the first draft's outputs to wait for the PACS", node)
    first = {o.id: o.sop_instance_uid for o in outputs(node)}

    # the better image (PA) of the same study arrives while the first draft waits
    pa = dicomgen.make_chest(tmp_path / "pa.dcm", study_uid=study, modality="DX", view="PA", seed=3)
    assert storescu(node.port, pa).returncode == 0

    def second_draft_waiting() -> bool:
        rows = outputs(node)
        return len(rows) == 4 and {r.state for r in rows if r.id in first} == {"superseded"}

    wait_until(second_draft_waiting, 240, "the second draft to supersede the first", node)
    rows = outputs(node)
    second = {o.id: o.sop_instance_uid for o in rows if o.id not in first}
    assert [j.version for j in jobs(node)] == [1, 2]
    assert {o.state for o in rows if o.id in second} <= {"pending", "in_flight"}
    # outputs waited all along: nothing was removed, although the retention age went by
    time.sleep(3)
    assert all(o.purged_at is None for o in outputs(node))
    assert all((node.data_dir / "instances" / i.path).is_file() for i in instances(node))

    orthanc.start()  # the PACS returns

    def delivered() -> bool:
        rows = {o.id: o.state for o in outputs(node)}
        return all(rows[i] == "delivered" for i in second)

    wait_until(delivered, 120, "the second draft to be delivered", node)
    stored = orthanc.stored_uids()
    assert not set(first.values()) & set(stored), "a superseded output reached the PACS"
    assert all(stored.count(uid) == 1 for uid in second.values())
    in_pacs = {
        i["Tags"]["SOPInstanceUID"]: i["Tags"]["SOPClassUID"]
        for i in orthanc.instances_of_study(study)
    }
    assert sorted(in_pacs.values()) == sorted([SR_CLASS, SC_CLASS])
    assert set(in_pacs) == set(second.values())
    superseded = [o for o in outputs(node) if o.id in first]
    assert {(o.state, o.last_error) for o in superseded} == {
        ("superseded", "a newer draft replaced it")
    }

    # now delivered: retention removes the study's files a few seconds later, keeps the rows
    wait_until(
        lambda: all(o.purged_at for o in outputs(node)), 60, "retention to remove the files", node
    )
    assert all(i.purged_at for i in instances(node))
    for folder in ("instances", "prepared", "outputs"):
        assert not (node.data_dir / folder / study).exists(), folder
    report = json.loads(node.cli("status", "--json").stdout)
    retention = report["retention"]
    assert (retention["purged_studies"], retention["purged_instances"]) == (1, 2)
    assert retention["purged_outputs"] == 4
    assert report["outputs"] == {**report["outputs"], "delivered": 2, "superseded": 2}
    assert "retention: removed the files of 1 studies" in node.log()
