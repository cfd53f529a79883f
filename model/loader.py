"""Find, check and load a CXR-LLaVA v2 checkpoint.

A checkpoint is a directory (or a Hugging Face hub id, downloaded with ``snapshot_download``)
holding ``config.json``, the safetensors shards with ``model.safetensors.index.json`` (or a single
``model.safetensors``) and the tokenizer files. Before a single weight is allocated, the names,
shapes and shard files are checked against the module tree that ``config.json`` describes
(read from the safetensors headers, which are plain JSON at the start of each shard); any
difference is reported by name. Weights are then read shard by shard straight onto the target
device and assigned to a model that was built on the ``meta`` device, so memory is touched once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import CONFIG_NAME, ConfigError, CXRLLaVAConfig
from model.devices import visible_gpus
from model.modeling import CXRLLaVAModel
from model.quantize import CHOICES as QUANTIZATIONS
from model.quantize import Quantization, quantize_decoder

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ModelNotFoundError",
    "Quantization",
    "choose_device",
    "choose_dtype",
    "inspect_checkpoint",
    "load_model",
    "visible_gpus",
]

WEIGHTS_INDEX = "model.safetensors.index.json"
SINGLE_WEIGHTS = "model.safetensors"
HUB_FILES = [
    CONFIG_NAME,
    "generation_config.json",
    WEIGHTS_INDEX,
    "*.safetensors",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
# Non-persistent RoPE buffers that some conversions saved; recomputed at load, never needed.
IGNORED_EXTRA = re.compile(r"^llama\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq$")
MAX_LISTED = 10


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a readable checkpoint directory nor a downloadable hub id."""


