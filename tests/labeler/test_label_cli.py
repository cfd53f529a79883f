"""`cxrnode label FILE.csv`: ids round-trip, columns and values exactly as specified."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import typer
from typer.testing import CliRunner

from cxrnode.cli.label import eval_command, label_command
from model.labeler import label_report

ROOT = Path(__file__).parents[2]
HEADER = [
    "id",
    "atelectasis",
    "cardiomegaly",
    "consolidation",
    "edema",
    "pleural_effusion",
    "pneumothorax",
    "pneumonia",
    "lung_opacity",
    "no_finding",
]
ROWS = [
    ("z-last-alphabetically", "Mild cardiomegaly. No pleural effusion."),
    ("id, with a comma", "Possible right lower lobe pneumonia."),
    ('id "with" quotes', "Heart size is normal. Lungs are clear."),
    ("id\nwith a newline", "Small left effusion; no pneumothorax."),
    ("  spaced  ", ""),
    ("a-first-alphabetically", "Bibasilar atelectasis versus consolidation."),
]


def _label(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cxrnode", "label", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _write(path: Path, header: list[str], rows: list[tuple[str, ...]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_label_round_trips_ids_in_order_with_the_specified_columns(tmp_path: Path) -> None:
    done = _label(_write(tmp_path / "in.csv", ["id", "report_text"], ROWS))
    assert done.returncode == 0, done.stderr
    out = list(csv.reader(io.StringIO(done.stdout)))
    assert out[0] == HEADER
    assert [row[0] for row in out[1:]] == [row_id for row_id, _ in ROWS]
    for (_, text), row in zip(ROWS, out[1:], strict=True):
        expected = label_report(text)
        assert row[1:] == ["" if expected[c] is None else str(expected[c]) for c in HEADER[1:]]
    # Spot-check the values themselves, not only their agreement with the library.
    assert out[1][HEADER.index("cardiomegaly")] == "1"
    assert out[1][HEADER.index("pleural_effusion")] == "0"
    assert out[2][HEADER.index("pneumonia")] == "-1"
    assert out[3][HEADER.index("no_finding")] == "1"
    assert set(out[5][1:]) == {""}


def test_label_ignores_extra_columns_and_accepts_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("\ufeffreport_text,site,id\nNo pneumothorax.,x,7\n", encoding="utf-8")
    done = _label(path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1] == "7,,,,,,0,,,1"


def test_label_names_the_missing_column_and_exits_2(tmp_path: Path) -> None:
    done = _label(_write(tmp_path / "in.csv", ["id", "text"], [("1", "No effusion.")]))
    assert done.returncode == 2
    assert "report_text" in done.stderr and done.stdout == ""


def test_commands_register_on_a_typer_app_as_the_main_cli_does(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command("label")(label_command)
    app.command("eval")(eval_command)
    path = _write(tmp_path / "in.csv", ["id", "report_text"], [("1", "Mild pulmonary edema.")])
    result = CliRunner().invoke(app, ["label", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [",".join(HEADER), "1,,,,1,,,,,"]
    help_text = CliRunner().invoke(app, ["eval", "--help"]).output
    for option in ("--csv", "--model", "--json", "--bootstrap", "--seed", "--reports"):
        assert option in help_text


def test_cli_module_imports_neither_torch_nor_the_model_engine() -> None:
    code = (
        "import sys, cxrnode.cli.label\n"
        "loaded = [m for m in ('torch', 'transformers', 'model.pipeline') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)
