"""The priority table and what an urgent draft's objects say, as pure functions."""

from __future__ import annotations

import pytest

from cxrnode.outputs.common import series_description
from cxrnode.outputs.marks import DraftMarks, marked_series_description
from cxrnode.settings import Settings
from cxrnode.triage import Priority, order_priority, parse_priority_table, triage
from cxrnode.uids import OutputKind

DEFAULT = parse_priority_table(Settings.model_fields["triage_priorities"].default)


def test_the_default_table_follows_the_worklist_study() -> None:
    expected = {
        "pneumothorax": Priority.stat,
        "pleural_effusion": Priority.asap,
        "consolidation": Priority.asap,
    }
    assert expected == DEFAULT
    assert triage({"pneumothorax": "present"}, DEFAULT).priority is Priority.stat
    assert triage({"consolidation": "present"}, DEFAULT).priority is Priority.asap
    assert triage({"cardiomegaly": "present"}, DEFAULT).priority is Priority.routine
    assert triage({"pneumothorax": "uncertain"}, DEFAULT).priority is Priority.routine


def test_the_most_urgent_finding_leads_and_all_are_named() -> None:
    decision = triage({"pleural_effusion": "present", "pneumothorax": "present"}, DEFAULT)
    assert decision.suspected == ("pneumothorax", "pleural_effusion")
    assert decision.label == "SUSPECTED PNEUMOTHORAX"


def test_the_order_priority_is_never_lowered_and_alone_makes_no_urgent_draft() -> None:
    stat_order = order_priority("STAT")
    routine_draft = triage({"cardiomegaly": "present"}, DEFAULT, stat_order)
    assert routine_draft.priority is Priority.stat and not routine_draft.urgent
    asap = triage({"pleural_effusion": "present"}, DEFAULT, stat_order)
    assert asap.priority is Priority.stat and asap.urgent
    assert order_priority("LOW") is Priority.routine and order_priority(None) is None


@pytest.mark.parametrize("text", ["off", "OFF", ""])
def test_triage_can_be_turned_off(text: str) -> None:
    table = parse_priority_table(text)
    assert table == {} and not triage({"pneumothorax": "present"}, table).urgent


@pytest.mark.parametrize(
    "text", ["pneumothorax", "fracture=stat", "pneumothorax=urgent", "no_finding=stat"]
)
def test_a_bad_table_is_refused_naming_the_entry(text: str) -> None:
    with pytest.raises(ValueError, match="TRIAGE_PRIORITIES entry"):
        Settings(triage_priorities=text)


def test_a_site_may_rank_other_findings() -> None:
    table = parse_priority_table("edema=stat, pneumothorax=asap")
    assert triage({"edema": "present"}, table).priority is Priority.stat
    assert triage({"pneumothorax": "present"}, table).priority is Priority.asap
    assert Priority.stat.hl7 == "S" and Priority.asap.hl7 == "A" and Priority.routine.hl7 == "R"


@pytest.mark.parametrize("kind", list(OutputKind))
@pytest.mark.parametrize("suspected", ["SUSPECTED PNEUMOTHORAX", "SUSPECTED PLEURAL EFFUSION"])
def test_marked_series_descriptions_lead_with_the_finding_and_fit_lo(
    kind: OutputKind, suspected: str
) -> None:
    text = marked_series_description(series_description(kind), suspected)
    assert text.startswith(suspected + " - AI DRAFT") and len(text) <= 64
    assert marked_series_description(series_description(kind), None) == series_description(kind)
    long = marked_series_description(series_description(kind), "SUSPECTED " + "X" * 80)
    assert long.startswith("SUSPECTED XX") and "AI DRAFT" in long and len(long) <= 64


def test_vote_texts() -> None:
    marks = DraftMarks(samples=5, votes={"edema": {"present": 3, "absent": 2}})
    assert marks.agreement("edema", "present") == "3 of 5 samples"
    assert marks.agreement("edema", "uncertain") == "samples split 3 Present, 2 Absent"
    assert DraftMarks().agreement("edema", "present") is None
    assert DraftMarks(suspected="SUSPECTED EDEMA").banner == (
        "AI DRAFT — SUSPECTED EDEMA — NOT VERIFIED"
    )
