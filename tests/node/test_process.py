"""The process model: every process of a node says in `ps` what it is, dies with its parent,
the workers run at a lower CPU priority than the listeners, spawned children import only
their own work, and the prepare step decodes a bounded number of images at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import dicomgen

from cxrnode.node import WORKER_QUEUES, WORKER_QUEUES_NO_MODEL, worker_queues
from cxrnode.prepare.images import decode_slot, prepare_images
from cxrnode.settings import Settings


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def _nice(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


BECOME = """
import sys, time
from cxrnode.process import become
become("test child", niceness=5)
print("ready", flush=True)
time.sleep(60)
"""

#: A parent that starts BECOME's child, says its pid, and waits to be killed.
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
child.stdout.readline()
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_child_is_titled_runs_below_its_parent_and_dies_with_it_even_by_sigkill() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, BECOME], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert _cmdline(child) == "cxrnode: test child"
        assert _nice(child) == _nice(parent.pid) + 5
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the child outlived its parent"
    finally:
        parent.kill()


#: Run as a script whose top imports the command line, as the `cxrnode` console script does.
SPAWNING_MAIN = """
import sys
from cxrnode.cli import main  # the console script's import
from cxrnode.process import spawn_context
import probe

if __name__ == "__main__":
    child = spawn_context().Process(target=probe.report)
    child.start()
    child.join(60)
"""

PROBE = """
import sys
def report():
    print(sorted(m for m in ("cxrnode.cli", "typer") if m in sys.modules), flush=True)
"""


def test_spawned_children_do_not_import_the_command_line(tmp_path: Path) -> None:
    (tmp_path / "probe.py").write_text(textwrap.dedent(PROBE))
    script = tmp_path / "serve_like.py"
    script.write_text(textwrap.dedent(SPAWNING_MAIN))
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_without_a_model_one_worker_serves_every_queue(tmp_path: Path) -> None:
    assert worker_queues(Settings(data_dir=tmp_path)) == WORKER_QUEUES_NO_MODEL
    assert set(WORKER_QUEUES_NO_MODEL[0].split(",")) == {"prepare", "outputs", "send", "infer"}
    assert worker_queues(Settings(data_dir=tmp_path, model=str(tmp_path))) == WORKER_QUEUES


def test_prepare_waits_for_a_decode_slot(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", prepare_concurrency=1)
    source = dicomgen.make_chest(tmp_path / "chest.dcm")
    slot = decode_slot(settings)
    done = threading.Event()

    def prepare() -> None:
        prepare_images(settings, source, "1.2.3", "1.2.3.4")
        done.set()

    with slot:  # the one slot is taken: prepare must wait
        thread = threading.Thread(target=prepare)
        thread.start()
        assert not done.wait(1.0), "prepare decoded while the only slot was held"
    assert done.wait(60), "prepare did not go on once the slot was free"
    thread.join()


def test_a_running_node_titles_every_process_and_runs_its_workers_below_its_listeners(
    make_node,
) -> None:
    node = make_node()
    deadline = time.monotonic() + 60
    titles: dict[int, str] = {}
    while time.monotonic() < deadline:  # each child sets its title as it starts
        titles = {pid: _cmdline(pid) for pid in _children(node.proc.pid)}
        settled = not [t for t in titles.values() if "multiprocessing.spawn" in t]
        if settled and sum("celeryd" in t for t in titles.values()) == 1:
            break
        time.sleep(0.5)
    supervisor = _cmdline(node.proc.pid)
    assert supervisor.startswith("cxrnode: serve CXRNODE"), supervisor
    listeners = [pid for pid, t in titles.items() if t.startswith("cxrnode: listener ")]
    web = [pid for pid, t in titles.items() if t.startswith("cxrnode: web ")]
    workers = [pid for pid, t in titles.items() if "celeryd" in t]
    broker = [pid for pid, t in titles.items() if t.startswith("/usr/bin/redis-server")]
    assert len(listeners) == 2 and len(web) == 1 and len(broker) == 1, titles
    # no model: one worker for every queue, and no monitor process (a thread of serve)
    assert len(workers) == 1, titles
    assert not [t for t in titles.values() if "multiprocessing.spawn" in t], titles
    assert _nice(workers[0]) >= _nice(listeners[0]) + 10
    assert _nice(listeners[0]) == _nice(node.proc.pid)
