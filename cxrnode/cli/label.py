"""`cxrnode label` and `cxrnode eval`: the finding labeler and the paper's F1 evaluation.

Both are plain Typer-ready functions; ``cxrnode.cli`` registers them with
``app.command("label")(label_command)`` and ``app.command("eval")(eval_command)``. Run this module
directly (``python -m cxrnode.cli.label label FILE.csv``) for the same commands without the node's
CLI. Nothing here imports torch at import time: ``eval`` imports the model engine only when it
has to run it (not with ``--reports``).
"""

from __future__ import annotations

import csv as csv_module
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    import numpy as np

    from model.contracts import StudyContext

__all__ = ["eval_command", "label_command", "label_rows", "load_image"]

_INPUT_COLUMNS = ("id", "report_text")
_RASTER_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})


def _fail(command: str, message: str) -> typer.Exit:
    typer.echo(f"cxrnode {command}: {message}", err=True)
    return typer.Exit(2)


def label_rows(rows: Iterable[dict[str, str]]) -> Iterator[list[str]]:
    """The output rows of ``cxrnode label``: header, then ``id`` and one cell per finding.

    Cells are "1", "0", "-1", or "" for not mentioned; ids pass through untouched.
    """
    from model.labeler import FINDINGS, label_report

    yield ["id", *FINDINGS]
    for row in rows:
        labels = label_report(row["report_text"] or "")
        yield [row["id"], *("" if labels[f] is None else str(labels[f]) for f in FINDINGS)]


