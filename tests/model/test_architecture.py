"""The module tree matches the published checkpoint's tensor names and shapes (spec §1.4-1.8)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from model.config import ConfigError, CXRLLaVAConfig
from model.modeling import CXRLLaVAModel


def published_config() -> dict:
    """config.json of ECOFRI/CXR-LLAVA-v2 as far as the spec knows it (§1.2), llama inferred."""
    return {
        "architectures": ["CXRLLAVAModel"],
        "clip_embed_dim": 128,
        "clip_quick_gelu": False,
        "clip_vision_cfg": {"image_size": 512, "layers": 24, "patch_size": 16, "width": 1024},
        "clip_vision_tower_dtype": "bf16",
        "image_preprocess_cfg": {"mean": 0.5518136078431373, "std": 0.3821719215686275},
        "llama": {
            "architectures": ["LlamaForCausalLM"],
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_act": "silu",
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "max_position_embeddings": 4096,
            "model_type": "llama",
            "num_attention_heads": 32,
            "num_hidden_layers": 32,
            "num_key_value_heads": 32,
            "rms_norm_eps": 1e-05,
            "rope_scaling": None,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "vocab_size": 32000,
        },
        "llama_model_dtype": "bf16",
        "mm_projector_dim": 1024,
        "mm_projector_dtype": "fp32",
        "attn_implementation": None,
    }


def spec_tensor_list() -> dict[str, tuple[int, ...]]:
    """The 589 tensors of spec §1.8, written out from the spec, not from the model code."""
    t: dict[str, tuple[int, ...]] = {
        "vision_tower.class_embedding": (1024,),
        "vision_tower.positional_embedding": (1025, 1024),
        "vision_tower.proj": (1024, 128),
        "vision_tower.conv1.weight": (1024, 1, 16, 16),
        "vision_tower.ln_pre.weight": (1024,),
        "vision_tower.ln_pre.bias": (1024,),
        "vision_tower.ln_post.weight": (1024,),
        "vision_tower.ln_post.bias": (1024,),
    }
    for n in range(24):
        b = f"vision_tower.transformer.resblocks.{n}."
        t |= {
            b + "ln_1.weight": (1024,),
            b + "ln_1.bias": (1024,),
            b + "attn.in_proj_weight": (3072, 1024),
            b + "attn.in_proj_bias": (3072,),
            b + "attn.out_proj.weight": (1024, 1024),
            b + "attn.out_proj.bias": (1024,),
            b + "ln_2.weight": (1024,),
            b + "ln_2.bias": (1024,),
            b + "mlp.c_fc.weight": (4096, 1024),
            b + "mlp.c_fc.bias": (4096,),
            b + "mlp.c_proj.weight": (1024, 4096),
            b + "mlp.c_proj.bias": (1024,),
        }
    t |= {"mm_projector.weight": (4096, 1024), "mm_projector.bias": (4096,)}
    t["llama.embed_tokens.weight"] = (32000, 4096)
    for n in range(32):
        b = f"llama.layers.{n}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[b + f"self_attn.{proj}.weight"] = (4096, 4096)
        t |= {
            b + "mlp.gate_proj.weight": (11008, 4096),
            b + "mlp.up_proj.weight": (11008, 4096),
            b + "mlp.down_proj.weight": (4096, 11008),
            b + "input_layernorm.weight": (4096,),
            b + "post_attention_layernorm.weight": (4096,),
        }
    t["llama.norm.weight"] = (4096,)
    t["lm_head.weight"] = (32000, 4096)
    return t


def test_full_size_config_builds_exactly_the_589_published_tensors() -> None:
    config = CXRLLaVAConfig.from_dict(published_config())
    with torch.device("meta"):
        model = CXRLLaVAModel(config)
    state = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    expected = spec_tensor_list()
    assert len(expected) == 589
    assert set(state) == set(expected)
    assert state == expected
    assert config.num_image_tokens == 1024


def test_vision_tower_follows_open_clip_defaults_the_reference_inherits() -> None:
    config = CXRLLaVAConfig.from_dict(published_config())
    with torch.device("meta"):
        model = CXRLLaVAModel(config)
    block = model.vision_tower.transformer.resblocks[0]
    assert block.attn.num_heads == 16  # width 1024 / open_clip head_width 64
    assert block.attn.batch_first is False  # sequence-first, as open_clip calls it
    assert isinstance(block.mlp.gelu, torch.nn.GELU) and block.mlp.gelu.approximate == "none"
    assert block.ln_1.eps == 1e-5 and model.vision_tower.ln_post.eps == 1e-5
    assert model.mm_projector.bias is not None and model.lm_head.bias is None
    assert model.llama.config.rms_norm_eps == 1e-5


def test_every_size_comes_from_config_json(tiny_dir) -> None:
    d = json.loads((tiny_dir / "config.json").read_text())
    d["clip_vision_cfg"] |= {"width": 192, "layers": 3, "head_width": 32}
    d["mm_projector_dim"] = 192
    d["llama"] |= {"hidden_size": 48, "num_hidden_layers": 1, "num_attention_heads": 3}
    d["llama"]["num_key_value_heads"] = 3
    with torch.device("meta"):
        model = CXRLLaVAModel(CXRLLaVAConfig.from_dict(d))
    assert len(model.vision_tower.transformer.resblocks) == 3
    assert model.vision_tower.transformer.resblocks[0].attn.num_heads == 6
    assert model.mm_projector.weight.shape == (48, 192)
    assert len(model.llama.layers) == 1
    assert model.vision_tower.positional_embedding.shape == (1025, 192)


def test_ln_post_is_applied_to_all_tokens_and_cls_is_dropped(engine) -> None:
    """Recompute the reference's encode_images by hand (spec §1.4) and compare."""
    vt = engine.model.vision_tower
    pixels = torch.randn(2, 1, 512, 512, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        x = vt.conv1(pixels).reshape(2, vt.conv1.out_channels, -1).permute(0, 2, 1)
        x = torch.cat([vt.class_embedding.view(1, 1, -1).expand(2, -1, -1), x], dim=1)
        x = vt.ln_pre(x + vt.positional_embedding)
        x = x.permute(1, 0, 2)
        for blk in vt.transformer.resblocks:
            h = torch.nn.functional.layer_norm(
                x, blk.ln_1.normalized_shape, blk.ln_1.weight, blk.ln_1.bias, 1e-5
            )
            x = x + blk.attn(h, h, h, need_weights=False)[0]
            h2 = torch.nn.functional.layer_norm(
                x, blk.ln_2.normalized_shape, blk.ln_2.weight, blk.ln_2.bias, 1e-5
            )
            x = x + blk.mlp.c_proj(torch.nn.functional.gelu(blk.mlp.c_fc(h2)))
        x = vt.ln_post(x.permute(1, 0, 2))
        expected = engine.model.mm_projector(x[:, 1:])
        got = engine.model.encode_images(pixels)
    assert got.shape == (2, 1024, engine.config.hidden_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_packed_in_proj_rows_are_query_key_value_in_that_order(engine) -> None:
    """Torch's MultiheadAttention must read in_proj_weight as [q; k; v] (spec §1.4)."""
    blk = engine.model.vision_tower.transformer.resblocks[0]
    attn, width = blk.attn, blk.attn.embed_dim
    heads, hd = attn.num_heads, width // attn.num_heads
    x = torch.randn(7, 1, width, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        wq, wk, wv = attn.in_proj_weight.split(width)
        bq, bk, bv = attn.in_proj_bias.split(width)
        q = (x @ wq.T + bq).view(7, heads, hd).transpose(0, 1)
        k = (x @ wk.T + bk).view(7, heads, hd).transpose(0, 1)
        v = (x @ wv.T + bv).view(7, heads, hd).transpose(0, 1)
        a = torch.softmax(q @ k.transpose(1, 2) / hd**0.5, dim=-1) @ v
        manual = attn.out_proj(a.transpose(0, 1).reshape(7, 1, width))
        got = attn(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(got, manual, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("llama"), "lacks ['llama']"),
        (lambda d: d.update(mm_projector_dim=512), "mm_projector_dim=512"),
        (lambda d: d["clip_vision_cfg"].update(heads=8), "keys ['heads']"),
        (lambda d: d["clip_vision_cfg"].update(attentional_pool=True), "attentional_pool"),
        (lambda d: d["image_preprocess_cfg"].update(mean=[0.5, 0.5, 0.5]), "one value"),
        (lambda d: d["llama"].pop("hidden_size"), "llama.hidden_size"),
    ],
)
def test_unusable_configs_are_refused_with_the_field_named(change, message) -> None:
    d = published_config()
    change(d)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        CXRLLaVAConfig.from_dict(d)


def test_config_and_preprocessing_import_without_torch() -> None:
    code = (
        "import sys, model, model.config, model.preprocess, model.prompts\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
