"""Weight-only quantization of the LLaMA layers with torchao, for GPUs with 16-24 GB.

Only the decoder's linear layers (q, k, v, o, gate, up, down: 6.5 of the 7.05 B parameters) are
quantized. The vision tower, the projector, the embeddings and the LM head stay in the model
dtype, as the T4 users of the reference did (docs/model.md, "Precision"): they are small, and the image path and
the last projection are where rounding would show most.

* ``"int8"``: per-output-channel int8 weights (``Int8WeightOnlyConfig``), about 7 GB of LLaMA
  weights instead of 13.5 GB. Runs on CPU and CUDA. On the CPU, torchao's int8 linear converts
  the whole weight back to floating point on every call, which makes a decode step several times
  slower than bf16; there, the int8 values and scales torchao computed are run by
  ``PackedInt8Linear`` instead: torch's int8 matrix-vector kernel for decode steps (reads one
  byte a weight), a dequantized matmul for prefill (where that kernel is slow). Same rounding.
* ``"int4"``: 4-bit weights in groups of ``INT4_GROUP`` input channels. On CUDA this is torchao's
  tinygemm layout (``Int4WeightOnlyConfig``, bf16 only), about 3.6 GB. On CPU, torchao 0.18 has
  no packed int4 kernel without extra packages, so the same 4-bit rounding is simulated with
  ``IntxWeightOnlyConfig(int4)`` (values stored one per byte: no memory saving, but the same
  rounding error, which is what the agreement figures measure).

Layers whose input width is not a multiple of the group size stay unquantized (``skipped``).
"""

from __future__ import annotations

import logging
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

Quantization = Literal["int8", "int4"] | None
CHOICES = ("int8", "int4")
INT4_GROUP = 128
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class QuantizationUnavailable(RuntimeError):
    """torchao is missing or cannot quantize on this device."""


def _torchao():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao.quantization as tq
    except ImportError as exc:
        raise QuantizationUnavailable(
            "weight quantization needs torchao (pip install --no-deps torchao==0.18.0; "
            "--no-deps keeps the installed torch)."
        ) from exc
    return tq


class PackedInt8Linear(nn.Module):
    """A weight-only int8 linear layer for the CPU (see the module docstring).

    ``weight`` holds the int8 values [out, in] and ``scales`` one scale per output row, in the
    activations' dtype: ``y = x @ (weight * scales).T + bias``. Calls with at most
    ``DECODE_ROWS`` rows (decode steps) use ``torch._weight_int8pack_mm``; larger ones (prefill)
    dequantize the weight for one matmul.
    """

    DECODE_ROWS = 16

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scales", scales.reshape(-1).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_torchao(cls, linear: nn.Linear, dtype: torch.dtype) -> PackedInt8Linear | None:
        """The layer torchao quantized, repacked; None when its layout is not symmetric
        per-row int8 (then torchao's own module stays)."""
        w = linear.weight
        qdata, scale = getattr(w, "qdata", None), getattr(w, "scale", None)
        zero = getattr(w, "zero_point", None)
        if qdata is None or scale is None or qdata.dtype != torch.int8:
            return None
        if scale.numel() != qdata.shape[0] or (zero is not None and bool(zero.any())):
            return None
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(qdata.detach(), scale.detach().to(dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] <= self.DECODE_ROWS:
            out = torch._weight_int8pack_mm(flat.contiguous(), self.weight, self.scales)
        else:
            out = F.linear(flat, self.weight.to(x.dtype) * self.scales[:, None])
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_layer(layer: nn.Module, mode: str, device: torch.device) -> list[str]:
    """Quantize the linear layers of one decoder layer in place; return the names skipped."""
    if mode not in CHOICES:
        raise ValueError(f"quantize must be one of {CHOICES} or None, found {mode!r}.")
    tq = _torchao()
    skipped = []
    for name, module in list(layer.named_modules()):
        if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] not in LINEAR_NAMES:
            continue
        if mode == "int8":
            dtype = module.weight.dtype
            tq.quantize_(module, tq.Int8WeightOnlyConfig(), filter_fn=_any_linear)
            packed = PackedInt8Linear.from_torchao(module, dtype) if device.type == "cpu" else None
            if packed is not None:
                parent_name, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent_name) if parent_name else layer, child, packed)
            continue
        group = _group_size(module.in_features)
        if group is None:
            skipped.append(name)
            continue
        config = _int4_config(tq, group, device, module.weight.dtype)
        tq.quantize_(module, config, filter_fn=_any_linear)
    return skipped


def _any_linear(module: nn.Module, _name: str) -> bool:
    return isinstance(module, nn.Linear)


def _group_size(in_features: int) -> int | None:
    for group in (INT4_GROUP, 64, 32):
        if in_features % group == 0:
            return group
    return None


def _int4_config(tq, group: int, device: torch.device, dtype: torch.dtype):
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            raise QuantizationUnavailable(
                f"int4 on CUDA uses torchao's tinygemm kernel, which needs bf16 weights; the "
                f"model is {dtype}. Load it with dtype=torch.bfloat16 or use quantize='int8'."
            )
        return tq.Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d")
    from torchao.quantization.granularity import PerGroup

    return tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group))


def quantize_decoder(model: nn.Module, mode: str) -> list[str]:
    """Quantize every decoder layer of ``model.llama`` in place, layer by layer (each layer is
    moved to the model's device first, so the full-precision decoder never has to fit there)."""
    device = model.lm_head.weight.device
    skipped = []
    for i, layer in enumerate(model.llama.layers):
        layer.to(device)
        skipped += [f"llama.layers.{i}.{n}" for n in quantize_layer(layer, mode, device)]
    if skipped:
        log.warning("%d linear layers left unquantized (width not a multiple of 32)", len(skipped))
    return skipped
