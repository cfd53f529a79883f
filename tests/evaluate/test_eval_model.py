"""`cxrnode eval` end to end: a tiny checkpoint drafts reports for PNG, JPEG and DICOM images.

The tiny model writes gibberish, so this checks the plumbing and the arithmetic, not quality:
the table and JSON have the promised shape, every generated report was labelled with the
labeler, and the metrics are exactly what :mod:`model.evaluate` computes from those labels.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import dicomgen
import numpy as np
import pytest
import typer
from click.testing import Result
from PIL import Image
from typer.testing import CliRunner

from cxrnode.cli.label import eval_command, label_command
from model.evaluate import evaluate, parse_label
from model.labeler import FINDINGS, label_report

TRUTH_COLUMNS = ("cardiomegaly", "pleural_effusion", "pneumonia", "no_finding")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def image_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four images of three kinds, one given by absolute path, and labels with gaps."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (96, 80), dtype=np.uint8)).save(folder / "a.png")
    rgb = rng.integers(0, 256, (64, 72, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "b.jpg", quality=90)
    dicomgen.make_chest(folder / "dicom" / "c.dcm", photometric="MONOCHROME1", view="AP")
    Image.fromarray(np.full((50, 70), 200, np.uint8)).save(folder / "d.png")
    rows = [
        ("a.png", "1", "0", "", ""),
        ("b.jpg", "0", "1", "-1", ""),
        ("dicom/c.dcm", "1", "", "0", ""),
        (str(folder / "d.png"), "0", "0", "0", "1"),
    ]
    path = folder / "truth.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", *TRUTH_COLUMNS])
        writer.writerows(rows)
    return path


def _eval(csv_path: Path, model: Path, *extra: str) -> Result:
    """Run `eval` in this process (the model is already imported here) on a real Typer app."""
    app = typer.Typer()
    app.command("label")(label_command)
    app.command("eval")(eval_command)
    args = ["eval", "--csv", str(csv_path), "--model", str(model), "--max-new-tokens", "12"]
    return CliRunner().invoke(app, [*args, *extra], catch_exceptions=False)


@pytest.fixture(scope="module")
def first_run(
    tiny_model: Path, image_set: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, dict]:
    out = tmp_path_factory.mktemp("run") / "eval.json"
    done = _eval(image_set, tiny_model, "--json", str(out), "--bootstrap", "100", "--seed", "3")
    assert done.exit_code == 0, done.output
    return done.stdout, json.loads(out.read_text())


def test_eval_runs_the_model_labels_its_reports_and_scores_them(
    tiny_model: Path, image_set: Path, first_run: tuple[str, dict]
) -> None:
    stdout, document = first_run
    lines = stdout.splitlines()
    assert lines[0].split()[:2] == ["finding", "rows"]
    assert [line.split()[0] for line in lines[1:5]] == list(TRUTH_COLUMNS)
    assert lines[5].startswith("mean F1 over ")

    assert document["model"]["id"] == str(tiny_model)
    assert re.fullmatch(r"[0-9a-f]{64}", document["model"]["hash"])
    per_row = document["per_row"]
    assert [r["image"] for r in per_row][:3] == ["a.png", "b.jpg", "dicom/c.dcm"]
    assert all(isinstance(r["report"], str) for r in per_row) and len(per_row) == 4

    # Every prediction is the labeler's reading of that row's report ...
    for row in per_row:
        labels = label_report(row["report"])
        assert row["predicted"] == {f: labels[f] for f in TRUTH_COLUMNS}
    # ... and every metric is what the pure functions compute from the labels.
    with image_set.open(newline="") as handle:
        truth_rows = list(csv.DictReader(handle))
    truth = {f: [parse_label(r[f]) for r in truth_rows] for f in TRUTH_COLUMNS}
    predicted = {f: [r["predicted"][f] for r in per_row] for f in TRUTH_COLUMNS}
    expected = evaluate(truth, predicted, resamples=100, seed=3).to_dict()
    for key in ("rows", "findings", "mean_f1", "mean_f1_ci", "mean_f1_findings"):
        assert document[key] == expected[key], key
    # The uncertain and blank ground truth never counts, whatever the model said.
    assert document["findings"]["pneumonia"]["definite"] <= 2
    assert set(document["findings"]) <= set(FINDINGS)


def test_eval_with_the_same_seed_gives_the_same_reports_and_intervals(
    tiny_model: Path, image_set: Path, first_run: tuple[str, dict]
) -> None:
    again = _eval(image_set, tiny_model, "--json", "-", "--bootstrap", "100", "--seed", "3")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout) == first_run[1]
    assert again.stderr == first_run[0]  # with "--json -" the table moves to stderr


@pytest.mark.slow  # several sampled runs of the whole set
def test_eval_stability_reports_f1_mean_and_spread_per_temperature(
    tiny_model: Path, image_set: Path, tmp_path: Path
) -> None:
    """The paper's first experiment: n sampled runs per temperature; each run's F1 is what
    scoring that run's reports gives, and the table shows mean and spread."""
    from model.evaluate import generate_reports, read_table, resolve_image, run
    from model.pipeline import ReportEngine

    out = tmp_path / "stability.json"
    args = ("--stability", "--samples", "2", "--temperatures", "0.5,1.0", "--json", str(out))
    done = _eval(image_set, tiny_model, *args)
    assert done.exit_code == 0, done.output
    assert "T=0.5 mean±sd" in done.output and "T=1 mean±sd" in done.output
    document = json.loads(out.read_text())
    assert document["samples"] == 2 and set(document["temperatures"]) == {"0.5", "1.0"}
    cardiomegaly = document["temperatures"]["1.0"]["cardiomegaly"]
    assert len(cardiomegaly["runs"]) == 2

    # Run 1 at T=1.0 again, by hand: the same reports, the same F1.
    table = read_table(image_set, need=["image"])
    from cxrnode.cli.label import load_image

    items = [load_image(resolve_image(image_set, row["image"])) for row in table.rows]
    engine = ReportEngine.load(tiny_model)
    reports = generate_reports(
        engine, items, seed=1000, temperature=1.0, report_only=True, max_new_tokens=12
    )
    by_hand = run(table, reports, resamples=0).result.by_name()["cardiomegaly"].f1
    assert cardiomegaly["runs"][1] == by_hand
    defined = [v for v in cardiomegaly["runs"] if v is not None]
    if defined:
        assert cardiomegaly["mean"] == pytest.approx(sum(defined) / len(defined))
