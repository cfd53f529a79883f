"""`cxrnode monitor`: how often the AI draft agreed with the radiologist (registered in
``cxrnode.cli``)."""

from __future__ import annotations

import csv
import io
import json
from typing import Annotated, Any

import typer

from cxrnode.settings import get_settings

_CSV_COLUMNS = (
    "window",
    "model",
    "model_hash",
    "finding",
    "studies",
    "pairs",
    "tp",
    "fp",
    "fn",
    "tn",
)
_MEASURES = ("sensitivity", "ppv", "specificity", "f1", "kappa")


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _interval(interval: list[float] | None) -> str:
    return "-" if interval is None else f"{interval[0]:.2f}-{interval[1]:.2f}"


def render_table(windows: list[dict[str, Any]], wrong: list[dict[str, Any]]) -> str:
    """The terminal form: one table per window, then the disagreements."""
    lines: list[str] = []
    for window in windows:
        days = window["window_days"]
        title = "all time" if days is None else f"last {days} days"
        if window["since"]:
            title += f" (since {window['since'][:16].replace('T', ' ')} UTC)"
        lines.append(f"AI draft vs radiologist, {title}: {window['studies']} studies")
        if not window["rows"]:
            lines.append("  (no study with both a draft and a radiologist's report)")
            lines.append("")
            continue
        lines.append(
            f"  {'model':<17}{'finding':<17}{'studies':>8}{'pairs':>6}{'TP':>4}{'FP':>4}"
            f"{'FN':>4}{'TN':>4}{'sens':>7}{'PPV':>7}{'spec':>7}{'F1':>7}  {'F1 95% CI':<10}"
            f"{'kappa':>7}  {'kappa 95% CI':<12}"
        )
        for row in window["rows"]:
            lines.append(
                f"  {row['model']:<17}{row['finding']:<17}{row['studies']:>8}{row['pairs']:>6}"
                f"{row['tp']:>4}{row['fp']:>4}{row['fn']:>4}{row['tn']:>4}"
                f"{_cell(row['sensitivity']):>7}{_cell(row['ppv']):>7}"
                f"{_cell(row['specificity']):>7}{_cell(row['f1']):>7}  "
                f"{_interval(row['f1_ci']):<10}{_cell(row['kappa']):>7}  "
                f"{_interval(row['kappa_ci']):<12}".rstrip()
            )
        lines.append("")
    if wrong:
        lines.append(
            "Definite disagreements, newest report first (study, finding, AI, radiologist):"
        )
        for item in wrong:
            lines.append(
                f"  {item['study_instance_uid']}  {item['finding']:<17}{item['ai']:<10}"
                f"{item['radiologist']:<14}model {item['model']}  report {item['report_id']}"
            )
    else:
        lines.append("No definite disagreements.")
    return "\n".join(lines)


def render_csv(windows: list[dict[str, Any]]) -> str:
    """One row per window, model and finding; each measure with its interval bounds."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    header = list(_CSV_COLUMNS)
    for measure in _MEASURES:
        header += [measure, f"{measure}_ci_low", f"{measure}_ci_high"]
    writer.writerow(header)
    for window in windows:
        for row in window["rows"]:
            cells: list[Any] = [row[column] for column in _CSV_COLUMNS]
            for measure in _MEASURES:
                interval = row[f"{measure}_ci"] or [None, None]
                cells += [row[measure], *interval]
            writer.writerow(["" if cell is None else cell for cell in cells])
    return out.getvalue()


def monitor_command(
    window: Annotated[
        list[int] | None,
        typer.Option(
            "--window",
            help="Days of a rolling window (repeat for several; 0: all time). "
            "Default: MONITOR_WINDOWS_DAYS and all time.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV rows on stdout.")] = False,
    finding: Annotated[
        str | None, typer.Option(help="List disagreements of this finding only.")
    ] = None,
    disagreements: Annotated[
        int, typer.Option("--disagreements", help="How many disagreements to list.")
    ] = 20,
    resamples: Annotated[
        int, typer.Option(help="Bootstrap resamples for the 95% intervals (0: none).")
    ] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
) -> None:
    """AI draft vs radiologist per finding and model: sensitivity, PPV, specificity, F1 and
    Cohen's kappa with 95% intervals, over rolling windows and all time; and the studies
    where they disagreed."""
    from cxrnode.db import make_engine, make_sessionmaker
    from cxrnode.db.migrate import upgrade
    from cxrnode.monitor.agreement import disagreements as list_disagreements
    from cxrnode.monitor.agreement import summary

    if as_json and as_csv:
        typer.echo("cxrnode monitor: choose --json or --csv, not both", err=True)
        raise typer.Exit(2)
    if resamples < 0 or disagreements < 0:
        typer.echo("cxrnode monitor: --resamples and --disagreements must be >= 0", err=True)
        raise typer.Exit(2)
    try:
        settings = get_settings()
    except Exception as exc:  # pydantic's message names the option and the problem
        typer.echo(f"cxrnode: invalid settings: {exc}", err=True)
        raise typer.Exit(2) from exc
    days: list[int | None] = (
        [None if d == 0 else d for d in window]
        if window
        else [*settings.monitor_windows_days, None]
    )
    if any(d is not None and d < 0 for d in days):
        typer.echo("cxrnode monitor: --window takes days >= 0", err=True)
        raise typer.Exit(2)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.effective_database_url)
    try:
        upgrade(engine)  # a node that never ran yet has no tables
        reader = make_engine(settings.effective_database_url, read_only=True)
        with make_sessionmaker(reader)() as session:
            windows = [summary(session, settings, d, resamples=resamples, seed=seed) for d in days]
            try:
                widest = None if None in days else max(d for d in days if d is not None)
                wrong = list_disagreements(
                    session, window_days=widest, finding=finding, limit=disagreements
                )
            except ValueError as exc:
                typer.echo(f"cxrnode monitor: {exc}", err=True)
                raise typer.Exit(2) from exc
        reader.dispose()
    finally:
        engine.dispose()
    if as_json:
        typer.echo(json.dumps({"windows": windows, "disagreements": wrong}, indent=2))
    elif as_csv:
        typer.echo(render_csv(windows), nl=False)
    else:
        typer.echo(render_table(windows, wrong))
