"""Find, check and load a CXR-LLaVA v2 checkpoint.

A checkpoint is a directory (or a Hugging Face hub id, downloaded with ``snapshot_download``)
holding ``config.json``, the safetensors shards with ``model.safetensors.index.json`` (or a single
``model.safetensors``) and the tokenizer files. Before a single weight is allocated, the names,
shapes and shard files are checked against the module tree that ``config.json`` describes
(read from the safetensors headers, which are plain JSON at the start of each shard); any
difference is reported by name.

Loading at scale (the published checkpoint is 14 GB of bf16): the model is built on the ``meta``
device and each shard is memory-mapped; a tensor already in the load dtype on the CPU *is* its
mapped bytes (no copy: the page cache holds the weights once, and the process maps them), any
other tensor is converted or moved one at a time from its mapping. So there is no full host copy
on the way to a GPU and no fp32 detour. On the CPU, fp32 (what the parity tests compare) is kept
only where the fp32 copy fits comfortably in the memory available; otherwise the weights stay in
bf16 (``choose_dtype``). Before anything is allocated, a checkpoint that cannot fit the device's
free memory is refused with the numbers (``CheckpointTooBig``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import CONFIG_NAME, ConfigError, CXRLLaVAConfig
from model.devices import visible_gpus
from model.modeling import CXRLLaVAModel
from model.quantize import CHOICES as QUANTIZATIONS
from model.quantize import Quantization, quantize_layer

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointTooBig",
    "ModelNotFoundError",
    "Quantization",
    "choose_device",
    "choose_dtype",
    "inspect_checkpoint",
    "load_model",
    "map_safetensors",
    "resolve_dtype",
    "visible_gpus",
]

log = logging.getLogger(__name__)

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
#: safetensors dtype names -> torch dtypes (the ones a checkpoint can hold).
SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
}
#: On the CPU, fp32 is chosen when its copy of the weights takes at most this share of the
#: memory available (the rest is for the KV cache, activations and the node's other processes).
FP32_SHARE = 0.5
#: A device must hold the weights plus this share of them more (activations, allocator slack);
#: the KV cache is checked on its own when it is allocated (``model.decoder``).
FIT_MARGIN = 0.05
GIB = 1024**3


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a readable checkpoint directory nor a downloadable hub id."""


class CheckpointError(ValueError):
    """The checkpoint's files do not match each other or its config.json."""


class CheckpointTooBig(CheckpointError):
    """The checkpoint's weights cannot fit the memory free on the device it is loaded on."""


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

    @property
    def weight_bytes(self) -> int:
        """Bytes of the stored tensors (14.1 GB for the published bf16 shards)."""
        return sum(_nbytes(t.dtype, t.shape) for t in self.tensors.values())

    def load_bytes(self, dtype: torch.dtype, quantize: Quantization = None) -> int:
        """Bytes the loaded weights take in ``dtype`` (decoder linears at 1 or 0.5 byte a
        value, plus their scales, when quantized)."""
        size = torch.empty((), dtype=dtype).element_size()
        total = 0
        for name, info in self.tensors.items():
            values = math.prod(info.shape)
            if quantize and _is_decoder_linear(name):
                per_value = 1.0 if quantize == "int8" else 0.5
                total += int(values * per_value) + info.shape[0] * 2 * size
            else:
                total += values * size
        return total


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    element = torch.empty((), dtype=SAFETENSORS_DTYPES.get(dtype, torch.uint8)).element_size()
    return math.prod(shape) * element


def _is_decoder_linear(name: str) -> bool:
    return name.startswith("llama.layers.") and name.endswith("_proj.weight")


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


def resolve_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype from a setting (``"auto"``/None: chosen by ``choose_dtype``, ``"bfloat16"``,
    ``"bf16"``, ``"float32"``, ``"fp32"``, ``"float16"``, ``"fp16"``) or a ``torch.dtype``."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value == "auto":
        return None
    try:
        return DTYPE_NAMES[value.lower()]
    except KeyError:
        raise ValueError(
            f"model dtype {value!r} is not one of auto, {', '.join(DTYPE_NAMES)}."
        ) from None


def choose_dtype(device: torch.device, fp32_bytes: int | None = None) -> torch.dtype:
    """bf16 on GPUs that support it (the checkpoint's dtype), fp16 on older GPUs; on the CPU
    fp32 when ``fp32_bytes`` (the weights in fp32; None: small) take at most ``FP32_SHARE`` of
    the memory available, else bf16 (the published 7 B model is 28 GB in fp32)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if fp32_bytes is None or fp32_bytes <= FP32_SHARE * free_memory(device):
        return torch.float32
    return torch.bfloat16


def free_memory(device: torch.device) -> int:
    """Bytes free for new tensors on ``device``: the GPU's free memory, or on the CPU the
    kernel's ``MemAvailable`` (which counts reclaimable page cache, the mapped weights')."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_fits(
    checkpoint: Checkpoint,
    device: torch.device,
    dtype: torch.dtype,
    quantize: Quantization = None,
    free_bytes: int | None = None,
) -> int:
    """Raise ``CheckpointTooBig`` when the weights cannot fit ``device``; return their bytes.

    ``free_bytes`` (default: measured by ``free_memory``) is what the device has free now.
    """
    need = checkpoint.load_bytes(dtype, quantize)
    free = free_memory(device) if free_bytes is None else free_bytes
    if need * (1 + FIT_MARGIN) > free:
        kind = f"{quantize} weights" if quantize else f"{str(dtype).removeprefix('torch.')}"
        raise CheckpointTooBig(
            f"checkpoint {checkpoint.directory} needs {_size(need)} on {device} ({kind}, plus "
            f"{FIT_MARGIN:.0%} for activations) but only {_size(free)} of {device} is free; "
            "refusing to load it. Free the device, use a larger one, or load quantized weights "
            "(CXRNODE_QUANTIZE=int8 or int4)."
        )
    return need


