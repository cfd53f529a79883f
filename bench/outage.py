"""Destination outages of a set length: how soon after the destination returns is the draft there?

    .venv/bin/python bench/outage.py                      # 100, 200 and 400 s, probe on and off
    .venv/bin/python bench/outage.py --outages 90 102     # the lengths from issue 22
    .venv/bin/python bench/outage.py --probe-seconds 10 --no-baseline

For each outage length, in the same run and at the same time, two `cxrnode serve` nodes (the
tiny model, the embedded broker, default retry settings: 30 s doubling to 10 min) draft one
study each for a dcmtk storescp "PACS" that is down when the draft is made and comes back
after the outage: one node probes the destination (DESTINATION_PROBE_SECONDS, default 10),
the other relies on the outbox's backoff alone (DESTINATION_PROBE_SECONDS=0). Printed per
length and node: seconds from the PACS's return to the draft's arrival, and the ratio.

The outages run in parallel, so the run takes about the longest outage plus a minute.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from tempfile import mkdtemp

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "web")]

import dicomgen  # noqa: E402
from services import Node, node_env, storescu, wait_for  # noqa: E402
from webnode import Pacs  # noqa: E402


@dataclass
class Trial:
    outage: float
    probe_seconds: float
    delay: float | None = None  # seconds from the PACS's return to the draft's arrival
    error: str | None = None


def run_trial(trial: Trial, root: Path, model: Path) -> None:
    name = f"outage{trial.outage:g}-probe{trial.probe_seconds:g}"
    pacs = Pacs(root / name / "pacs")
    data = root / name / "node"
    node = Node(
        data,
        node_env(
            data,
            model=str(model),
            destinations=pacs.destination,
            temperature="0",
            max_new_tokens="8",
            destination_probe_seconds=str(trial.probe_seconds),
            scp_processes="1",
        ),
    )
    try:
        node.start()
        image = dicomgen.make_chest(root / name / "study.dcm", modality="CR", seed=7)
        assert storescu(node.port, image).returncode == 0
        # the outage starts when the first try failed (the draft exists and waits)
        wait_for(
            lambda: json.loads(node.cli("status", "--json").stdout)["destinations_down"],
            300,
            "the first failed try",
            interval=1.0,
        )
        time.sleep(trial.outage)
        pacs.start()
        returned = time.monotonic()
        wait_for(lambda: len(pacs.received()) >= 2, trial.outage + 900, "delivery", 0.5)
        trial.delay = time.monotonic() - returned
    except Exception as exc:  # reported in the table, not a traceback per thread
        trial.error = f"{type(exc).__name__}: {exc}"
    finally:
        pacs.stop()
        node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outages", type=float, nargs="+", default=[100.0, 200.0, 400.0])
    parser.add_argument("--probe-seconds", type=float, default=10.0)
    parser.add_argument("--no-baseline", action="store_true", help="skip the nodes without probe")
    parser.add_argument("--model", type=Path, help="a checkpoint (default: make the tiny one)")
    args = parser.parse_args()

    root = Path(mkdtemp(prefix="cxrnode-outage-"))
    model = args.model
    if model is None:
        import subprocess

        model = root / "tiny-model"
        subprocess.run(
            [str(REPO / ".venv" / "bin" / "cxrnode"), "model", "make-tiny", str(model)],
            check=True,
            capture_output=True,
        )
    probes = [args.probe_seconds] + ([] if args.no_baseline else [0.0])
    trials = [Trial(outage, probe) for outage in args.outages for probe in probes]
    threads = [threading.Thread(target=run_trial, args=(t, root, model)) for t in trials]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    print(f"{'outage':>8} {'probe':>8} {'delivered after return':>24}")
    for trial in trials:
        probe = f"{trial.probe_seconds:g} s" if trial.probe_seconds else "off"
        found = f"{trial.delay:.1f} s" if trial.delay is not None else f"FAILED: {trial.error}"
        print(f"{trial.outage:>7g}s {probe:>8} {found:>24}")
    for outage in args.outages:
        on = next(t for t in trials if t.outage == outage and t.probe_seconds)
        off = next((t for t in trials if t.outage == outage and not t.probe_seconds), None)
        if off and on.delay and off.delay:
            print(f"outage {outage:g} s: backoff alone takes {off.delay / on.delay:.1f}x longer")
    print(f"(files under {root})")


if __name__ == "__main__":
    main()
