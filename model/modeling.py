"""CXR-LLaVA v2: vision tower -> linear projector -> LLaMA decoder -> untied LM head.

Module tree (names are the checkpoint's, docs/model.md, "Checkpoint"; no renaming table)::

    vision_tower   VisionTransformer            [B, 1, 512, 512] -> [B, 1024, 1024]
    mm_projector   nn.Linear(1024 -> hidden)    one linear layer with bias, not an MLP
    llama          transformers.LlamaModel      built from config.json["llama"]
    lm_head        nn.Linear(hidden -> vocab)   no bias, not tied to llama.embed_tokens

The text/image interleaving lives in ``model.generate``; this module only provides the pieces:
``encode_images`` (pixels -> projected image embeddings), ``embed_tokens`` and ``logits``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from model import compat
from model.config import CXRLLaVAConfig
from model.vision import VisionTransformer

SUPPORTED_ATTENTION = ("sdpa", "eager")


def llama_config(config: CXRLLaVAConfig, attn_implementation: str | None = None) -> LlamaConfig:
    """``LlamaConfig(**config.llama)``, as the reference builds it, with our attention choice.

    Checks first that the installed transformers has what the decoder re-runs
    (:func:`model.compat.require`): every model is built through here."""
    compat.require()
    cfg = LlamaConfig(**config.llama)
    impl = attn_implementation or config.attn_implementation or "sdpa"
    if impl not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"attention implementation {impl!r} is not supported; expected one of "
            f"{SUPPORTED_ATTENTION} (the decode loop passes padded 2-D masks)."
        )
    compat.set_attention(cfg, impl)
    return cfg


class CXRLLaVAModel(nn.Module):
    """The four checkpoint modules; builds on whatever device is current (``meta`` included)."""

    def __init__(self, config: CXRLLaVAConfig, attn_implementation: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = VisionTransformer(config.vision, output_dim=config.clip_embed_dim)
        self.mm_projector = nn.Linear(config.mm_projector_dim, config.hidden_size)
        self.llama = LlamaModel(llama_config(config, attn_implementation))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def reset_rotary(self) -> None:
        """Recompute the RoPE inverse frequencies in float32 on the model's device.

        They are a non-persistent buffer (not in the checkpoint). Keeping them in float32 matters:
        the reference computes cos/sin from float32 frequencies and only then rounds to bf16.
        """
        self.llama.rotary_emb = LlamaRotaryEmbedding(config=self.llama.config).to(self.device)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 1, H, W] float pixels -> [B, N, hidden] image embeddings in the model dtype."""
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        tokens = self.vision_tower(pixels)
        return self.mm_projector(tokens.to(self.dtype))

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llama.embed_tokens(ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
