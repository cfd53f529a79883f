"""The HL7 draft in the outbox: built beside the SR and SC when MLLP destinations exist, sent
to a real MLLP peer (python-hl7's asyncio server), and what its ACK does to the row: AA
delivered, AE retried, AR dead letter; resend keeps each kind to its own destinations."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))

import dicomgen  # noqa: E402
from loop_helpers import inferred_job_from_file, mllp_peer, model_result  # noqa: E402
from services import free_port  # noqa: E402

from cxrnode.db import (  # noqa: E402
    Job,
    Output,
    OutputState,
    Study,
    make_engine,
    make_sessionmaker,
    utcnow,
)
from cxrnode.db.migrate import upgrade  # noqa: E402
from cxrnode.outputs.build import build_outputs  # noqa: E402
from cxrnode.outputs.outbox import Destination, due_outputs, resend, send_batch  # noqa: E402
from cxrnode.settings import Settings  # noqa: E402


@dataclass
class Site:
    settings: Settings
    sessions: sessionmaker
    tmp: Path

    def drafted_job(self, accession: str = "ACC-HL7") -> int:
        """A source image and an inferred job, as the pipeline leaves them."""
        source = dicomgen.make_chest(
            self.tmp / f"{generate_uid()}.dcm",
            study_uid=generate_uid(),
            rows=64,
            cols=64,
            extra={"AccessionNumber": accession},
        )
        result = model_result({"cardiomegaly": "present", "pneumothorax": "absent"})
        return inferred_job_from_file(self.settings, self.sessions, source, result)

    def build(self, job_id: int) -> list[Output]:
        with self.sessions() as session:
            ids = build_outputs(session, self.settings, job_id)
            return list(session.scalars(select(Output).where(Output.id.in_(ids))))

    def send(self, rows: list[Output]) -> None:
        with self.sessions() as session:
            batches = due_outputs(session, only=[row.id for row in rows])
            for batch in batches:
                send_batch(session, self.settings, batch.destination, batch.output_ids)

    def row(self, output_id: int) -> Output:
        with self.sessions() as session:
            row = session.get(Output, output_id)
            assert row is not None
            return row


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    upgrade(engine)
    settings = Settings(
        data_dir=tmp_path / "data",
        send_retry_base_seconds=0.2,
        send_retry_max_seconds=0.8,
        send_max_attempts=4,
        send_timeout=3,
    )
    try:
        yield Site(settings, make_sessionmaker(engine), tmp_path)
    finally:
        engine.dispose()


def with_destinations(site: Site, dicom: list[str], hl7: list[str]) -> Site:
    settings = site.settings.model_copy(update={"destinations": dicom, "hl7_destinations": hl7})
    return Site(settings, site.sessions, site.tmp)


def test_mllp_destinations_parse_and_dicom_destinations_may_not_be_mllp() -> None:
    target = Destination.parse("mllp://ris.example:2575")
    assert (target.kind, target.host, target.port) == ("mllp", "ris.example", 2575)
    with pytest.raises(ValueError, match="mllp://host:port"):
        Destination.parse("mllp://ris.example")
    with pytest.raises(ValueError, match="HL7_DESTINATIONS"):
        Settings(destinations=["mllp://ris:2575"])
    with pytest.raises(ValueError, match="not an MLLP address"):
        Settings(hl7_destinations=["PACS@pacs:104"])


def test_the_hl7_draft_goes_only_to_hl7_destinations_and_is_delivered_on_aa(site: Site) -> None:
    closed = f"PACS@127.0.0.1:{free_port()}"
    with mllp_peer("AA") as peer:
        ris = f"mllp://127.0.0.1:{peer.port}"
        site = with_destinations(site, [closed], [ris])
        rows = site.build(site.drafted_job(accession="ACC-77"))

        assert sorted((r.kind, r.destination) for r in rows) == [
            ("hl7", ris),
            ("sc", closed),
            ("text_sr", closed),
        ]
        hl7_row = next(r for r in rows if r.kind == "hl7")
        written = site.settings.outputs_dir / hl7_row.path
        assert written.read_bytes().startswith(b"MSH|^~\\&|CXRNODE|")

        site.send([hl7_row])

        (message,) = peer.messages()
    assert str(message.segment("MSH")(9)) == "ORU^R01^ORU_R01"
    assert str(message.segment("OBR")(3)) == "ACC-77" and str(message.segment("OBR")(25)) == "P"
    row = site.row(hl7_row.id)
    assert (row.state, row.last_status, row.attempts) == (OutputState.delivered, "AA", 1)


def test_ae_is_retried_with_backoff_and_ar_is_a_dead_letter(site: Site) -> None:
    with mllp_peer("AE") as peer:
        site = with_destinations(site, [], [f"mllp://127.0.0.1:{peer.port}"])
        (row,) = site.build(site.drafted_job())
        site.send([row])
        retried = site.row(row.id)
        assert (retried.state, retried.last_status, retried.attempts) == (
            OutputState.pending,
            "AE",
            1,
        )
        assert retried.next_try_at > utcnow()
    with mllp_peer("AR") as peer:
        site = with_destinations(site, [], [f"mllp://127.0.0.1:{peer.port}"])
        (row,) = site.build(site.drafted_job())
        site.send([row])
        dead = site.row(row.id)
        assert (dead.state, dead.last_status) == (OutputState.dead, "AR")
        assert "resend --dead" in dead.last_error


def test_a_ris_that_is_down_means_a_retry(site: Site) -> None:
    site = with_destinations(site, [], [f"mllp://127.0.0.1:{free_port()}"])
    (row,) = site.build(site.drafted_job())
    site.send([row])
    retried = site.row(row.id)
    assert (retried.state, retried.last_status) == (OutputState.pending, "no-connection")


def test_resend_of_a_study_adds_rows_per_kind_for_its_own_destinations(site: Site) -> None:
    with mllp_peer("AA") as peer:
        ris = f"mllp://127.0.0.1:{peer.port}"
        first = with_destinations(site, [], [ris])
        (row,) = first.build(first.drafted_job())
        with first.sessions() as session:
            study_uid = session.scalar(
                select(Study.study_instance_uid)
                .join(Job, Job.study_id == Study.id)
                .where(Job.id == row.job_id)
            )
        later = with_destinations(site, [f"PACS@127.0.0.1:{free_port()}"], [ris])
        with later.sessions() as session:
            ids = resend(session, later.settings, study_uid=study_uid)
            rows = list(session.scalars(select(Output).where(Output.id.in_(ids))))
    # the HL7 row is queued again; the new DICOM destination gets no copy of the HL7 message
    assert [(r.kind, r.destination) for r in rows] == [("hl7", ris)]
