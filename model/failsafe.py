"""What a failure of the model's device means for the studies on it.

The report server (``model.serving``) and the decoder (``model.decoder``) sort a failure into:

* **out of memory** (``torch.OutOfMemoryError``, CUDA's or the allocator's message): the batch
  was too big for what the device has free now. Halving the batch and running the same studies
  again loses nothing; failing them would turn a sizing problem into lost drafts.
* **device lost** (``torch.AcceleratorError`` or a CUDA error message: illegal address,
  launch failure, ECC error, fallen off the bus): the CUDA context is unusable for the rest of
  the process. Only a new process can use the GPU again, so the inference worker exits and is
  restarted by its supervisor; the node re-sends the studies it held.
* anything else: the studies running in that step fail (and are retried by their task).
"""

from __future__ import annotations

import re

import torch

_OOM = re.compile(r"out of memory|CUBLAS_STATUS_ALLOC_FAILED|CUDNN_STATUS_ALLOC_FAILED", re.I)
_LOST = re.compile(
    r"CUDA error|CUDA driver error|device-side assert|illegal memory access|illegal address|"
    r"unspecified launch failure|uncorrectable ECC|fallen off the bus|GPU is lost|"
    r"CUBLAS_STATUS_(EXECUTION_FAILED|INTERNAL_ERROR)|cudaErrorLaunchFailure|NVML",
    re.I,
)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the device ran out of memory (recoverable with a smaller batch)."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and bool(_OOM.search(str(exc)))
    )


def is_device_lost(exc: BaseException) -> bool:
    """Whether ``exc`` leaves the process's CUDA context unusable (only a restart helps)."""
    if is_out_of_memory(exc):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", ())
    if accelerator_error and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and bool(_LOST.search(str(exc)))
