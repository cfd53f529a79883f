"""The full-size maker's format and the loader at scale, on a full-width 2-layer checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from fullwidth import LAYERS
from safetensors import safe_open

from model.config import CXRLLaVAConfig
from model.loader import (
    CheckpointTooBig,
    choose_dtype,
    inspect_checkpoint,
    load_model,
    map_safetensors,
    resolve_dtype,
)
from model.modeling import CXRLLaVAModel
from model.tiny import FULL_SIZES, make_random_checkpoint, write_safetensors


def test_the_checkpoint_has_the_published_widths_files_and_index(fullwidth_model: Path) -> None:
    config = CXRLLaVAConfig.from_file(fullwidth_model / "config.json")
    assert config.hidden_size == 4096 and config.vocab_size == 32000
    assert config.vision.width == 1024 and config.vision.layers == 24
    assert config.num_image_tokens == 1024 and config.mm_projector_dim == 1024
    assert config.llama["intermediate_size"] == 11008
    assert config.llama["num_hidden_layers"] == LAYERS
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        assert (fullwidth_model / name).is_file()
    index = json.loads((fullwidth_model / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    checkpoint = inspect_checkpoint(fullwidth_model)  # the header check against config.json
    assert index["metadata"]["total_size"] == checkpoint.weight_bytes
    assert {t.dtype for t in checkpoint.tensors.values()} == {"BF16"}
    with torch.device("meta"):
        full = sum(p.numel() for p in CXRLLaVAModel(config).parameters())
    assert checkpoint.weight_bytes == 2 * full


def test_the_shards_read_the_same_through_safetensors_and_our_mapping(
    fullwidth_model: Path,
) -> None:
    path = fullwidth_model / "model-00001-of-00003.safetensors"
    mapped = map_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
        assert sorted(names) == sorted(mapped)
        for name in names[:3] + names[-2:]:
            assert torch.equal(f.get_tensor(name), mapped[name])
    embed = mapped.get("llama.embed_tokens.weight")
    if embed is not None:
        assert 0.9 < embed[:64].float().std() < 1.1  # drawn at the tiny maker's scales


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            lo, hi = line.split()[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def test_bf16_on_the_cpu_uses_the_mapped_shards_in_place(fullwidth_model: Path) -> None:
    checkpoint = inspect_checkpoint(fullwidth_model)
    model = load_model(checkpoint, "cpu", "bfloat16")
    assert model.dtype == torch.bfloat16
    weight = model.llama.layers[0].mlp.up_proj.weight
    shard = checkpoint.tensors["llama.layers.0.mlp.up_proj.weight"].file
    inside = [lo <= weight.data_ptr() < hi for lo, hi in _mapped_ranges(shard)]
    assert any(inside), "the weight should be the shard's mapped bytes, not a copy"
    assert model.llama.rotary_emb.inv_freq.dtype == torch.float32  # rebuilt, not mapped
    with torch.inference_mode():
        image = model.encode_images(torch.zeros(1, 1, 512, 512))
    assert image.shape == (1, 1024, 4096) and torch.isfinite(image).all()


def test_fp32_on_the_cpu_is_a_converted_copy_and_chosen_only_where_it_fits(
    fullwidth_model: Path,
) -> None:
    checkpoint = inspect_checkpoint(fullwidth_model)
    fp32 = checkpoint.load_bytes(torch.float32)
    assert fp32 == 2 * checkpoint.weight_bytes
    assert choose_dtype(torch.device("cpu"), 1024) == torch.float32
    assert choose_dtype(torch.device("cpu"), 1 << 50) == torch.bfloat16  # a petabyte
    assert resolve_dtype("auto") is None and resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="not one of auto"):
        resolve_dtype("int3")
    with pytest.raises(CheckpointTooBig, match=r"needs \d+\.\d GiB on cpu \(bfloat16"):
        load_model(checkpoint, "cpu", "bfloat16", free_bytes=checkpoint.weight_bytes // 2)


def test_int8_loads_shard_by_shard_into_quantized_decoder_layers(fullwidth_model: Path) -> None:
    pytest.importorskip("torchao", reason="the quant extra (torchao) is not installed")
    from model.quantize import PackedInt8Linear

    model = load_model(inspect_checkpoint(fullwidth_model), "cpu", "bfloat16", quantize="int8")
    for layer in model.llama.layers:
        for linear in (layer.self_attn.q_proj, layer.mlp.down_proj):
            assert isinstance(linear, PackedInt8Linear) and linear.weight.dtype == torch.int8
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert not any(p.is_meta for p in [*model.parameters(), *model.buffers()])
    # decode-sized calls (int8 kernel) and prefill-sized ones (dequantized) agree
    down = model.llama.layers[0].mlp.down_proj
    x = torch.randn(32, 11008, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.inference_mode():
        wide, narrow = down(x), torch.cat([down(x[i : i + 1]) for i in range(4)])
        exact = x[:4].float() @ (down.weight.float() * down.scales.float()[:, None]).T
    assert torch.allclose(narrow.float(), exact, rtol=0.02, atol=0.05)
    assert torch.allclose(wide[:4].float(), exact, rtol=0.02, atol=0.05)


def test_the_writer_streams_a_readable_safetensors_file(tmp_path: Path) -> None:
    shapes = [("a", (3, 5)), ("b.weight", (7,)), ("c", (2, 2, 2))]
    drawn: dict[str, torch.Tensor] = {}

    def draw(name, shape):
        drawn[name] = torch.randn(shape).to(torch.bfloat16)
        return drawn[name]

    nbytes = write_safetensors(tmp_path / "x.safetensors", shapes, draw)
    assert nbytes == 2 * sum(math.prod(s) for _, s in shapes)
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        for name, _ in shapes:
            assert torch.equal(f.get_tensor(name), drawn[name])
    assert not list(tmp_path.glob("*.partial"))


def test_a_random_checkpoint_with_one_layer_has_the_layer_and_refuses_zero(tmp_path) -> None:
    with pytest.raises(ValueError, match="layers must be >= 1"):
        make_random_checkpoint(tmp_path / "none", layers=0)
    assert FULL_SIZES.num_layers == 32 and FULL_SIZES.vocab_size == 32000