class CheckpointError(ValueError):
    """The checkpoint's files do not match each other or its config.json."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    file: Path


@dataclass(frozen=True)
class Checkpoint:
    """A checked checkpoint: where it is, what it claims to be, and where each tensor lives."""

    directory: Path
    model_id: str
    model_hash: str
    config: CXRLLaVAConfig
    tensors: dict[str, TensorInfo]


# --------------------------------------------------------------------------- locating
def resolve(model: str | os.PathLike) -> tuple[Path, str]:
    """(local directory, model id) for a directory path or a hub id (``owner/name[@revision]``)."""
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.is_dir():
        return path.resolve(), str(path.resolve())
    if path.exists():
        raise ModelNotFoundError(
            f"{path} is a file; expected a checkpoint directory (config.json + safetensors) "
            "or a hub id such as ECOFRI/CXR-LLAVA-v2."
        )
    if not HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise ModelNotFoundError(
            f"model {text!r} not found: no such directory, and it is not a hub id "
            "(owner/name). Set CXRNODE_MODEL or --model to a checkpoint directory; "
            "`cxrnode model make-tiny DIR` writes a small one for testing."
        )
    return _download(text), text


def _download(hub_id: str) -> Path:
    """Fetch the checkpoint files (not the duplicate .bin shards) into the hub cache."""
    repo, _, revision = hub_id.partition("@")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo, revision=revision or None, allow_patterns=HUB_FILES)
    except Exception as exc:  # network, auth, missing repo: all end in the same advice
        raise ModelNotFoundError(
            f"could not download {hub_id!r} from the Hugging Face hub ({type(exc).__name__}: "
            f"{exc}). If you meant a local directory, it does not exist. Otherwise download it "
            f"on a connected machine (huggingface-cli download {repo}) and point CXRNODE_MODEL "
            "at the directory."
        ) from exc
    return Path(local)


# --------------------------------------------------------------------------- inspecting
def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) from a safetensors file's JSON header, without reading tensors."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path} is too short to be a safetensors file.")
            (n,) = struct.unpack("<Q", raw)
            size = path.stat().st_size
            if n > min(size - 8, 256 * 1024 * 1024):
                raise CheckpointError(
                    f"{path} is not a safetensors file (header length {n} for a {size}-byte file)."
                )
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read the safetensors header of {path}: {exc}") from None
    return {
        name: (info["dtype"], tuple(info["shape"]))
        for name, info in header.items()
        if name != "__metadata__"
    }


def inspect_checkpoint(model: str | os.PathLike) -> Checkpoint:
    """Locate ``model`` and check its files against each other and against config.json."""
    directory, model_id = resolve(model)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise ModelNotFoundError(
            f"{directory} has no {CONFIG_NAME}; expected a CXR-LLaVA v2 checkpoint directory."
        )
    try:
        config = CXRLLaVAConfig.from_file(config_path)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    tensors, index_bytes = _locate_tensors(directory)
    expected = expected_shapes(config)
    check_tensors(directory, expected, {n: t.shape for n, t in tensors.items()})
    digest = hashlib.sha256(config_path.read_bytes() + b"\0" + index_bytes).hexdigest()
    return Checkpoint(directory, model_id, digest, config, tensors)


def _locate_tensors(directory: Path) -> tuple[dict[str, TensorInfo], bytes]:
    """Every tensor's shard and header entry, plus the bytes identifying the weight layout."""
    index_path = directory / WEIGHTS_INDEX
    if index_path.is_file():
        index_bytes = index_path.read_bytes()
        try:
            weight_map: dict[str, str] = json.loads(index_bytes)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path} is not a safetensors index ({exc}).") from None
        by_file: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            by_file.setdefault(fname, []).append(name)
        missing_files = [f for f in sorted(by_file) if not (directory / f).is_file()]
        if missing_files:
            lines = [
                f"  {f} (holds {len(by_file[f])} tensors, e.g. {by_file[f][0]})"
                for f in missing_files
            ]
            raise CheckpointError(
                f"{directory}: {len(missing_files)} shard file(s) named in {WEIGHTS_INDEX} are "
                "missing:\n" + "\n".join(lines) + "\nThe download is incomplete; fetch the "
                "missing shards (or the whole repository) again."
            )
        tensors: dict[str, TensorInfo] = {}
        for fname, names in sorted(by_file.items()):
            header = read_safetensors_header(directory / fname)
            absent = [n for n in names if n not in header]
            if absent:
                raise CheckpointError(
                    f"{WEIGHTS_INDEX} places {len(absent)} tensor(s) in {fname}, but that file "
                    f"does not contain them: {_listing(absent)}. The index and the shards come "
                    "from different uploads; download them again together."
                )
            for name, (dtype, shape) in header.items():
                if name in tensors:
                    raise CheckpointError(
                        f"tensor {name} appears in both {tensors[name].file.name} and {fname}."
                    )
                tensors[name] = TensorInfo(dtype, shape, directory / fname)
        return tensors, index_bytes
    single = directory / SINGLE_WEIGHTS
    if single.is_file():
        header = read_safetensors_header(single)
        with open(single, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header_bytes = f.read(n)
        return {k: TensorInfo(d, s, single) for k, (d, s) in header.items()}, header_bytes
    others = sorted(p.name for p in directory.iterdir() if p.suffix in (".safetensors", ".bin"))
    raise CheckpointError(
        f"{directory} has neither {WEIGHTS_INDEX} nor {SINGLE_WEIGHTS}"
        + (f" (found {others})" if others else "")
        + "; expected the safetensors shards of CXR-LLaVA v2 (pickle .bin files are not loaded)."
    )


def expected_shapes(
    config: CXRLLaVAConfig, attn_implementation: str | None = None
) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the module tree ``config`` describes (built on ``meta``)."""
    with torch.device("meta"):
        skeleton = CXRLLaVAModel(config, attn_implementation)
    return {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}


def check_tensors(
    directory: Path, expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]
) -> None:
    """Raise ``CheckpointError`` naming every missing, unexpected and mis-shaped tensor."""
    missing = [n for n in expected if n not in found]
    extra = [n for n in found if n not in expected and not IGNORED_EXTRA.match(n)]
    wrong = [n for n in expected if n in found and tuple(found[n]) != tuple(expected[n])]
    if not (missing or extra or wrong):
        return
    lines = [
        f"checkpoint {directory} does not match its config.json "
        f"(config implies {len(expected)} tensors; the shards hold {len(found)}):"
    ]
    if missing:
        lines.append(f"  missing ({len(missing)}): " + _listing(missing, expected))
    if extra:
        lines.append(f"  unexpected ({len(extra)}): " + _listing(extra, found))
    if wrong:
        shown = [f"{n} is {list(found[n])}, expected {list(expected[n])}" for n in wrong]
        lines.append(f"  wrong shape ({len(wrong)}): " + _listing(shown))
    lines.append(
        "Use the config.json that was published with these shards; sizes are read from it "
        "(clip_vision_cfg, mm_projector_dim, llama)."
    )
    raise CheckpointError("\n".join(lines))


def _listing(names: list[str], shapes: dict[str, tuple[int, ...]] | None = None) -> str:
    shown = [f"{n} {list(shapes[n])}" if shapes else n for n in names[:MAX_LISTED]]
    more = f", ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return ", ".join(shown) + more


# --------------------------------------------------------------------------- loading
def choose_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or ``cuda:0`` when a GPU is visible, else ``cpu``.

    ``cuda:0`` is the first GPU ``CUDA_VISIBLE_DEVICES`` leaves visible: in a per-GPU inference
    process, its own GPU. A bare ``"cuda"`` is pinned to the current device's index, so that
    tensors and CUDA graphs name one device.
    """
    if device is None:
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def choose_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it (the checkpoint's dtype), fp16 on older GPUs, fp32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model(
    checkpoint: Checkpoint,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    *,
    quantize: Quantization = None,
) -> CXRLLaVAModel:
    """Materialise the checked checkpoint on ``device`` in ``dtype`` (default: by device).

    ``quantize`` ("int8" or "int4", see ``model.quantize``) reads the weights into host memory
    first and moves the decoder to the device one quantized layer at a time, so a 16 GB GPU
    never holds the 13.5 GB of full-precision LLaMA weights at once.
    """
    from safetensors import safe_open

    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {QUANTIZATIONS} or None, found {quantize!r}.")
    device = choose_device(device)
    dtype = dtype or choose_dtype(device)
    final_device = device
    if quantize is not None:
        device = torch.device("cpu")
    with torch.device("meta"):
        model = CXRLLaVAModel(checkpoint.config, attn_implementation)
    wanted = set(model.state_dict())
    by_file: dict[Path, list[str]] = {}
    for name, info in checkpoint.tensors.items():
        if name in wanted:
            by_file.setdefault(info.file, []).append(name)
    state: dict[str, torch.Tensor] = {}
    target = str(device)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt", device=target) as f:
            for name in names:
                state[name] = f.get_tensor(name).to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    model.requires_grad_(False)
    if quantize is not None:
        for name, child in model.named_children():
            if name != "llama":
                child.to(final_device)
        for name, child in model.llama.named_children():
            if name not in ("layers", "rotary_emb"):  # RoPE is rebuilt below, on the device
                child.to(final_device)
        quantize_decoder(model, quantize)
    model.reset_rotary()
    return model
