"""The checkpoint's ``config.json``, parsed into plain dataclasses (no torch import).

The published file (docs/model.md, "config.json") carries the vision tower as a partial open_clip ``CLIPVisionCfg``
(only ``image_size``, ``layers``, ``patch_size`` and ``width``; every other field takes the
dataclass default), the one-channel normalisation constants, the projector width and the full
serialised ``LlamaConfig`` under ``llama``. Every size used to build the model comes from here;
nothing about the 7B model is hard-coded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.json"

# The reference caps generation with ``getattr(config, "max_position_embeddings", 2048)`` on the
# *top-level* config, which has no such field (it only lives under ``llama``), so 2048 applies.
REFERENCE_CONTEXT_FALLBACK = 2048


class ConfigError(ValueError):
    """``config.json`` is missing, unreadable or describes a model this package cannot build."""


@dataclass(frozen=True)
class VisionConfig:
    """open_clip ``CLIPVisionCfg`` with its defaults; only the fields the reference reads.

    The reference hard-codes one input channel and ``torch.nn.GELU`` (exact) and ignores
    ``clip_quick_gelu``; heads are ``width // head_width``.
    """

    layers: int = 12
    width: int = 768
    head_width: int = 64
    mlp_ratio: float = 4.0
    patch_size: int = 16
    image_size: int = 224
    ls_init_value: float | None = None
    patch_dropout: float = 0.0
    attentional_pool: bool = False
    attn_pooler_queries: int = 256
    attn_pooler_heads: int = 8
    no_ln_pre: bool = False
    pos_embed_type: str = "learnable"
    final_ln_after_pool: bool = False
    pool_type: str = "tok"
    output_tokens: bool = False
    act_kwargs: dict[str, Any] | None = None
    norm_kwargs: dict[str, Any] | None = None
    timm_model_name: str | None = None
    timm_model_pretrained: bool = False
    timm_pool: str = "avg"
    timm_proj: str = "linear"
    timm_proj_bias: bool = False
    timm_drop: float = 0.0
    timm_drop_path: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"clip_vision_cfg has keys {unknown} that open_clip's CLIPVisionCfg does not define; "
                f"expected a subset of {sorted(known)}. Check that config.json is a CXR-LLaVA v2 config."
            )
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.timm_model_name:
            raise ConfigError(
                f"clip_vision_cfg.timm_model_name={self.timm_model_name!r}: timm vision towers are not "
                "part of CXR-LLaVA v2; expected the open_clip VisionTransformer (timm_model_name null)."
            )
        if self.attentional_pool:
            raise ConfigError(
                "clip_vision_cfg.attentional_pool is set; CXR-LLaVA v2 uses token pooling "
                "(attentional_pool false) and this implementation supports only that."
            )
        if self.pool_type not in ("tok", "avg", "none"):
            raise ConfigError(
                f"clip_vision_cfg.pool_type={self.pool_type!r}; expected 'tok', 'avg' or 'none'."
            )
        if self.pos_embed_type not in ("learnable", "sin_cos_2d"):
            raise ConfigError(
                f"clip_vision_cfg.pos_embed_type={self.pos_embed_type!r}; expected 'learnable' "
                "(or 'sin_cos_2d', whose table is stored in the checkpoint)."
            )
        if self.width % self.head_width != 0 or self.width < self.head_width:
            raise ConfigError(
                f"clip_vision_cfg width={self.width} is not a positive multiple of head_width="
                f"{self.head_width}; the tower needs width // head_width attention heads."
            )
        h, w = self.image_hw
        ph, pw = self.patch_hw
        if h % ph or w % pw:
            raise ConfigError(
                f"image_size {self.image_hw} is not a multiple of patch_size {self.patch_hw}."
            )

    @property
    def image_hw(self) -> tuple[int, int]:
        return _pair(self.image_size)

    @property
    def patch_hw(self) -> tuple[int, int]:
        return _pair(self.patch_size)

    @property
    def grid(self) -> tuple[int, int]:
        (h, w), (ph, pw) = self.image_hw, self.patch_hw
        return h // ph, w // pw

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid
        return gh * gw

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def layer_norm_eps(self) -> float:
        return float((self.norm_kwargs or {}).get("eps", 1e-5))

    @property
    def num_image_tokens(self) -> int:
        """Tokens handed to the LLM per image: the patch tokens, plus CLS only for pool 'none'."""
        return self.num_patches + (1 if self.pool_type == "none" else 0)


@dataclass(frozen=True)
class CXRLLaVAConfig:
    """Everything needed to build CXR-LLaVA v2 and prepare its inputs."""

    vision: VisionConfig
    clip_embed_dim: int
    image_mean: float
    image_std: float
    mm_projector_dim: int
    llama: dict[str, Any]
    attn_implementation: str | None = None
    max_context_length: int = REFERENCE_CONTEXT_FALLBACK
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CXRLLaVAConfig:
        required = (
            "clip_vision_cfg",
            "clip_embed_dim",
            "image_preprocess_cfg",
            "mm_projector_dim",
            "llama",
        )
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(
                f"config.json lacks {missing}; a CXR-LLaVA v2 config has {list(required)} "
                "(see ECOFRI/CXR-LLAVA-v2). Is this the right directory?"
            )
        vision = VisionConfig.from_dict(dict(d["clip_vision_cfg"]))
        pre = d["image_preprocess_cfg"]
        mean, std = _scalar(pre, "mean"), _scalar(pre, "std")
        if std <= 0:
            raise ConfigError(f"image_preprocess_cfg.std must be positive, found {std}.")
        llama = dict(d["llama"])
        for key in ("hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads"):
            if key not in llama:
                raise ConfigError(
                    f"config.json llama.{key} is missing; the nested llama dict must be a full "
                    "serialised LlamaConfig."
                )
        proj_dim = int(d["mm_projector_dim"])
        if proj_dim != vision.width:
            raise ConfigError(
                f"mm_projector_dim={proj_dim} but the vision tower width is {vision.width}; the "
                "projector maps the tower's patch tokens, so the two must be equal."
            )
        return cls(
            vision=vision,
            clip_embed_dim=int(d["clip_embed_dim"]),
            image_mean=mean,
            image_std=std,
            mm_projector_dim=proj_dim,
            llama=llama,
            attn_implementation=d.get("attn_implementation"),
            max_context_length=int(d.get("max_position_embeddings", REFERENCE_CONTEXT_FALLBACK)),
            raw=dict(d),
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> CXRLLaVAConfig:
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(
                f"{path} not found; a CXR-LLaVA checkpoint directory holds config.json next to "
                "its safetensors shards."
            ) from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}).") from None
        return cls.from_dict(d)

    @property
    def hidden_size(self) -> int:
        return int(self.llama["hidden_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.llama["vocab_size"])

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_image_tokens

    @property
    def image_size(self) -> int:
        h, w = self.vision.image_hw
        if h != w:
            raise ConfigError(f"only square inputs are supported, config has {h}x{w}.")
        return h


def _pair(v: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        if len(v) != 2:
            raise ConfigError(f"expected an int or a pair, found {v!r}.")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _scalar(d: dict[str, Any], key: str) -> float:
    if key not in d:
        raise ConfigError(f"image_preprocess_cfg.{key} is missing.")
    v = d[key]
    if isinstance(v, (list, tuple)):
        if len(v) != 1:
            raise ConfigError(
                f"image_preprocess_cfg.{key}={v!r}: the input is one grayscale channel, so one value "
                "is expected."
            )
        v = v[0]
    return float(v)
