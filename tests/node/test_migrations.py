"""An installation of the first release upgrades in place, its data intact."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import select, text

from cxrnode.db import Instance, Job, Output, make_engine, make_sessionmaker
from cxrnode.db.migrate import current_revision, downgrade, head_revision, upgrade

MODEL_HASH = "cd" * 32


def first_release_database(url: str) -> None:
    """A database as release 0.1 left it: schema 0001 and one study drafted and sent."""
    engine = make_engine(url)
    upgrade(engine, "0001")
    old_result = {
        "report": "No acute findings.",
        "differential": "",
        "recommendation": "",
        "findings": {"no_finding": "present"},
        "finding_sources": {"no_finding": "report"},
        "prompts": {"report": "default"},
        "model": {"id": "/models/cxr-llava", "hash": MODEL_HASH},
        "timings": {"total": 1.5},
        "batch": {"id": "b1", "size": 2, "worker": "infer@gpu0"},
    }
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO studies (id, study_instance_uid, state, first_arrival, last_arrival,"
                " settle_at, instance_count, version) VALUES (1, '1.2.3', 'settled', "
                "'2026-01-01', '2026-01-01', '2026-01-01', 1, 1)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO instances (id, sop_instance_uid, sop_class_uid, study_instance_uid, "
                "series_instance_uid, transfer_syntax_uid, path, size_bytes, calling_aet, state, "
                "received_at, study_id) VALUES (1, '1.2.3.4', '1.2.840.10008.5.1.4.1.1.1', "
                "'1.2.3', '1.2.3.5', '1.2.840.10008.1.2.1', '1.2.3/1.2.3.4.dcm', 10, 'PACS', "
                "'stored', '2026-01-01', 1)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO jobs (id, study_id, instance_id, version, state, attempts, "
                "created_at, updated_at, model_id, model_hash, report, findings, result, "
                "batch_id, batch_size) VALUES (1, 1, 1, 1, 'done', 0, '2026-01-01', "
                "'2026-01-01', '/models/cxr-llava', :hash, 'No acute findings.', '{}', :result, "
                "'b1', 2)"
            ),
            {"hash": MODEL_HASH, "result": json.dumps(old_result)},
        )
        conn.execute(
            text(
                "INSERT INTO outputs (id, job_id, kind, destination, sop_class_uid, "
                "sop_instance_uid, path, state, attempts, next_try_at, created_at, updated_at) "
                "VALUES (1, 1, 'sr', 'PACS@pacs:104', '1.2.840.10008.5.1.4.1.1.88.33', "
                "'2.25.1', '1.2.3/2.25.1.dcm', 'delivered', 1, '2026-01-01', '2026-01-01', "
                "'2026-01-01')"
            )
        )
    engine.dispose()


def test_a_first_release_database_upgrades_to_the_current_schema_with_its_data(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    first_release_database(url)
    engine = make_engine(url)
    upgrade(engine)  # what every `cxrnode serve` start does
    with make_sessionmaker(engine)() as session:
        job = session.get(Job, 1)
        result = job.model_result  # the old result, folded into the one typed column
        assert (result.model_hash, result.batch_id, result.worker) == (
            MODEL_HASH,
            "b1",
            "infer@gpu0",
        )
        assert session.scalars(select(Instance.sop_instance_uid)).all() == ["1.2.3.4"]
        assert session.scalars(select(Output.state)).all() == ["delivered"]
        assert session.scalars(select(Output.kind)).all() == ["sr"]  # read as air_sr later
    head = current_revision(engine)
    assert head == head_revision()

    # and back: an operator can undo an upgrade to the previous release's schema
    downgrade(engine, "0001")
    assert current_revision(engine) == "0001"
    upgrade(engine)
    assert current_revision(engine) == head
    engine.dispose()
