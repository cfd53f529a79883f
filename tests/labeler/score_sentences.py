"""Print the labeler's per-finding accuracy on a labelled sentence file.

Usage: ``python tests/labeler/score_sentences.py [tests/labeler/sentences.tsv ...]``
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from sentence_set import HERE, read_cases, score  # noqa: E402

from model.labeler import FINDINGS, label_report  # noqa: E402


def main(paths: list[str]) -> None:
    for path in [Path(p) for p in paths] or [HERE / "sentences.tsv"]:
        cases = read_cases(path, FINDINGS)
        tally, misses = score(cases, label_report, FINDINGS)
        print(f"{path.name}: {len(cases)} sentences")
        print(f"{'finding':<18}{'correct':>9}{'total':>7}{'accuracy':>10}")
        for name in FINDINGS:
            correct, total = tally[name]
            accuracy = f"{correct / total:.3f}" if total else "-"
            print(f"{name:<18}{correct:>9}{total:>7}{accuracy:>10}")
        correct = sum(c for c, _ in tally.values())
        total = sum(t for _, t in tally.values())
        print(f"{'all labels':<18}{correct:>9}{total:>7}{correct / total:>10.3f}")
        for case, name, want, got in misses:
            print(f"  miss line {case.line}: {name} expected {want} got {got}: {case.text}")


if __name__ == "__main__":
    main(sys.argv[1:])
