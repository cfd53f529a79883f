"""The tiny checkpoint has the published file layout, names, geometry and tokenizer ids."""

from __future__ import annotations

import json

import sentencepiece as spm

from model.config import CXRLLaVAConfig
from model.loader import WEIGHTS_INDEX, read_safetensors_header
from model.tiny import TinySizes, make_tiny_checkpoint

# Top-level fields of the published config.json (spec §1.2).
PUBLISHED_FIELDS = {
    "architectures",
    "auto_map",
    "clip_embed_dim",
    "clip_quick_gelu",
    "clip_vision_cfg",
    "clip_vision_tower_dtype",
    "clip_vision_tower_path",
    "freeze_mm_mlp_adapter",
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "image_preprocess_cfg",
    "llama",
    "llama_model_dtype",
    "llama_model_path",
    "mm_projector_dim",
    "mm_projector_dtype",
    "mm_projector_path",
    "attn_implementation",
    "_name_or_path",
}


def test_config_has_the_published_fields_and_image_geometry(tiny_dir) -> None:
    d = json.loads((tiny_dir / "config.json").read_text())
    assert set(d) >= PUBLISHED_FIELDS
    assert set(d["clip_vision_cfg"]) == {"image_size", "layers", "patch_size", "width"}
    assert d["clip_vision_cfg"]["image_size"] == 512 and d["clip_vision_cfg"]["patch_size"] == 16
    assert d["image_preprocess_cfg"] == {"mean": 0.5518136078431373, "std": 0.3821719215686275}
    assert d["llama"]["architectures"] == ["LlamaForCausalLM"]
    assert {"rope_theta", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings"} <= set(
        d["llama"]
    )
    assert CXRLLaVAConfig.from_dict(d).num_image_tokens == 1024


def test_weights_are_bf16_safetensors_in_several_shards_with_an_index(tiny_dir) -> None:
    index = json.loads((tiny_dir / WEIGHTS_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    total, names = 0, set()
    for shard in shards:
        header = read_safetensors_header(tiny_dir / shard)
        assert {dtype for dtype, _ in header.values()} == {"BF16"}
        total += sum(2 * _numel(shape) for _, shape in header.values())
        names |= set(header)
        assert all(index["weight_map"][n] == shard for n in header)
    assert names == set(index["weight_map"])
    assert index["metadata"]["total_size"] == total
    assert (
        "lm_head.weight" in names
        and "vision_tower.transformer.resblocks.0.attn.in_proj_weight" in names
    )


def test_tokenizer_is_sentencepiece_with_unk_bos_eos_0_1_2(tiny_dir) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(tiny_dir / "tokenizer.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert json.loads((tiny_dir / "added_tokens.json").read_text()) == {
        "<unk>": 0,
        "<s>": 1,
        "</s>": 2,
    }
    specials = json.loads((tiny_dir / "special_tokens_map.json").read_text())
    assert specials["pad_token"] == "<unk>"
    assert "chat_template" not in json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert json.loads((tiny_dir / "generation_config.json").read_text())["_from_model_config"]


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path) -> None:
    sizes = TinySizes(vision_layers=1, num_layers=1, shards=2)
    a = make_tiny_checkpoint(tmp_path / "a", seed=3, sizes=sizes)
    b = make_tiny_checkpoint(tmp_path / "b", seed=3, sizes=sizes)
    c = make_tiny_checkpoint(tmp_path / "c", seed=4, sizes=sizes)
    for name in (
        "tokenizer.model",
        "config.json",
        WEIGHTS_INDEX,
        "model-00001-of-00002.safetensors",
    ):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "tokenizer.model").read_bytes() == (c / "tokenizer.model").read_bytes()
    first = "model-00001-of-00002.safetensors"
    assert (a / first).read_bytes() != (c / first).read_bytes()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
