"""`cxrnode eval --reports COLUMN`: the metric path on report text, without a model."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.evaluate import evaluate
from model.labeler import label_report

ROOT = Path(__file__).parents[2]

REPORTS = [
    ("Mild cardiomegaly. Small left pleural effusion.", "1", "1", ""),
    ("Heart size is normal. No effusion.", "0", "0", ""),
    ("Heart size is normal. Small right effusion.", "1", "1", ""),
    ("Cardiomegaly. No pleural effusion.", "0", "0", ""),
    ("Possible small effusion. Borderline heart size.", "1", "1", ""),
    ("Lungs are clear.", "0", "", "1"),
    ("Enlarged cardiac silhouette. No pneumothorax.", "1", "0", ""),
    ("No acute process.", "0", "0", "1"),
]


def _csv(tmp_path: Path) -> Path:
    path = tmp_path / "reports.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "generated", "cardiomegaly", "pleural_effusion", "no_finding"])
        for i, (text, cm, pe, nf) in enumerate(REPORTS):
            writer.writerow([f"s{i}", text, cm, pe, nf])
    return path


def _eval(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cxrnode", "eval", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _expected(bootstrap: int, seed: int) -> dict:
    names = ("cardiomegaly", "pleural_effusion", "no_finding")
    labelled = [label_report(text) for text, *_ in REPORTS]
    truth = {
        name: [int(row[1 + i]) if row[1 + i] else None for row in REPORTS]
        for i, name in enumerate(names)
    }
    predicted = {name: [labels[name] for labels in labelled] for name in names}
    return evaluate(truth, predicted, resamples=bootstrap, seed=seed).to_dict()


def test_eval_on_report_text_prints_the_table_and_writes_the_same_json(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    done = _eval(
        "--csv",
        str(_csv(tmp_path)),
        "--reports",
        "generated",
        "--json",
        str(out),
        "--bootstrap",
        "200",
        "--seed",
        "5",
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:4] == ["finding", "rows", "definite", "coverage"]
    assert [line.split()[0] for line in lines[1:4]] == [
        "cardiomegaly",
        "pleural_effusion",
        "no_finding",
    ]
    assert lines[4].startswith("mean F1 over 2 findings (cardiomegaly, pleural_effusion)")
    document = json.loads(out.read_text())
    expected = _expected(bootstrap=200, seed=5)
    for key in ("rows", "findings", "mean_f1", "mean_f1_ci", "mean_f1_findings", "bootstrap"):
        assert document[key] == expected[key], key
    assert document["model"] is None
    assert [r["report"] for r in document["per_row"]] == [text for text, *_ in REPORTS]
    # Definite cardiomegaly pairs: 6 of 8. "Borderline heart size" counts as cardiomegaly (the
    # labeler's policy), and "Lungs are clear" / "No acute process" do not mention the heart,
    # so those rows drop out.
    assert document["findings"]["cardiomegaly"]["definite"] == 6
    assert document["findings"]["cardiomegaly"]["coverage"] == 6 / 8
    cm = document["findings"]["cardiomegaly"]
    assert f"{cm['f1']:.3f}" in lines[1]


def test_eval_json_dash_writes_only_json_to_stdout(tmp_path: Path) -> None:
    done = _eval(
        "--csv", str(_csv(tmp_path)), "--reports", "generated", "--json", "-", "--bootstrap", "0"
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["findings"] == _expected(bootstrap=0, seed=0)["findings"]
    assert document["findings"]["pleural_effusion"]["f1_ci"] is None
    assert done.stderr.splitlines()[0].startswith("finding")


def test_eval_without_a_model_says_how_to_give_one(tmp_path: Path) -> None:
    path = tmp_path / "images.csv"
    path.write_text("image,edema\na.png,1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXRNODE_")}
    env["CXRNODE_DATA_DIR"] = str(tmp_path / "data")
    done = _eval("--csv", str(path), env=env)
    assert done.returncode == 2
    assert "--model" in done.stderr and "--reports" in done.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("image,comment\na.png,x\n", "no ground-truth column"),
        ("image,edema\na.png,2\n", "row 1, column 'edema'"),
        ("id,edema\na,1\n", "missing column(s) ['image']"),
    ],
)
def test_eval_refuses_a_bad_csv_with_the_reason(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    done = _eval("--csv", str(path), "--model", str(tmp_path))
    assert done.returncode == 2
    assert message in done.stderr


def test_eval_names_the_first_missing_image(tmp_path: Path) -> None:
    path = tmp_path / "images.csv"
    path.write_text("image,edema\nmissing.png,1\n")
    done = _eval("--csv", str(path), "--model", str(tmp_path))
    assert done.returncode == 2
    assert "row 1" in done.stderr and "missing.png" in done.stderr


def test_images_load_as_uint8_grayscale_like_the_node_prepares_them(tmp_path: Path) -> None:
    import dicomgen
    import numpy as np
    from PIL import Image

    from cxrnode.cli.label import load_image
    from cxrnode.prepare.display import display_image

    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    image, context = load_image(tmp_path / "x.png")
    assert context is None and image.dtype == np.uint8
    assert np.array_equal(image, np.asarray(Image.fromarray(rgb).convert("L")))

    path = dicomgen.make_chest(tmp_path / "c.dcm", photometric="MONOCHROME1", view="AP")
    image, context = load_image(path)
    assert np.array_equal(image, display_image(path))
    assert context is not None and context.view == "AP"
    assert set(context.to_dict()) == {"age_years", "sex", "view"}
