"""Which GPUs this process may use, without importing torch.

The worker side runs one inference process per GPU, each started with ``CUDA_VISIBLE_DEVICES``
set to one index, so that inside it the engine always sees its GPU as ``cuda:0``. The parent
(the CLI that starts those processes) must not import torch (the node never does, and CUDA
initialised before a fork is unusable in the child), hence this module: the environment first,
then ``nvidia-smi -L``, and torch only as a last resort when the driver tool is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

_SMI_LINE = re.compile(r"^GPU (\d+):", re.MULTILINE)


def visible_gpus() -> list[int]:
    """Indices of the GPUs this process may hand out, one per inference process.

    ``CUDA_VISIBLE_DEVICES``, when set, is the answer (``""`` or ``-1``: none). Entries that are
    not indices (``GPU-<uuid>``, ``MIG-<uuid>``) are refused with a ``ValueError``, because a
    child given an index would then address a different GPU. Without it, the GPUs that
    ``nvidia-smi -L`` lists; without ``nvidia-smi``, ``torch.cuda.device_count()``.
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return parse_visible_devices(env)
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            listing = subprocess.run(
                [smi, "-L"], capture_output=True, text=True, timeout=20, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            listing = None
        if listing is not None and listing.returncode == 0:
            return [int(m) for m in _SMI_LINE.findall(listing.stdout)]
    try:
        import torch
    except ImportError:
        return []
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def parse_visible_devices(value: str) -> list[int]:
    """``CUDA_VISIBLE_DEVICES`` -> indices, in order, up to the first invalid one (CUDA's rule).

    CUDA ignores everything from the first entry that is not a valid device; ``-1`` is the usual
    way to hide every GPU.
    """
    out: list[int] = []
    for entry in value.split(","):
        entry = entry.strip()
        if not entry:
            break
        if not re.fullmatch(r"-?\d+", entry):
            raise ValueError(
                f"CUDA_VISIBLE_DEVICES={value!r} names GPUs by {entry!r}; give indices (0,1,...) "
                "so that each inference process can be handed one."
            )
        index = int(entry)
        if index < 0:
            break
        out.append(index)
    return out
