"""`bench/labeler.py`: per-finding table, macro/micro F1, folds and error listing on a tiny CSV."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
HEADER = ["id", "report_text", "atelectasis", "pneumonia", "pleural_effusion", "no_finding"]
# Invented reports; the labels are what a coder would mark (1) or leave blank.
ROWS = [
    ("r1", "Left basal atelectasis.", "1", "", "", ""),
    ("r2", "Right lower lobe pneumonia.", "", "1", "", ""),
    ("r3", "Small right pleural effusion.", "", "", "1", ""),
    ("r4", "Lungs are clear. No effusion.", "", "", "", "1"),
    ("r5", "Possible pneumonia.", "", "1", "", ""),  # a miss: uncertain is not positive
    ("r6", "Mild atelectasis at both bases.", "", "", "", ""),  # a false positive
]


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "reports.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        writer.writerows(ROWS)
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "labeler.py"), str(path), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_bench_prints_a_table_and_a_final_json_line(tmp_path: Path) -> None:
    done = _run(tmp_path, "--min-positives", "1")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].split()[:8] == ["finding", "pos", "TP", "FP", "FN", "prec", "recall", "F1"]
    result = json.loads(lines[-1])
    assert result["reports"] == 6
    assert list(result["findings"]) == [
        "atelectasis",
        "pleural_effusion",
        "pneumonia",
        "no_finding",
    ]
    atelectasis = result["findings"]["atelectasis"]
    assert (atelectasis["tp"], atelectasis["fp"], atelectasis["fn"]) == (1, 1, 0)
    assert atelectasis["precision"] == 0.5 and atelectasis["recall"] == 1.0
    pneumonia = result["findings"]["pneumonia"]
    assert (pneumonia["positives"], pneumonia["tp"], pneumonia["fn"]) == (2, 1, 1)
    f1s = [m["f1"] for m in result["findings"].values()]
    assert abs(result["macro_f1"] - sum(f1s) / len(f1s)) < 1e-9
    # micro: TP 4, FP 1, FN 1 over all four findings
    assert abs(result["micro_f1"] - 8 / 10) < 1e-9
    assert "macro-F1" in done.stdout


def test_findings_with_too_few_positives_are_left_out_of_the_macro(tmp_path: Path) -> None:
    result = json.loads(_run(tmp_path).stdout.strip().splitlines()[-1])
    assert result["min_positives"] == 5
    assert result["macro_over"] == []
    assert result["macro_f1"] is None


def test_folds_partition_the_rows(tmp_path: Path) -> None:
    counts = []
    ids_seen = 0
    for k in (1, 2, 3):
        done = _run(tmp_path, "--split", f"{k}/3", "--seed", "7")
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout.strip().splitlines()[-1])
        counts.append(result["reports"])
        ids_seen += result["reports"]
        rest = json.loads(
            _run(tmp_path, "--split", f"{k}/3", "--seed", "7", "--rest").stdout.splitlines()[-1]
        )
        assert rest["reports"] + result["reports"] == 6
    assert counts == [2, 2, 2] and ids_seen == 6


def test_errors_lists_the_misclassified_reports_of_one_finding(tmp_path: Path) -> None:
    done = _run(tmp_path, "--errors", "atelectasis")
    assert done.returncode == 0, done.stderr
    assert "--- FP r6" in done.stdout
    assert "Mild atelectasis at both bases." in done.stdout
    assert "--- FN" not in done.stdout


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    assert _run(tmp_path, "--errors", "nonsense").returncode != 0
    assert _run(tmp_path, "--split", "4/3").returncode != 0
    assert _run(tmp_path, "--rest").returncode != 0
