"""What every process of a node does about itself: its title, its parent, its CPU priority.

`cxrnode serve` is one supervisor and its children (listeners, web app, workers, broker).
The supervisor titles itself; each child it spawns (listeners, web app) calls :func:`become`
first thing; the workers get their priority from `cxrnode worker` (:func:`lower_priority`
before it execs Celery, which titles them ``[celeryd: <queues>...]``). So that

- ``ps`` says what each is (``cxrnode: listener 0 (CXRNODE)``) instead of the
  ``python -c from multiprocessing.spawn ...`` every spawned child would otherwise show;
- a child dies with the supervisor, even when the supervisor is killed with SIGKILL
  (``PR_SET_PDEATHSIG``): a node never leaves orphans holding its ports;
- background work yields the CPU to the listeners (:func:`lower_priority`): the PACS waits
  while a C-STORE is unanswered, while prepare and outputs can wait a moment."""

from __future__ import annotations

import ctypes
import importlib.machinery
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from multiprocessing.context import SpawnContext

log = logging.getLogger(__name__)

__all__ = [
    "TITLE_PREFIX",
    "become",
    "die_with_parent",
    "lower_priority",
    "set_title",
    "spawn_context",
]

#: Every title starts with this, so ``pgrep -a cxrnode:`` lists a node's processes.
TITLE_PREFIX = "cxrnode: "

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: make the kernel kill this process when its parent dies (even by SIGKILL)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # pragma: no cover - not Linux
        pass


def set_title(what: str) -> None:
    """Show ``cxrnode: <what>`` in ``ps``/``top`` for this process (argv and comm)."""
    import setproctitle

    setproctitle.setproctitle(TITLE_PREFIX + what)
    # the thread name is what `top` and /proc/<pid>/comm show (15 bytes)
    setproctitle.setthreadtitle(("cxr " + what)[:15])


def lower_priority(niceness: int) -> int:
    """Raise this process's nice value by ``niceness`` (lower CPU priority; 0: unchanged).

    Returns the nice value now in force. Lowering priority needs no privilege; a failure
    (a sandbox forbidding it) is logged once and the process runs on at its priority.
    """
    if niceness <= 0:
        return os.getpriority(os.PRIO_PROCESS, 0)
    try:
        return os.nice(niceness)
    except OSError as exc:  # pragma: no cover - refused by a sandbox
        log.warning("cannot lower this process's CPU priority: %s", exc)
        return os.getpriority(os.PRIO_PROCESS, 0)


def become(what: str, *, niceness: int = 0, with_parent: bool = True) -> None:
    """The first call of every child process: title, death with the parent, priority."""
    if with_parent:
        die_with_parent()
    set_title(what)
    lower_priority(niceness)


def spawn_context() -> SpawnContext:
    """multiprocessing's spawn context, set so that a child imports its target's module only.

    A spawned child first re-runs the parent's main module, unless that module is a package's
    ``__main__`` (``python -m cxrnode``). Started from the ``cxrnode`` console script, every
    child would import the whole command line (typer and every command's imports) before its
    own work, and hold what its own work never uses. The script's main
    module is the command line's entry point, ``cxrnode.__main__`` in effect: saying so makes
    multiprocessing leave it alone in the children.
    """
    main = sys.modules.get("__main__")
    if main is not None and getattr(main, "__spec__", None) is None:
        main.__spec__ = importlib.machinery.ModuleSpec("cxrnode.__main__", None)
    return multiprocessing.get_context("spawn")


def supervised_child(target: Callable[..., object], *args: object) -> None:
    """Run a supervised child process's ``target``, deaf to SIGINT.

    Ctrl-C reaches the whole process group; the supervisor stops its children itself, in
    order, with SIGTERM. A child that took the SIGINT too would die mid-work with a
    KeyboardInterrupt traceback (uvicorn re-raises it after its own shutdown). It lives here,
    not in :mod:`cxrnode.node`: a spawned child imports its target's module, and this one
    imports nothing of the node's, so a listener loads the listener's modules only.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    target(*args)
