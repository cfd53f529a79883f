"""Checkpoints are checked by name and shape before loading, and errors say what is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.loader import (
    WEIGHTS_INDEX,
    CheckpointError,
    ModelNotFoundError,
    inspect_checkpoint,
    load_model,
    read_safetensors_header,
)


@pytest.fixture
def copy(tiny_dir, tmp_path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, target)
    return target


def index_of(directory: Path) -> dict:
    return json.loads((directory / WEIGHTS_INDEX).read_text())


def rewrite_shard(directory: Path, shard: str, change) -> None:
    tensors = load_file(str(directory / shard))
    change(tensors)
    save_file(tensors, str(directory / shard), metadata={"format": "pt"})


def test_tiny_checkpoint_loads_on_cpu_in_fp32_with_weights_from_the_shards(tiny_dir) -> None:
    checkpoint = inspect_checkpoint(tiny_dir)
    model = load_model(checkpoint, device="cpu")
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    shard = index_of(tiny_dir)["weight_map"]["lm_head.weight"]
    stored = load_file(str(tiny_dir / shard))["lm_head.weight"]
    assert stored.dtype == torch.bfloat16  # published dtype
    torch.testing.assert_close(model.lm_head.weight, stored.float(), rtol=0, atol=0)
    assert checkpoint.model_id == str(tiny_dir.resolve())
    assert len(checkpoint.model_hash) == 64


def test_rope_frequencies_stay_float32_when_weights_are_bf16(tiny_dir) -> None:
    model = load_model(inspect_checkpoint(tiny_dir), device="cpu", dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.vision_tower.conv1.weight.dtype == torch.bfloat16
    assert model.llama.rotary_emb.inv_freq.dtype == torch.float32


def test_model_hash_follows_config_and_weight_index(copy) -> None:
    before = inspect_checkpoint(copy).model_hash
    assert inspect_checkpoint(copy).model_hash == before
    config = json.loads((copy / "config.json").read_text())
    config["image_aspect_ratio"] = "pad"  # an unused field: same model, different file
    (copy / "config.json").write_text(json.dumps(config))
    assert inspect_checkpoint(copy).model_hash != before


def test_missing_tensor_is_named(copy) -> None:
    index = index_of(copy)
    name = "llama.layers.1.mlp.up_proj.weight"
    shard = index["weight_map"].pop(name)
    rewrite_shard(copy, shard, lambda t: t.pop(name))
    (copy / WEIGHTS_INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing \(1\): llama\.layers\.1\.mlp\.up_proj"):
        inspect_checkpoint(copy)


def test_extra_tensor_is_named(copy) -> None:
    index = index_of(copy)
    shard = index["weight_map"]["lm_head.weight"]
    rewrite_shard(copy, shard, lambda t: t.update(extra_head=torch.zeros(3)))
    index["weight_map"]["extra_head"] = shard
    (copy / WEIGHTS_INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): extra_head \[3\]"):
        inspect_checkpoint(copy)


def test_wrong_shapes_are_named_with_both_shapes(copy) -> None:
    config = json.loads((copy / "config.json").read_text())
    vocab = config["llama"]["vocab_size"]
    config["llama"]["vocab_size"] = vocab + 24
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        inspect_checkpoint(copy)
    message = str(info.value)
    assert "wrong shape (2)" in message
    hidden = config["llama"]["hidden_size"]
    assert f"lm_head.weight is [{vocab}, {hidden}], expected [{vocab + 24}, {hidden}]" in message
    assert "llama.embed_tokens.weight" in message


def test_missing_shard_is_named_before_anything_is_read(copy) -> None:
    shard = "model-00002-of-00003.safetensors"
    (copy / shard).unlink()
    with pytest.raises(CheckpointError, match=f"missing:\n  {shard} \\(holds \\d+ tensors"):
        inspect_checkpoint(copy)


def test_index_naming_a_tensor_its_shard_lacks_is_reported(copy) -> None:
    index = index_of(copy)
    name = "mm_projector.bias"
    shard = index["weight_map"][name]
    rewrite_shard(copy, shard, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"does not contain them: {name}"):
        inspect_checkpoint(copy)


def test_single_file_checkpoints_load_too(copy) -> None:
    tensors = {}
    for shard in sorted(copy.glob("model-*.safetensors")):
        tensors |= load_file(str(shard))
        shard.unlink()
    (copy / WEIGHTS_INDEX).unlink()
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    checkpoint = inspect_checkpoint(copy)
    assert set(read_safetensors_header(copy / "model.safetensors")) == set(checkpoint.tensors)
    load_model(checkpoint, device="cpu")


def test_a_directory_without_weights_says_what_it_expected(copy) -> None:
    for shard in copy.glob("model-*.safetensors"):
        shard.unlink()
    (copy / WEIGHTS_INDEX).unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors.index.json nor"):
        inspect_checkpoint(copy)


def test_a_missing_directory_is_a_clear_model_not_found_error(tmp_path) -> None:
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        inspect_checkpoint(tmp_path / "nowhere" / "model")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        inspect_checkpoint(tmp_path / "file.bin")


def test_hub_ids_go_through_snapshot_download(monkeypatch) -> None:
    import huggingface_hub.constants

    # Offline, and a repository that does not exist: nothing is fetched even with a network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        ModelNotFoundError, match="could not download 'cxrnode-tests/no-such-model'"
    ):
        inspect_checkpoint("cxrnode-tests/no-such-model")


def test_a_file_that_is_not_safetensors_is_reported(copy) -> None:
    shard = copy / "model-00001-of-00003.safetensors"
    shard.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        inspect_checkpoint(copy)
