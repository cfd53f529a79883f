"""A tiny CXR-LLaVA v2 checkpoint in exactly the published format, for tests and benchmarks.

Same files as ``ECOFRI/CXR-LLAVA-v2`` (config.json with the nested ``llama`` dict, sharded
safetensors with ``model.safetensors.index.json``, a SentencePiece ``tokenizer.model`` with
unk/bos/eos = 0/1/2 and the tokenizer/generation JSON files), the same tensor names, and the
published image geometry (512 px, patch 16, so 1024 image tokens per study). Only the widths,
depths and vocabulary are small. Weights are random from a fixed seed and stored in bf16 like
the published shards, so the whole loading path (header checks, shard index, dtype casts) is
exercised as it will be with the real model.

``make_random_checkpoint`` writes the same format at the published sizes (``FULL_SIZES``: ViT-L/16
at 512 px, LLaMA-2-7B, vocabulary 32,000; about 14 GB), or at full width with fewer decoder
layers. It streams: each tensor is drawn, written at its place in its shard and dropped, so at
most one tensor is in memory, whatever the size. Its tokenizer is the small one (a random
checkpoint's answers are noise anyway); the weight shapes follow the published config.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from model.config import CXRLLaVAConfig

SYSTEM_NAME = "cxrnode-tiny-cxr-llava-v2"
RANDOM_NAME = "cxrnode-random-cxr-llava-v2"
PUBLISHED_MEAN = 0.5518136078431373
PUBLISHED_STD = 0.3821719215686275

# Radiology-flavoured English for the toy SentencePiece model. It includes the prompts and the
# chat-template markers so that those tokenize into a handful of pieces, as with LLaMA's vocab.
CORPUS = """\
The heart size is normal. The mediastinal and hilar contours are unremarkable.
There is no focal consolidation, pleural effusion, or pneumothorax.
The lungs are clear. No acute cardiopulmonary process.
Mild cardiomegaly with pulmonary vascular congestion, suggestive of mild pulmonary edema.
Small bilateral pleural effusions with adjacent atelectasis at the lung bases.
Right lower lobe opacity may represent pneumonia or atelectasis in the appropriate clinical setting.
Left apical pneumothorax measuring approximately 2 cm. Recommend follow-up chest radiograph.
Interval increase in the left pleural effusion. Stable moderate cardiomegaly.
Patchy opacities in both lower lobes, concerning for multifocal pneumonia.
There is a large consolidation in the right upper lobe. No evidence of pleural effusion.
Linear atelectasis at the left base. The cardiomediastinal silhouette is within normal limits.
Endotracheal tube terminates 4 cm above the carina. Nasogastric tube courses below the diaphragm.
Possible differential diagnoses include pneumonia, aspiration, pulmonary hemorrhage, or edema.
Further evaluation with chest CT is recommended if clinically indicated.
No additional radiologic study is needed at this time.
Should additional radiologic study needed? A follow-up radiograph in 6 weeks may help.
What are the possible differential diagnoses for this patient?
Write a radiologic report on the given chest radiograph, including information about \
atelectasis, cardiomegaly, consolidation, pulmonary edema, pleural effusion, and pneumothorax.
You are a helpful radiologist. Try to interpret chest x ray image and answer to the question \
that user provides.
[INST] <<SYS>> <</SYS>> [/INST]
An answer ends with </s> and the next turn begins with <s>[INST] as in </s><s>[INST] text.
The end of an answer is written </s>; </s> closes it, and </s> or </s> may follow a report.
Is there pleural effusion on this chest radiograph? Answer yes or no. Yes. No.
The osseous structures are intact. Degenerative changes of the thoracic spine.
Hyperinflated lungs consistent with chronic obstructive pulmonary disease.
Blunting of the right costophrenic angle, which may reflect a small effusion or pleural thickening.
Increased interstitial markings bilaterally, compatible with interstitial edema.
Elevated right hemidiaphragm. Low lung volumes with bibasilar atelectasis.
A nodular opacity in the left mid lung measures 1.5 cm; CT is recommended for characterization.
The tip of the right internal jugular central venous catheter projects over the superior vena cava.
Sternotomy wires and mediastinal clips are noted. The heart is mildly enlarged.
No pneumothorax is seen after chest tube removal. Subcutaneous emphysema in the left chest wall.
Findings: Frontal and lateral views of the chest were obtained. Impression: No acute disease.
Compared with the prior study, the right pleural effusion has decreased and atelectasis improved.
In a child, the cardiothymic silhouette can appear enlarged on an AP radiograph.
The paediatric heart may look large because of the thymus and a shallow inspiration.
Lung opacity, consolidation, edema, and effusion are not present. The study is normal.
Retrocardiac opacity obscures the left hemidiaphragm, suggesting left lower lobe collapse.
Diffuse bilateral airspace disease, which could reflect edema, infection, or hemorrhage.
Calcified granuloma in the right upper lobe. Aortic knob calcification. Tortuous aorta.
Portable AP upright view. Rotated patient positioning limits assessment of the heart size.
"""

QK_SCALE = 4.0
LLAMA2_VOCAB_EXTRAS = {"<unk>": 0, "<s>": 1, "</s>": 2}


@dataclass(frozen=True)
class TinySizes:
    """Widths and depths of a tiny checkpoint; the image geometry stays the published one."""

    image_size: int = 512
    patch_size: int = 16
    vision_width: int = 128  # 2 heads of open_clip's default head width 64
    vision_layers: int = 2
    clip_embed_dim: int = 16
    hidden_size: int = 64
    intermediate_size: int = 172
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    vocab_size: int | None = None  # None: the SentencePiece vocabulary size
    tokenizer_vocab: int = 1300
    shards: int = 3
    max_position_embeddings: int = 4096


#: The published CXR-LLaVA v2 sizes (docs/model.md, "config.json"): 7.05 B parameters.
FULL_SIZES = TinySizes(
    vision_width=1024,
    vision_layers=24,
    clip_embed_dim=128,
    hidden_size=4096,
    intermediate_size=11008,
    num_layers=32,
    num_heads=32,
    num_kv_heads=32,
    vocab_size=32000,
)


def make_tiny_checkpoint(
    directory: str | os.PathLike, seed: int = 0, *, sizes: TinySizes | None = None
) -> Path:
    """Write a tiny checkpoint into ``directory`` (created if needed) and return its path."""
    import torch
    from safetensors.torch import save_file

    from model.modeling import CXRLLaVAModel

    sizes = sizes or TinySizes()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("model-*-of-*.safetensors"):
        stale.unlink()

    proto = train_tokenizer(sizes.tokenizer_vocab)
    (directory / "tokenizer.model").write_bytes(proto)
    vocab = sizes.vocab_size or sizes.tokenizer_vocab
    for name, content in _tokenizer_files().items():
        _write_json(directory / name, content)
    _write_json(
        directory / "generation_config.json",
        {"_from_model_config": True, "transformers_version": "4.36.2"},
    )
    config_dict = tiny_config_dict(sizes, vocab)
    _write_json(directory / "config.json", config_dict)

    config = CXRLLaVAConfig.from_dict(config_dict)
    with torch.device("meta"):
        skeleton = CXRLLaVAModel(config)
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        name: _init(name, tuple(p.shape), gen, config).to(torch.bfloat16).contiguous()
        for name, p in skeleton.named_parameters()
    }

    names = list(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    per_shard = -(-total // sizes.shards)
    groups: list[list[str]] = [[]]
    filled = 0
    for name in names:
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if groups[-1] and filled + nbytes > per_shard and len(groups) < sizes.shards:
            groups.append([])
            filled = 0
        groups[-1].append(name)
        filled += nbytes
    weight_map: dict[str, str] = {}
    for k, group in enumerate(groups, start=1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(directory / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, fname))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(directory / "model.safetensors.index.json", index)
    return directory


def make_random_checkpoint(
    directory: str | os.PathLike,
    *,
    layers: int | None = None,
    seed: int = 0,
    sizes: TinySizes = FULL_SIZES,
) -> Path:
    """Write a random bf16 checkpoint at ``sizes`` (default the published ones) and return it.

    ``layers`` keeps every width and cuts the LLaMA decoder to that many layers (tests and
    benchmarks get the real shapes in a fraction of the bytes). Shards are filled to about a
    third of the total each, as published, and written tensor by tensor: memory use is one
    tensor (at most the 32,000 x 4,096 embedding), not one shard.
    """
    import torch

    from model.modeling import CXRLLaVAModel

    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers must be >= 1, found {layers}.")
        sizes = replace(sizes, num_layers=layers)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in [*directory.glob("model-*-of-*.safetensors"), directory / "model.safetensors"]:
        stale.unlink(missing_ok=True)
    (directory / "tokenizer.model").write_bytes(train_tokenizer(sizes.tokenizer_vocab))
    for name, content in _tokenizer_files().items():
        _write_json(directory / name, content)
    _write_json(
        directory / "generation_config.json",
        {"_from_model_config": True, "transformers_version": "4.36.2"},
    )
    vocab = sizes.vocab_size or sizes.tokenizer_vocab
    config_dict = tiny_config_dict(sizes, vocab)
    config_dict["_name_or_path"] = config_dict["llama"]["_name_or_path"] = RANDOM_NAME
    _write_json(directory / "config.json", config_dict)
    config = CXRLLaVAConfig.from_dict(config_dict)
    with torch.device("meta"):
        skeleton = CXRLLaVAModel(config)
    shapes = [(name, tuple(p.shape)) for name, p in skeleton.named_parameters()]
    del skeleton
    gen = torch.Generator().manual_seed(seed)

    def draw(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return _init(name, shape, gen, config).to(torch.bfloat16)

    groups = _split(shapes, sizes.shards, bytes_per_value=2)
    weight_map: dict[str, str] = {}
    total = 0
    for k, group in enumerate(groups, start=1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        total += write_safetensors(directory / fname, group, draw)
        weight_map.update(dict.fromkeys((n for n, _ in group), fname))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(directory / "model.safetensors.index.json", index)
    return directory


def _split(
    shapes: list[tuple[str, tuple[int, ...]]], shards: int, bytes_per_value: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive groups of about ``total / shards`` bytes each (the published layout)."""
    sizes = [math.prod(shape) * bytes_per_value for _, shape in shapes]
    per_shard = -(-sum(sizes) // shards)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    filled = 0
    for entry, nbytes in zip(shapes, sizes, strict=True):
        if groups[-1] and filled + nbytes > per_shard and len(groups) < shards:
            groups.append([])
            filled = 0
        groups[-1].append(entry)
        filled += nbytes
    return groups


def write_safetensors(
    path: Path,
    entries: Iterable[tuple[str, tuple[int, ...]]],
    draw: Callable[[str, tuple[int, ...]], object],
) -> int:
    """Write a bf16 safetensors file tensor by tensor; return the bytes of tensor data.

    The header is known from the shapes alone, so it is written first and each tensor is
    appended as it is drawn (``draw(name, shape)`` returns a contiguous bf16 tensor).
    """
    import torch

    entries = list(entries)
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        nbytes = math.prod(shape) * 2
        span = [offset, offset + nbytes]
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": span}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in entries:
            tensor = draw(name, shape).contiguous()  # type: ignore[attr-defined]
            if tuple(tensor.shape) != shape or tensor.element_size() != 2:
                raise ValueError(f"{name}: drew {tuple(tensor.shape)}, expected bf16 {shape}.")
            f.write(tensor.view(-1).view(dtype=torch.int16).numpy().data)
            del tensor
    tmp.replace(path)
    return offset


def train_tokenizer(vocab_size: int = 1300) -> bytes:
    """A BPE SentencePiece model trained like LLaMA's (byte fallback, digits split, no
    whitespace normalisation, unk/bos/eos = 0/1/2); deterministic and well under a second."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()),
        model_writer=out,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_surface=" \u2047 ",
        num_threads=1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return out.getvalue()


def tiny_config_dict(sizes: TinySizes, vocab_size: int) -> dict:
    """config.json with the published field set (docs/model.md, "config.json") at tiny sizes."""
    return {
        "_name_or_path": SYSTEM_NAME,
        "architectures": ["CXRLLAVAModel"],
        "attn_implementation": None,
        "auto_map": {
            "AutoConfig": "CXR_LLAVA_HF.CXRLLAVAConfig",
            "AutoModel": "CXR_LLAVA_HF.CXRLLAVAModel",
        },
        "clip_embed_dim": sizes.clip_embed_dim,
        "clip_quick_gelu": False,
        "clip_vision_cfg": {
            "image_size": sizes.image_size,
            "layers": sizes.vision_layers,
            "patch_size": sizes.patch_size,
            "width": sizes.vision_width,
        },
        "clip_vision_tower_dtype": "bf16",
        "clip_vision_tower_path": None,
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "square",
        "image_grid_pinpoints": None,
        "image_preprocess_cfg": {"mean": PUBLISHED_MEAN, "std": PUBLISHED_STD},
        "llama": _llama_dict(sizes, vocab_size),
        "llama_model_dtype": "bf16",
        "llama_model_path": "CXR-LLAVA-v2",
        "mm_projector_dim": sizes.vision_width,
        "mm_projector_dtype": "fp32",
        "mm_projector_path": None,
        "model_type": "CXR-LLAVA",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.36.2",
    }


def _llama_dict(sizes: TinySizes, vocab_size: int) -> dict:
    """A ``LlamaConfig.to_dict()`` as transformers 4.36 serialises it (the published layout)."""
    return {
        "_name_or_path": SYSTEM_NAME,
        "add_cross_attention": False,
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bad_words_ids": None,
        "begin_suppress_tokens": None,
        "bos_token_id": 1,
        "chunk_size_feed_forward": 0,
        "cross_attention_hidden_size": None,
        "decoder_start_token_id": None,
        "diversity_penalty": 0.0,
        "do_sample": False,
        "early_stopping": False,
        "encoder_no_repeat_ngram_size": 0,
        "eos_token_id": 2,
        "exponential_decay_length_penalty": None,
        "finetuning_task": None,
        "forced_bos_token_id": None,
        "forced_eos_token_id": None,
        "hidden_act": "silu",
        "hidden_size": sizes.hidden_size,
        "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
        "initializer_range": 0.02,
        "intermediate_size": sizes.intermediate_size,
        "is_decoder": False,
        "is_encoder_decoder": False,
        "label2id": {"LABEL_0": 0, "LABEL_1": 1},
        "length_penalty": 1.0,
        "max_length": 20,
        "max_position_embeddings": sizes.max_position_embeddings,
        "min_length": 0,
        "model_type": "llama",
        "no_repeat_ngram_size": 0,
        "num_attention_heads": sizes.num_heads,
        "num_beam_groups": 1,
        "num_beams": 1,
        "num_hidden_layers": sizes.num_layers,
        "num_key_value_heads": sizes.num_kv_heads,
        "num_return_sequences": 1,
        "output_attentions": False,
        "output_hidden_states": False,
        "output_scores": False,
        "pad_token_id": None,
        "prefix": None,
        "pretraining_tp": 1,
        "problem_type": None,
        "pruned_heads": {},
        "remove_invalid_values": False,
        "repetition_penalty": 1.0,
        "return_dict": True,
        "return_dict_in_generate": False,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "sep_token_id": None,
        "suppress_tokens": None,
        "task_specific_params": None,
        "temperature": 1.0,
        "tf_legacy_loss": False,
        "tie_encoder_decoder": False,
        "tie_word_embeddings": False,
        "tokenizer_class": None,
        "top_k": 50,
        "top_p": 1.0,
        "torch_dtype": "bfloat16",
        "torchscript": False,
        "transformers_version": "4.36.2",
        "typical_p": 1.0,
        "use_bfloat16": False,
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def _tokenizer_files() -> dict[str, dict]:
    """tokenizer_config / special_tokens_map / added_tokens as a 4.36 LLaMA-2 save writes them."""

    def added(content: str) -> dict:
        return {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }

    return {
        "tokenizer_config.json": {
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": {str(i): added(c) for c, i in LLAMA2_VOCAB_EXTRAS.items()},
            "bos_token": "<s>",
            "clean_up_tokenization_spaces": False,
            "eos_token": "</s>",
            "legacy": False,
            "model_max_length": 1000000000000000019884624838656,
            "pad_token": "<unk>",
            "padding_side": "right",
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>",
            "use_default_system_prompt": False,
        },
        "special_tokens_map.json": {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "pad_token": "<unk>",
            "unk_token": "<unk>",
        },
        "added_tokens.json": dict(LLAMA2_VOCAB_EXTRAS),
    }


def _init(name: str, shape: tuple[int, ...], gen, config: CXRLLaVAConfig):
    """Random values with scales that keep activations O(1), so greedy picks are well separated."""
    import torch

    def normal(std: float):
        return torch.randn(shape, generator=gen) * std

    width = config.vision.width
    if name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight")) or (
        name.startswith("llama.") and name.endswith("norm.weight")
    ):
        return 1.0 + normal(0.1)
    if name.endswith("bias"):  # includes attn.in_proj_bias
        return normal(0.02)
    if name.endswith(("class_embedding", "positional_embedding", "proj")):
        return normal(width**-0.5)
    if name.endswith("conv1.weight"):
        fan_in = shape[1] * shape[2] * shape[3]
        return normal(fan_in**-0.5)
    if name.endswith("embed_tokens.weight"):
        return normal(1.0)
    if name.endswith(("q_proj.weight", "k_proj.weight")):
        # Sharp attention, so that what a row attends to (its image, its prompt) shows in the
        # output; with O(1) logits over ~1100 positions every row would read the same average.
        return normal(QK_SCALE * shape[1] ** -0.5)
    if len(shape) == 2:
        return normal(shape[1] ** -0.5)
    raise ValueError(f"no initialiser for {name} {shape}")


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
