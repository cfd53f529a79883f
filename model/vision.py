"""The grayscale vision tower: open_clip's ``VisionTransformer`` in the layout the checkpoint uses.

Tensor names (``vision_tower.`` prefix added by the parent module, docs/model.md, "Checkpoint")::

    conv1.weight                        [W, 1, P, P]      patch embedding, no bias
    class_embedding                     [W]
    positional_embedding                [1 + N, W]        N = (image / patch)^2 = 1024
    ln_pre.{weight,bias}                [W]
    transformer.resblocks.K.ln_1.*      [W]
    transformer.resblocks.K.attn.in_proj_weight / in_proj_bias   [3W, W] / [3W]  (q; k; v)
    transformer.resblocks.K.attn.out_proj.{weight,bias}          [W, W] / [W]
    transformer.resblocks.K.ln_2.*      [W]
    transformer.resblocks.K.mlp.c_fc.*  [4W, W] / [4W]
    transformer.resblocks.K.mlp.c_proj.* [W, 4W] / [W]
    ln_post.{weight,bias}               [W]
    proj                                [W, clip_embed_dim]  (CLIP head; unused by the LLM path)

The forward used for the LLM is the reference's ``encode_images`` (docs/model.md, "Architecture"), not open_clip's
``VisionTransformer.forward``: ``ln_post`` is applied to *all* tokens, then the CLS token is
dropped and the patch tokens go to the projector. Attention is ``torch.nn.MultiheadAttention``
run sequence-first, exactly as open_clip calls it, so the packed ``in_proj`` semantics are
torch's own.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from model.config import VisionConfig


class LayerNorm(nn.LayerNorm):
    """open_clip's LayerNorm: computed in the input dtype and cast back to it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        orig = x.dtype
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(orig)


class LayerScale(nn.Module):
    """Per-channel residual scale (``ls_init_value``); absent in the published checkpoint."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``; input is [L, B, W]."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        width, eps = cfg.width, cfg.layer_norm_eps
        self.ln_1 = LayerNorm(width, eps=eps)
        self.attn = nn.MultiheadAttention(width, cfg.heads)  # sequence-first, packed in_proj
        self.ls_1 = (
            LayerScale(width, cfg.ls_init_value) if cfg.ls_init_value is not None else nn.Identity()
        )
        self.ln_2 = LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, cfg.mlp_width)),
                    ("gelu", nn.GELU(**(cfg.act_kwargs or {}))),  # exact erf GELU by default
                    ("c_proj", nn.Linear(cfg.mlp_width, width)),
                ]
            )
        )
        self.ls_2 = (
            LayerScale(width, cfg.ls_init_value) if cfg.ls_init_value is not None else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.ls_1(self.attn(h, h, h, need_weights=False)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    """The stack of residual blocks, named ``resblocks`` as in open_clip."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTransformer(nn.Module):
    """One-channel ViT whose ``forward`` returns the tokens the LLM sees: [B, N, W]."""

    def __init__(self, cfg: VisionConfig, output_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        width, eps = cfg.width, cfg.layer_norm_eps
        self.conv1 = nn.Conv2d(1, width, kernel_size=cfg.patch_hw, stride=cfg.patch_hw, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(cfg.num_patches + 1, width))
        self.ln_pre = nn.Identity() if cfg.no_ln_pre else LayerNorm(width, eps=eps)
        self.transformer = Transformer(cfg)
        self.ln_post = LayerNorm(width, eps=eps)
        self.proj = nn.Parameter(torch.empty(width, output_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 1, H, W] normalised pixels -> [B, N, W] tokens after ``ln_post``, CLS dropped."""
        x = self.conv1(pixels)  # [B, W, gh, gw]
        x = x.flatten(2).transpose(1, 2)  # [B, N, W], row-major grid order
        cls = self.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # [B, 1 + N, W]
        x = x + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = self.transformer(x.transpose(0, 1)).transpose(0, 1)  # blocks run sequence-first
        # With final_ln_after_pool, ln_post touches only the pooled CLS, which the LLM never sees.
        tokens = x if self.cfg.final_ln_after_pool else self.ln_post(x)
        return tokens if self.cfg.pool_type == "none" else tokens[:, 1:]
