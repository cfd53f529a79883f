"""The paper's first experiment as a function: how stable is per-finding F1 across samples?

CXR-LLaVA's failure signature is variance across repeated inferences; the paper measures F1
over 10 sampled runs. :func:`stability` runs a labelled set ``n`` times at each temperature of
a list (each run with its own seed, the report turn only, as the paper scores only the report),
scores every run as ``cxrnode eval`` does (:func:`model.evaluate.run`), and reports each
finding's F1 mean and spread (population standard deviation, min, max) per temperature. On the
tiny test model the numbers are meaningless; on real weights they tell a site which findings
it may trust at its temperature, and whether self-consistency (``CONSENSUS_SAMPLES``) is worth
its cost.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.evaluate import Table, generate_reports, run

__all__ = ["Spread", "StabilityResult", "format_stability", "stability"]


@dataclass(frozen=True)
class Spread:
    """F1 of one finding over the runs at one temperature (None where a run had no F1)."""

    runs: tuple[float | None, ...]

    @property
    def defined(self) -> list[float]:
        return [value for value in self.runs if value is not None]

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.defined) if self.defined else None

    @property
    def std(self) -> float | None:
        return statistics.pstdev(self.defined) if len(self.defined) > 1 else None

    def to_dict(self) -> dict[str, Any]:
        values = self.defined
        return {
            "mean": self.mean,
            "std": self.std,
            "min": min(values) if values else None,
            "max": max(values) if values else None,
            "runs": list(self.runs),
        }


@dataclass(frozen=True)
class StabilityResult:
    """Per temperature: per finding (and ``mean_f1``) the spread of F1 over ``samples`` runs."""

    samples: int
    seed: int
    by_temperature: dict[float, dict[str, Spread]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "seed": self.seed,
            "temperatures": {
                str(t): {name: spread.to_dict() for name, spread in findings.items()}
                for t, findings in self.by_temperature.items()
            },
        }


def stability(
    engine: Any,
    items: Sequence[tuple[np.ndarray, Any]],
    table: Table,
    *,
    temperatures: Sequence[float],
    samples: int = 10,
    seed: int = 0,
    **generate_options: Any,
) -> StabilityResult:
    """Run ``items`` (image, context) ``samples`` times per temperature and score each run
    against ``table`` (the same rows, in order). Run r at every temperature uses seed
    ``seed + 1000 * r``; ``generate_options`` go to ``engine.generate``."""
    if samples < 1 or not temperatures:
        raise ValueError("stability needs samples >= 1 and at least one temperature")
    out: dict[float, dict[str, Spread]] = {}
    for temperature in temperatures:
        runs: dict[str, list[float | None]] = {}
        for r in range(samples):
            reports = generate_reports(
                engine,
                items,
                seed=seed + 1000 * r,
                temperature=temperature,
                report_only=True,
                **generate_options,
            )
            result = run(table, reports, resamples=0).result
            for metrics in result.findings:
                runs.setdefault(metrics.finding, []).append(metrics.f1)
            runs.setdefault("mean_f1", []).append(result.mean_f1)
        out[float(temperature)] = {name: Spread(tuple(values)) for name, values in runs.items()}
    return StabilityResult(samples, seed, out)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_stability(result: StabilityResult) -> str:
    """One table: a row per finding, per temperature its F1 mean ± standard deviation."""
    temperatures = list(result.by_temperature)
    names = list(next(iter(result.by_temperature.values())))
    header = ["finding", *(f"T={t:g} mean±sd" for t in temperatures)]
    rows = [header]
    for name in names:
        row = [name]
        for t in temperatures:
            spread = result.by_temperature[t][name]
            row.append(f"{_cell(spread.mean)}±{_cell(spread.std)}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"F1 over {result.samples} sampled runs per temperature (seed {result.seed}).")
    return "\n".join(lines)
