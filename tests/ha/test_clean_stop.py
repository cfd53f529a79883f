"""A node stops cleanly whatever order the signal reaches its processes in.

systemd's default stop (SIGTERM to every process of the unit) and Ctrl-C in a terminal
(SIGINT to the whole process group) reach the embedded redis-server, the workers, the
listeners and the supervisor at once. The node must still end with status 0 and without a
traceback (the scheduler used to log one when the broker went first). SIGTERM to every
process at once is tested at the end of tests/ha/test_destination_probe.py (one node less).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable

from services import Node, wait_for


def test_ctrl_c_to_the_whole_process_group_ends_the_node_without_a_traceback(
    make_node: Callable[..., Node],
) -> None:
    node = make_node()

    def workers_up() -> bool:
        answer = node.cli("status", "--json", check=False)
        if answer.returncode != 0:
            return False
        return len(json.loads(answer.stdout).get("workers") or []) >= 2

    wait_for(workers_up, 120, "both workers' heartbeats", interval=1.0)
    assert node.proc is not None
    os.killpg(node.proc.pid, signal.SIGINT)
    assert node.proc.wait(90) == 0, node.log()[-4000:]
    log = node.log()
    assert "cxrnode stopped" in log, log[-4000:]
    assert "Traceback" not in log, log[-6000:]
    assert "scheduler pass failed" not in log, log[-4000:]