def _size(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB else f"{nbytes / 1024**2:.1f} MiB"


def map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view of its memory-mapped bytes (no copy).

    The mapping is private and copy-on-write: nothing written to a tensor reaches the file.
    It stays open while any of the tensors lives. A tensor whose offset is not aligned to its
    element size (never in files safetensors writes) is copied instead.
    """
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        size = os.fstat(f.fileno()).st_size
        if size <= 8 + n:
            return {}
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    base = 8 + n
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}.")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        element = torch.empty((), dtype=dtype).element_size()
        count = (end - begin) // element
        if count != math.prod(shape) or base + end > size:
            raise CheckpointError(f"{path}: tensor {name}'s data does not match its header.")
        if count == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        elif (base + begin) % element:
            raw = torch.frombuffer(
                mapped, dtype=torch.uint8, count=end - begin, offset=base + begin
            )
            out[name] = raw.clone().view(dtype).view(shape)
        else:
            flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=base + begin)
            out[name] = flat.view(shape)
    return out


def read_through(path: Path, chunk: int = 16 * 1024 * 1024) -> int:
    """Read a file front to back (into the page cache, which its mappings share); return the
    bytes read. Loading then costs one sequential read, not page faults in model order."""
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    total = 0
    with open(path, "rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while n := f.readinto(view):
            total += n
    return total


def load_model(
    checkpoint: Checkpoint,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    *,
    quantize: Quantization = None,
    free_bytes: int | None = None,
) -> CXRLLaVAModel:
    """Materialise the checked checkpoint on ``device`` in ``dtype`` (default: by device).

    Tensors come from the memory-mapped shards (``map_safetensors``): on the CPU in their
    stored dtype they are used in place; otherwise each is converted or moved on its own, so
    the only full copy is the result. ``quantize`` ("int8" or "int4", see ``model.quantize``)
    builds the model on the CPU first and moves the decoder to the device one quantized layer
    at a time, so a 16 GB GPU never holds the 13.5 GB of full-precision LLaMA weights at once.
    ``free_bytes`` overrides the measured free memory of the device (``check_fits``).
    """
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {QUANTIZATIONS} or None, found {quantize!r}.")
    device = choose_device(device)
    dtype = resolve_dtype(dtype) or choose_dtype(device, checkpoint.load_bytes(torch.float32))
    check_fits(checkpoint, device, dtype, quantize, free_bytes)
    started = time.perf_counter()
    with torch.device("meta"):
        model = CXRLLaVAModel(checkpoint.config, attn_implementation)
    wanted = set(model.state_dict())
    by_file: dict[Path, list[str]] = {}
    for name, info in checkpoint.tensors.items():
        if name in wanted:
            by_file.setdefault(info.file, []).append(name)
    if quantize is None:
        state: dict[str, torch.Tensor] = {}
        for path, names in by_file.items():
            read_through(path)
            mapped = map_safetensors(path)
            for name in names:
                tensor = mapped.pop(name)
                if tensor.device != device or tensor.dtype != dtype:
                    tensor = tensor.to(device=device, dtype=dtype)
                state[name] = tensor
            del mapped
        model.load_state_dict(state, strict=True, assign=True)
        del state
    else:
        _load_quantized(model, by_file, dtype, quantize, device)
    model.eval()
    model.requires_grad_(False)
    model.reset_rotary()
    log.info(
        "loaded %s on %s in %s%s in %.1f s",
        checkpoint.directory,
        device,
        str(dtype).removeprefix("torch."),
        f" ({quantize})" if quantize else "",
        time.perf_counter() - started,
    )
    return model


def _load_quantized(
    model: CXRLLaVAModel,
    by_file: dict[Path, list[str]],
    dtype: torch.dtype,
    quantize: str,
    device: torch.device,
) -> None:
    """Fill the meta-built ``model`` shard by shard, quantizing each decoder layer on
    ``device`` as soon as its weights are all in, so that at most one shard's full-precision
    decoder weights exist at a time; everything else ends on ``device`` in ``dtype``."""
    done: set[int] = set()
    skipped: list[str] = []
    for path, names in by_file.items():
        read_through(path)
        mapped = map_safetensors(path)
        part: dict[str, torch.Tensor] = {}
        for name in names:
            tensor = mapped.pop(name)
            if tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            elif not _is_decoder_linear(name):
                tensor = tensor.clone()  # kept: a copy lets the shard's mapping go
            part[name] = tensor
        del mapped
        model.load_state_dict(part, strict=False, assign=True)
        del part
        for i, layer in enumerate(model.llama.layers):
            if i in done or any(p.is_meta for p in layer.parameters()):
                continue
            layer.to(device)
            skipped += [f"llama.layers.{i}.{n}" for n in quantize_layer(layer, quantize, device)]
            done.add(i)
        for i, layer in enumerate(model.llama.layers):  # a layer this shard left half-read:
            if i not in done:  # copy its part, so that the shard's mapping goes now
                for param in layer.parameters():
                    if not param.is_meta:
                        param.data = param.data.clone()
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:  # inspect_checkpoint has checked the names; this would be a bug here
        raise CheckpointError(f"tensors not loaded: {_listing(meta)}")
    for name, child in model.named_children():
        if name != "llama":
            child.to(device)
    for name, child in model.llama.named_children():
        if name not in ("layers", "rotary_emb"):  # RoPE is rebuilt by the caller, on the device
            child.to(device)
    if skipped:
        log.warning("%d linear layers left unquantized (width not a multiple of 32)", len(skipped))
