"""The LLaMA decoder run over a static KV cache addressed by slot.

``SlotDecoder`` owns one preallocated key/value buffer per layer, ``[slots, kv_heads, capacity,
head_dim]``, and runs the decoder layers of ``CXRLLaVAModel.llama`` over it with its own attention
step (the projections, norms, RoPE and MLP are the checkpoint's modules, called as transformers
calls them). A study holds one slot for its whole conversation. In a slot, cache column ``c``
holds RoPE position ``c``: there is no left padding and no hole, so a row's arithmetic never
depends on the other rows, and a study can take a free slot between two decode steps while the
others keep decoding (continuous batching, ``model.scheduler``).

What a row may see is ``column <= position`` of the query: columns past a row's length hold stale
values from earlier turns or a longer answer that was cut, and are overwritten before they are
ever visible. Cutting a row back (prefix reuse, a stop found late) is therefore free: the caller
lowers the row's position.

Three forward passes:

* ``prefill`` with every row starting at column 0 (a new study's first turn): causal attention on
  the fresh keys only, ``is_causal=True``, which SDPA runs as flash attention on CUDA; rows are
  right-padded, and padding never reaches a real query under a causal mask.
* ``prefill`` continuing rows (a follow-up turn): the new keys are written first, then each query
  attends to its row's cache up to its own position.
* ``decode``: one token per slot, written at the slot's position; attention over the first
  ``width`` columns (rounded up to a bucket, so only what is filled is read). On CUDA the step is
  captured once per bucket as a CUDA graph and replayed, so a step costs one launch; its inputs
  are the static tensors ``tokens`` and ``positions``, which the scheduler updates in place.
  If a capture fails (driver, memory, an operation that cannot be captured), the decoder logs
  one warning and decodes eagerly from then on: slower, same tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from model.compat import apply_rotary_pos_emb
from model.modeling import CXRLLaVAModel

log = logging.getLogger(__name__)

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def kv_bytes_per_token(model: CXRLLaVAModel, dtype: torch.dtype | None = None) -> int:
    """Bytes of keys and values one position takes in the cache, over all layers."""
    cfg = model.llama.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    element = torch.empty((), dtype=dtype or model.dtype).element_size()
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * element


class SlotDecoder:
    """A ``slots`` x ``capacity`` KV cache and the decoder passes that read and write it.

    Parameters
    ----------
    model:
        The loaded model; its LLaMA layers are used as they are (quantized ones included).
    slots:
        Rows of the cache: the most studies that decode together.
    capacity:
        Columns per row. The last one is scratch (idle rows and padding may write there), so a
        row holds at most ``capacity - 1`` positions.
    cuda_graphs:
        Capture the decode step as CUDA graphs (default: on CUDA devices).
    bucket:
        Decode attention reads ``width`` columns rounded up to a multiple of this; on CUDA there
        is one graph per width used. Default 256 with CUDA graphs (few graphs), else 16.
    """

    def __init__(
        self,
        model: CXRLLaVAModel,
        slots: int,
        capacity: int,
        *,
        cuda_graphs: bool | None = None,
        bucket: int | None = None,
    ) -> None:
        if slots < 1 or capacity < 2:
            raise ValueError(f"need slots >= 1 and capacity >= 2, found {slots} and {capacity}.")
        capacity = -(-capacity // 16) * 16  # aligned masks keep SDPA on its fused kernels
        self.model = model
        self.slots = slots
        self.capacity = capacity
        self.device = model.device
        self.dtype = model.dtype
        cfg = model.llama.config
        self.layers = list(model.llama.layers[: cfg.num_hidden_layers])
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.gqa = self.num_kv_heads != self.num_heads
        shape = (slots, self.num_kv_heads, capacity, self.head_dim)
        dev = self.device
        if dev.type == "cuda":
            _check_fits(dev, slots, capacity, kv_bytes_per_token(model, self.dtype))
        # Zeros, not empty: masked columns are multiplied by a zero weight, and 0 * NaN is NaN.
        self.k = [torch.zeros(shape, dtype=self.dtype, device=dev) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=dev) for _ in self.layers]
        # Static inputs of the decode step (updated in place by the scheduler).
        self.tokens = torch.zeros(slots, dtype=torch.long, device=dev)
        self.positions = torch.zeros(slots, dtype=torch.long, device=dev)
        self.logits = torch.zeros(slots, model.config.vocab_size, dtype=torch.float32, device=dev)
        self._rows = torch.arange(slots, device=dev)
        self._columns = torch.arange(capacity, device=dev)
        self.cuda_graphs = dev.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and dev.type != "cuda":
            raise ValueError("cuda_graphs=True needs a CUDA device.")
        self.bucket = bucket or (256 if self.cuda_graphs else 16)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None

    @property
    def nbytes(self) -> int:
        """Bytes held by the KV cache."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def width_for(self, columns: int) -> int:
        """Columns the decode attention reads to cover ``columns``: a bucket multiple."""
        width = -(-columns // self.bucket) * self.bucket
        return max(1, min(width, self.capacity))

    # ------------------------------------------------------------------ layers
    def _layers(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        attend: Attend,
    ) -> torch.Tensor:
        """Run every decoder layer on ``x`` [B, W, hidden] at RoPE ``positions`` [B, W].

        The same operations as transformers' ``LlamaDecoderLayer`` (pre-norm, residuals, the
        checkpoint's projections), except that attention is ``attend``; the layout relied on
        is checked against the installed transformers by :func:`model.compat.require`.
        """
        cos, sin = self.model.llama.rotary_emb(x, positions)
        batch, width, _ = x.shape
        shape = (batch, width, -1, self.head_dim)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(shape).transpose(1, 2)  # [B, heads, W, head_dim]
            k = attn.k_proj(h).view(shape).transpose(1, 2)  # [B, kv_heads, W, head_dim]
            v = attn.v_proj(h).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            o = attend(i, q, k, v)  # [B, heads, W, head_dim]
            o = o.transpose(1, 2).reshape(batch, width, -1).contiguous()
            x = x + attn.o_proj(o)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x

    def _logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """[B, hidden] last positions -> [B, vocab] float32 (the final norm is per position)."""
        return self.model.logits(self.model.llama.norm(last_hidden)).float()

    def _sdpa(self, q, k, v, **kwargs) -> torch.Tensor:
        if self.gqa:
            kwargs["enable_gqa"] = True
        return F.scaled_dot_product_attention(q, k, v, **kwargs)

    # ------------------------------------------------------------------ prefill
    def prefill(
        self, slots: Sequence[int], starts: Sequence[int], embeds: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Write ``embeds[i]`` ([n_i, hidden]) into slot ``slots[i]`` from column ``starts[i]``.

        Returns the next-token logits after each row's last new position, [len(slots), vocab].
        The caller guarantees ``starts[i] + n_i <= capacity - 1``.
        """
        rows = len(slots)
        lengths = [int(e.shape[0]) for e in embeds]
        if rows == 0 or min(lengths) == 0:
            raise ValueError("prefill needs at least one new position in every row.")
        width = max(lengths)
        end = max(s + n for s, n in zip(starts, lengths, strict=True))
        if end > self.capacity - 1:
            raise ValueError(f"prefill reaches column {end}; capacity is {self.capacity - 1}.")
        dev = self.device
        x = torch.zeros(rows, width, embeds[0].shape[-1], dtype=self.dtype, device=dev)
        for i, e in enumerate(embeds):
            x[i, : lengths[i]] = e.to(self.dtype)
        start = torch.tensor(list(starts), dtype=torch.long, device=dev)
        positions = start[:, None] + torch.arange(width, device=dev)[None, :]  # [rows, W]
        columns = positions.clamp(max=self.capacity - 1)  # padding may spill into scratch
        slot = torch.tensor(list(slots), dtype=torch.long, device=dev)
        fresh = not any(starts)
        if fresh:

            def attend(i, q, k, v):
                self.k[i][slot[:, None], :, columns] = k.transpose(1, 2)
                self.v[i][slot[:, None], :, columns] = v.transpose(1, 2)
                return self._sdpa(q, k, v, is_causal=True)

        else:
            seen = self.width_for(end)
            visible = (self._columns[:seen][None, None, :] <= positions[:, :, None])[:, None]

            def attend(i, q, k, v):
                self.k[i][slot[:, None], :, columns] = k.transpose(1, 2)
                self.v[i][slot[:, None], :, columns] = v.transpose(1, 2)
                keys = self.k[i][slot, :, :seen]
                values = self.v[i][slot, :, :seen]
                return self._sdpa(q, keys, values, attn_mask=visible)

        hidden = self._layers(x, positions, attend)
        last = torch.tensor([n - 1 for n in lengths], device=dev)
        return self._logits(hidden[torch.arange(rows, device=dev), last])

    # ------------------------------------------------------------------ decode
    def decode(self, columns: int) -> torch.Tensor:
        """One step for every slot: feed ``tokens`` at ``positions``; logits [slots, vocab].

        ``columns`` bounds ``positions + 1`` over the slots (the scheduler knows it without
        reading the device). Idle slots compute too and write at their own position, which is
        past their valid data; the returned tensor is reused by the next call.
        """
        width = self.width_for(columns)
        if not self.cuda_graphs:
            self.logits.copy_(self._decode_step(width))
            return self.logits
        graph = self._graphs.get(width)
        if graph is None:
            try:
                graph = self._capture(width)
            except Exception as exc:
                self._fall_back_to_eager(exc)
                self.logits.copy_(self._decode_step(width))
                return self.logits
        graph.replay()
        return self.logits

    def _fall_back_to_eager(self, exc: BaseException) -> None:
        """Give up CUDA graphs for this decoder after a failed capture (one warning)."""
        log.warning(
            "CUDA graph capture failed (%s: %s); decoding without graphs from now on",
            type(exc).__name__,
            str(exc).splitlines()[0][:200] if str(exc) else "",
        )
        self.cuda_graphs = False
        self._graphs.clear()
        self._pool = None

    def warm_up(self) -> None:
        """Capture the decode graphs of every width now (CUDA), not in the middle of serving.

        Only for an empty cache: it writes at the slots' current positions (0 when empty).
        """
        if not self.cuda_graphs:
            return
        with torch.inference_mode():
            for width in range(self.bucket, self.capacity + self.bucket, self.bucket):
                self.decode(min(width, self.capacity))
                if not self.cuda_graphs:  # a capture failed: eager from now on
                    return

    def _decode_step(self, width: int) -> torch.Tensor:
        positions = self.positions[:, None]  # [S, 1]
        x = self.model.embed_tokens(self.tokens[:, None])  # [S, 1, hidden]
        visible = (self._columns[:width][None, :] <= positions)[:, None, None, :]  # [S,1,1,W]
        column = self.positions.clamp(max=self.capacity - 1)

        def attend(i, q, k, v):
            self.k[i][self._rows, :, column] = k[:, :, 0]
            self.v[i][self._rows, :, column] = v[:, :, 0]
            keys, values = self.k[i][:, :, :width], self.v[i][:, :, :width]
            return self._sdpa(q, keys, values, attn_mask=visible)

        return self._logits(self._layers(x, positions, attend)[:, -1])

    def _capture(self, width: int) -> torch.cuda.CUDAGraph:
        """Record the decode step for ``width`` columns (CUDA only).

        The warm-up runs write the keys of the current tokens at the current positions, exactly
        what the real step writes, so they change nothing the next replay would not.
        """
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.logits.copy_(self._decode_step(width))
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self.logits.copy_(self._decode_step(width))
        self._graphs[width] = graph
        return graph


def _check_fits(device: torch.device, slots: int, capacity: int, per_token: int) -> None:
    """Refuse a KV cache that cannot fit, with the numbers to choose a smaller one."""
    need = slots * capacity * per_token
    free, _ = torch.cuda.mem_get_info(device)
    if need > 0.9 * free:
        gib = 1024**3
        fits = int(0.9 * free // (capacity * per_token))
        raise ValueError(
            f"a KV cache of {slots} slots x {capacity} positions needs {need / gib:.1f} GiB but "
            f"{free / gib:.1f} GiB of {device} is free; use at most {fits} slots at this "
            "capacity (max_batch), or a smaller capacity, or quantized weights."
        )
