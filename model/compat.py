"""Every use of transformers' internals by the model package, in one place, checked.

The model builds transformers' ``LlamaModel`` from the checkpoint's config and then runs its
decoder layers itself (:class:`model.decoder.SlotDecoder`: a static KV cache addressed by
slot, which transformers' own forward cannot do). That relies on things transformers does not
promise between releases:

- the attention implementation is chosen by assigning ``config._attn_implementation``
  (:func:`set_attention`): the loader must not pick flash-attention variants by itself;
- a ``LlamaDecoderLayer`` is ``input_layernorm -> self_attn (q/k/v/o_proj) -> residual ->
  post_attention_layernorm -> mlp -> residual``, and ``LlamaModel`` has ``embed_tokens``,
  ``layers``, ``norm`` and ``rotary_emb``: the decoder re-runs exactly these operations;
- ``modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)`` rotates queries and keys
  (:func:`apply_rotary_pos_emb`).

:func:`require` checks them and is called whenever a model is built
(:func:`model.modeling.llama_config`): a transformers release that moved one stops the
inference worker at start-up with what to do, instead of decoding wrong text. A release not in
:data:`TESTED_VERSIONS` that still has them runs, with one warning (the numerical tests in
``tests/model`` are the proof that a new release decodes the same). Nothing else in
``model/`` touches transformers' private attributes.
"""

from __future__ import annotations

import logging
from typing import Any

import transformers
from transformers.models.llama import modeling_llama

log = logging.getLogger(__name__)

__all__ = ["TESTED_VERSIONS", "apply_rotary_pos_emb", "problems", "require", "set_attention"]

#: transformers releases the decoder was written and tested against (pyproject pins one).
TESTED_VERSIONS = frozenset({"5.23.0"})

#: What to do when the installed transformers lacks what the decoder re-runs.
REMEDY = (
    "install the tested release (pip install 'transformers==5.23.0', pinned in "
    "pyproject.toml's model extra), or adapt model/compat.py and model/decoder.py to it"
)

#: Attributes each constructor must assign: (class, names).
_LAYOUT = (
    ("LlamaDecoderLayer", ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")),
    ("LlamaAttention", ("q_proj", "k_proj", "v_proj", "o_proj")),
    ("LlamaModel", ("embed_tokens", "layers", "norm", "rotary_emb")),
)

_warned: set[str] = set()


def problems() -> list[str]:
    """What the installed transformers lacks of what the model relies on (empty: none)."""
    found = []
    if not hasattr(modeling_llama, "apply_rotary_pos_emb"):
        found.append("modeling_llama.apply_rotary_pos_emb")
    for class_name, names in _LAYOUT:
        owner = getattr(modeling_llama, class_name, None)
        if owner is None:
            found.append(f"modeling_llama.{class_name}")
            continue
        assigned = set(owner.__init__.__code__.co_names)
        found += [f"{class_name}.{name}" for name in names if name not in assigned]
    if not hasattr(transformers.PretrainedConfig, "_attn_implementation"):
        found.append("PretrainedConfig._attn_implementation")
    return found


def require() -> None:
    """Raise (saying what to install) when the decoder cannot run on this transformers."""
    version = transformers.__version__
    missing = problems()
    if missing:
        raise RuntimeError(
            f"transformers {version} lacks {', '.join(missing)}, which the model's decoder "
            f"relies on: {REMEDY}"
        )
    if version not in TESTED_VERSIONS and version not in _warned:
        _warned.add(version)
        log.warning(
            "transformers %s is not a tested release %s: the decoder's layout checks pass; "
            "run tests/model before trusting its drafts",
            version,
            sorted(TESTED_VERSIONS),
        )


def set_attention(config: Any, implementation: str) -> None:
    """Choose the attention implementation of a ``LlamaConfig`` (no public setter)."""
    config._attn_implementation = implementation


def apply_rotary_pos_emb(q: Any, k: Any, cos: Any, sin: Any) -> tuple[Any, Any]:
    """transformers' RoPE rotation of queries ``q`` and keys ``k`` ([B, heads, W, head_dim])."""
    return modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
