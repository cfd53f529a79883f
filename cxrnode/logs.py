"""Logging setup shared by every cxrnode process.

Log lines carry UIDs, AE titles, statuses and reasons; never patient names, IDs or dates.
"""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: str = "INFO") -> None:
    """Configure the root logger once per process (idempotent)."""
    root = logging.getLogger()
    if getattr(root, "_cxrnode_configured", False):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s [{os.getpid()}] %(name)s: %(message)s")
    )
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom logs every PDU at INFO/DEBUG; keep it quiet unless asked for.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))
    # highdicom logs each module it copies from the source (at INFO), with its UIDs
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, root.level))
    # torchao (the optional quantization extra, imported by transformers whenever installed)
    # warns about every CUDA kernel library it cannot load on a CPU host, and torch about
    # torchao's enums: noise in an inference worker's log, not news
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(max(logging.ERROR, root.level))
    root._cxrnode_configured = True  # type: ignore[attr-defined]
