"""`cxrnode model ...`: build a tiny test checkpoint, draft a report for one image file.

Registered by ``cxrnode.cli`` as ``app.add_typer(model_app, name="model")``. Nothing here
imports torch at import time (the node process must stay torch-free); the model is imported
inside the commands that need it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from model.contracts import StudyContext

model_app = typer.Typer(
    help="CXR-LLaVA v2 model tools (tiny or full-size random checkpoints, one-off report).",
    no_args_is_help=True,
)

SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"cxrnode model: {message}", err=True)
    return typer.Exit(code)


@model_app.command("make-tiny")
def make_tiny(
    directory: Annotated[Path, typer.Argument(help="Directory to write the checkpoint into.")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Write a tiny CXR-LLaVA v2 checkpoint in the published format (for tests and demos)."""
    from model.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(directory, seed=seed)
    typer.echo(str(path))


@model_app.command("make-random")
def make_random(
    directory: Annotated[Path, typer.Argument(help="Directory to write the checkpoint into.")],
    size: Annotated[
        str, typer.Option(help="full: the published CXR-LLaVA v2 sizes (7.05 B, ~14 GB bf16).")
    ] = "full",
    layers: Annotated[
        int | None,
        typer.Option(min=1, help="Keep every width but only this many LLaMA decoder layers."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Write a random bf16 checkpoint in the published format at full size, shard by shard.

    Its answers are noise; its cost (memory, load time, tokens/s) is the real model's.
    """
    if size != "full":
        raise _fail(f"--size {size!r}: the only size is 'full' (use make-tiny for a tiny one).")
    from model.tiny import make_random_checkpoint

    try:
        path = make_random_checkpoint(directory, layers=layers, seed=seed)
    except OSError as exc:
        raise _fail(f"cannot write {directory}: {exc}", 1) from None
    typer.echo(str(path))


@model_app.command("report")
def report(
    file: Annotated[Path, typer.Argument(help="A DICOM file, or a PNG/JPEG radiograph.")],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            envvar="CXRNODE_MODEL",
            help="Checkpoint directory or hub id (default: $CXRNODE_MODEL).",
        ),
    ] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.2,
    top_p: Annotated[float, typer.Option("--top-p")] = 0.8,
    top_k: Annotated[int, typer.Option("--top-k")] = 50,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 512,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    age: Annotated[
        float | None, typer.Option(help="Patient age in years (DICOM files carry their own).")
    ] = None,
    confirm: Annotated[
        bool, typer.Option("--confirm/--no-confirm", help="Ask yes/no follow-ups for findings.")
    ] = False,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, ...")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Draft a report, differential and recommendation for one image and print them."""
    if not model:
        raise _fail(
            "no model given: pass --model DIR|HUB_ID or set CXRNODE_MODEL "
            "(`cxrnode model make-tiny DIR` writes a small test checkpoint)."
        )
    image, context = _read_image(file)
    if age is not None:
        context = dataclasses.replace(context, age_years=age)

    from model.config import ConfigError
    from model.generate import SamplingParams
    from model.loader import CheckpointError, ModelNotFoundError
    from model.pipeline import ReportEngine
    from model.preprocess import UnsupportedImageError
    from model.prompts import PromptConfig
    from model.tokenizer import TokenizerError

    try:
        SamplingParams(temperature, top_p, top_k, max_new_tokens)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    try:
        engine = ReportEngine.load(
            model, device=device, prompts=PromptConfig(confirm_findings=confirm)
        )
    except (ModelNotFoundError, CheckpointError, ConfigError, TokenizerError, ValueError) as exc:
        raise _fail(f"cannot load model: {exc}") from None
    try:
        (result,) = engine.generate(
            [image],
            [context],
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            max_new_tokens=max_new_tokens,
            seed=seed,
        )
    except UnsupportedImageError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
        return
    typer.echo("AI DRAFT - NOT VERIFIED\n")
    for title, text in (
        ("REPORT", result.report),
        ("DIFFERENTIAL DIAGNOSIS", result.differential),
        ("RECOMMENDATION", result.recommendation),
    ):
        typer.echo(f"{title}\n{text}\n")
    typer.echo("FINDINGS")
    for name, state in result.findings.items():
        source = result.finding_sources.get(name, "report")
        typer.echo(f"  {name:<18} {state:<14} ({source})")
    typer.echo(f"\nmodel: {result.model_id} (sha256 {result.model_hash[:16]})")


def _read_image(file: Path) -> tuple[np.ndarray, StudyContext]:
    """8-bit grayscale pixels and study context (DICOM only) from an image file."""
    if not file.is_file():
        raise _fail(f"{file} not found.")
    with open(file, "rb") as f:
        head = f.read(132)
    if head[128:132] == b"DICM" or file.suffix.lower() in (".dcm", ".dicom"):
        return _read_dicom(file)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as img:
            img.load()
            if img.mode in SIXTEEN_BIT_MODES and np.asarray(img).max() > 255:
                raise _fail(
                    f"{file} is a 16-bit image, which the model does not take (the reference "
                    "refuses it too); pass the DICOM file, or export an 8-bit PNG/JPEG."
                )
            gray = img.convert("L")  # PIL luma, as the reference converts
    except (UnidentifiedImageError, OSError) as exc:
        raise _fail(f"{file} is neither DICOM nor an image PIL can read ({exc}).") from None
    return np.asarray(gray, dtype=np.uint8), StudyContext()


def _read_dicom(file: Path) -> tuple[np.ndarray, StudyContext]:
    try:
        import pydicom

        from cxrnode.ingest.header import study_context
        from cxrnode.prepare.display import display_image
    except ImportError as exc:
        raise _fail(f"DICOM input needs cxrnode.prepare.display ({exc}).") from None
    try:
        ds = pydicom.dcmread(file)
        image = display_image(ds)
        context = study_context(ds)
    except Exception as exc:  # pydicom and imaging errors both carry a readable message
        raise _fail(f"cannot read DICOM image {file}: {exc}") from None
    return image, context