def label_command(
    file: Annotated[
        Path,
        typer.Argument(
            help="CSV with a header 'id,report_text' (more columns are ignored).",
            exists=True,
            dir_okay=False,
            readable=True,
        ),
    ],
) -> None:
    """Label report texts: present 1 / absent 0 / uncertain -1 / blank per finding, CSV to stdout.

    Output columns: id, atelectasis, cardiomegaly, consolidation, edema, pleural_effusion,
    pneumothorax, pneumonia, lung_opacity, no_finding; rows in input order.
    """
    with file.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv_module.DictReader(handle)
        missing = [c for c in _INPUT_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise _fail(
                "label",
                f"{file}: missing column(s) {missing}; expected a header with "
                f"'id,report_text', found {reader.fieldnames}",
            )
        writer = csv_module.writer(sys.stdout, lineterminator="\n")
        for out in label_rows(reader):
            writer.writerow(out)


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def load_image(path: Path) -> tuple[np.ndarray, StudyContext | None]:
    """Decode one evaluation image to uint8 grayscale, with its study context if DICOM.

    PNG/JPEG go through PIL ``convert("L")``; DICOM through :func:`cxrnode.prepare.display.display_image`
    (modality/VOI LUT, MONOCHROME1 inversion), exactly as the node prepares studies.
    """
    import numpy as np

    if path.suffix.lower() in _RASTER_SUFFIXES and not _is_dicom(path):
        from PIL import Image

        with Image.open(path) as image:
            return np.asarray(image.convert("L"), dtype=np.uint8), None
    from cxrnode.ingest.header import study_context
    from cxrnode.prepare.display import display_image, read_dataset

    dataset = read_dataset(path)
    return display_image(dataset), study_context(dataset)


def _model_reports(
    model: str, paths: Sequence[Path], seed: int, max_new_tokens: int
) -> tuple[list[str], dict[str, str]]:
    """Run the report engine over the images; returns the reports and the model's id/hash."""
    from model.evaluate import generate_reports
    from model.pipeline import ReportEngine

    engine = ReportEngine.load(model)

    def items() -> Iterator[tuple[np.ndarray, StudyContext | None]]:
        for number, path in enumerate(paths, start=1):
            try:
                image, context = load_image(path)
            except Exception as exc:
                raise _fail("eval", f"row {number}: cannot read image {path}: {exc}") from exc
            yield image, context

    reports = generate_reports(engine, items(), seed=seed, max_new_tokens=max_new_tokens)
    return reports, {"id": engine.model_id, "hash": engine.model_hash}


def _stability(
    model: str,
    paths: Sequence[Path],
    table: Any,
    temperatures: str,
    samples: int,
    seed: int,
    max_new_tokens: int,
    json_out: Path | None,
) -> None:
    """``eval --stability``: F1 mean and spread per finding per temperature."""
    from model.pipeline import ReportEngine
    from model.stability import format_stability, stability

    try:
        values = [float(t) for t in temperatures.split(",") if t.strip()]
    except ValueError as exc:
        raise _fail("eval", f"--temperatures must be numbers, e.g. 0.2,0.5,1.0: {exc}") from exc
    if not values or any(t < 0 for t in values):
        raise _fail("eval", "--temperatures needs at least one temperature >= 0")
    items = []
    for number, path in enumerate(paths, start=1):
        try:
            items.append(load_image(path))
        except Exception as exc:
            raise _fail("eval", f"row {number}: cannot read image {path}: {exc}") from exc
    engine = ReportEngine.load(model)
    result = stability(
        engine,
        items,
        table,
        temperatures=values,
        samples=samples,
        seed=seed,
        max_new_tokens=max_new_tokens,
    )
    to_stdout = json_out is not None and str(json_out) == "-"
    print(format_stability(result), file=sys.stderr if to_stdout else sys.stdout)
    if json_out is not None:
        document = json.dumps(result.to_dict(), indent=2)
        if to_stdout:
            print(document)
        else:
            json_out.write_text(document + "\n", encoding="utf-8")


def _default_model() -> str | None:
    from cxrnode.settings import get_settings

    try:
        return get_settings().model
    except Exception:  # invalid unrelated settings must not hide a missing --model
        return None


def eval_command(
    csv: Annotated[
        Path,
        typer.Option(
            "--csv",
            help=(
                "CSV with an 'image' column (path, absolute or relative to the CSV's folder) and "
                "ground-truth columns named like the findings (1 / 0 / -1 / blank)."
            ),
            exists=True,
            dir_okay=False,
            readable=True,
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option("--model", help="Checkpoint directory or hub id; default: the MODEL setting."),
    ] = None,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Also write the results as JSON to this file ('-': stdout)."),
    ] = None,
    bootstrap: Annotated[
        int, typer.Option("--bootstrap", min=0, help="Bootstrap resamples for 95% CIs (0: none).")
    ] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the bootstrap and sampling.")] = 0,
    reports: Annotated[
        str | None,
        typer.Option(
            "--reports",
            help="Score the report text in this column instead of running the model.",
        ),
    ] = None,
    max_new_tokens: Annotated[
        int,
        typer.Option(
            "--max-new-tokens", min=1, help="Token limit per answer (512, as in the paper)."
        ),
    ] = 512,
    stability: Annotated[
        bool,
        typer.Option(
            "--stability",
            help=(
                "Instead: run the set --samples times at each of --temperatures and print "
                "per-finding F1 mean and spread per temperature (the paper's first experiment)."
            ),
        ),
    ] = False,
    temperatures: Annotated[
        str, typer.Option("--temperatures", help="Comma-separated temperatures (--stability).")
    ] = "0.2,0.5,1.0",
    samples: Annotated[
        int, typer.Option("--samples", min=1, help="Sampled runs per temperature (--stability).")
    ] = 10,
) -> None:
    """Score generated reports against ground truth: per-finding precision, recall and F1.

    As in the CXR-LLaVA paper, a finding's pair counts only when both the ground truth and the
    label of the generated report are definite (0/1); the table shows coverage and percentile
    bootstrap 95% CIs. The table goes to stdout (to stderr when '--json -').
    """
    from model.evaluate import format_table, read_table, resolve_image, run

    try:
        table = read_table(csv, need=[reports] if reports else ["image"])
    except (ValueError, UnicodeDecodeError) as exc:
        raise _fail("eval", str(exc)) from exc

    model_info: dict[str, str] | None = None
    if reports is not None:
        texts = [row[reports] or "" for row in table.rows]
    else:
        model_ref = model or _default_model()
        if not model_ref:
            raise _fail(
                "eval",
                "no model: pass --model DIR (or set CXRNODE_MODEL), or score existing report "
                "text with --reports COLUMN",
            )
        paths = [resolve_image(csv, row["image"] or "") for row in table.rows]
        absent = [(i, p) for i, p in enumerate(paths, start=1) if not p.is_file()]
        if absent:
            number, path = absent[0]
            raise _fail(
                "eval",
                f"row {number}: image {path} does not exist ({len(absent)} missing in all); "
                "image paths are taken relative to the CSV's folder unless absolute",
            )
        if stability:
            _stability(
                model_ref, paths, table, temperatures, samples, seed, max_new_tokens, json_out
            )
            return
        texts, model_info = _model_reports(model_ref, paths, seed, max_new_tokens)

    outcome = run(table, texts, resamples=bootstrap, seed=seed, model=model_info)
    to_stdout = json_out is not None and str(json_out) == "-"
    table_stream: IO[str] = sys.stderr if to_stdout else sys.stdout
    print(format_table(outcome.result), file=table_stream)
    if json_out is not None:
        document = json.dumps(outcome.to_dict(), indent=2)
        if to_stdout:
            print(document)
        else:
            json_out.write_text(document + "\n", encoding="utf-8")
