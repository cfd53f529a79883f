"""What one audit record costs the process that writes it, and how fast the forwarder drains.

    .venv/bin/python bench/audit.py [--records 2000]

* emit: ``auditor(settings).emit(message)`` = build the XML, append under the directory lock,
  fdatasync (what a web request or the listener's end of association pays), p50 / p95 / max;
* build only: the XML without the write, for comparison (the rest is the disk's fdatasync);
* drain: records per second the forwarder sends to a real rsyslog over TLS (tests'
  collector), when one is installed (rsyslogd + rsyslog-gnutls), from the spool on disk.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from cxrnode.audit import auditor  # noqa: E402
from cxrnode.audit import messages as m  # noqa: E402
from cxrnode.settings import Settings  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp) / "node")
        a = auditor(settings)
        study = m.StudyObject("1.2.826.0.1.3680043.10.543.7", "PID-0042")
        build, emit = [], []
        for i in range(args.records):
            started = time.perf_counter()
            message = m.instances_accessed(a.node, f"user{i}", "10.0.0.1", study)
            message.xml()
            build.append(time.perf_counter() - started)
            started = time.perf_counter()
            a.emit(m.instances_accessed(a.node, f"user{i}", "10.0.0.1", study))
            emit.append(time.perf_counter() - started)
        for name, values in (("build only", build), ("emit (build+append+fdatasync)", emit)):
            print(
                f"{name:32s} p50 {statistics.median(values) * 1e3:7.3f} ms  "
                f"p95 {percentile(values, 0.95) * 1e3:7.3f} ms  max {max(values) * 1e3:7.3f} ms"
            )
        if Path("/usr/sbin/rsyslogd").exists():
            from syslogcollector import Collector

            from cxrnode.audit.syslog import SyslogForwarder

            collector = Collector(Path(tmp) / "collector")
            collector.start()
            try:
                forward = Settings(
                    data_dir=settings.data_dir,
                    audit_syslog=collector.url,
                    audit_syslog_ca=collector.ca,
                )
                forwarder = SyslogForwarder(forward, a.files)
                started = time.perf_counter()
                sent = forwarder.send_pending()
                elapsed = time.perf_counter() - started
                print(
                    f"drain to rsyslog over TLS: {sent} records in {elapsed:.2f} s = "
                    f"{sent / elapsed:.0f} records/s"
                )
            finally:
                collector.stop()


if __name__ == "__main__":
    main()
