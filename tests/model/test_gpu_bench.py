"""bench/gpu.py runs every measurement at tiny sizes on the CPU (what CI can run)."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from model.modeling import CXRLLaVAModel

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "gpu.py"
#: What a bare GPU image has besides the standard library (issue: torch, transformers,
#: safetensors, sentencepiece, numpy, pillow).
BARE_IMAGE = {"torch", "transformers", "safetensors", "sentencepiece", "numpy", "PIL"}
FEW = ["--tiny", "--tokens", "3,2,2", "--reference-studies", "1", "--studies-per-slot", "1"]


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_measures_reference_ours_and_limits_and_prints_one_json_line(
    gpu_bench, capsys
) -> None:
    report = gpu_bench.main([*FEW, "--batches", "1,2", "--device", "cpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == json.loads(json.dumps(report))
    assert any(line.startswith("reference") for line in lines)  # the table
    assert report["tiny"] and report["bandwidth_gbps"] > 0 and report["matmul_tflops"] > 0
    assert report["reference"]["studies_per_s"] > 0
    assert [row["batch"] for row in report["ours"]] == [1, 2]
    for row in report["ours"]:
        assert row["studies"] == row["batch"]
        assert row["step_limit_ms"] > 0 and row["prefill_vs_matmul_limit"] > 0
        assert row["ttft_s"] > 0 and row["decode_tok_s"] > 0
    assert report["skipped"] == []


def test_batch_sizes_that_would_not_fit_the_time_budget_are_skipped_and_named(
    gpu_bench, capsys
) -> None:
    report = gpu_bench.main([*FEW, "--batches", "4", "--device", "cpu", "--budget-s", "0"])
    assert report["ours"] == [] and report["skipped"][0]["batch"] == 4
    assert "skipped batch 4" in capsys.readouterr().out


def test_the_published_config_has_the_7b_shapes(gpu_bench) -> None:
    config = gpu_bench.published_config()
    assert config.hidden_size == 4096 and config.vocab_size == 32000
    assert config.num_image_tokens == 1024 and config.vision.width == 1024
    assert config.llama["num_hidden_layers"] == 32 and config.llama["intermediate_size"] == 11008
    with torch.device("meta"):
        params = sum(p.numel() for p in CXRLLaVAModel(config).parameters())
    assert abs(params - 7.05e9) < 0.01e9  # "Model size 7.05B params" (spec §1.1)


def _local_file(module: str) -> Path | None:
    """The repository file of ``module`` (``model.x`` -> model/x.py), or None if not ours."""
    base = REPO.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file() and module.split(".")[0] in ("model", "bench"):
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """Every module an ``import`` anywhere in ``path`` names (in functions too), plus the
    submodules that ``from package import name`` may mean."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def import_closure(start: Path) -> tuple[set[Path], set[str]]:
    """(repository files reached, top-level names of everything else they import)."""
    seen: set[Path] = set()
    outside: set[str] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path):
            parts = name.split(".")
            local = [_local_file(".".join(parts[:k])) for k in range(1, len(parts) + 1)]
            if parts[0] in ("model", "bench"):
                todo.extend(p for p in local if p is not None)
            else:
                outside.add(parts[0])
    return seen, outside


def test_gpu_bench_imports_only_the_standard_library_and_the_bare_image_packages() -> None:
    files, outside = import_closure(BENCH)
    reached = {p.relative_to(REPO).as_posix() for p in files}
    assert {"model/__init__.py", "model/modeling.py", "model/scheduler.py"} <= reached
    extra = outside - BARE_IMAGE - set(sys.stdlib_module_names)
    assert not extra, f"bench/gpu.py reaches imports a bare GPU image lacks: {sorted(extra)}"


def test_the_closure_check_notices_imports_a_bare_image_lacks() -> None:
    # model.loader reaches huggingface_hub and torchao (in functions): not on a bare image
    _, loader_outside = import_closure(REPO / "model" / "loader.py")
    assert {"huggingface_hub", "torchao"} <= loader_outside - BARE_IMAGE
    files, _ = import_closure(BENCH)
    assert REPO / "model" / "loader.py" not in files


def test_gpu_bench_runs_as_a_script_from_the_repository_root_without_the_node_packages() -> None:
    """``python3 bench/gpu.py`` with cxrnode and worker made unimportable (a bare image has
    neither): the script finds ``model`` from the repository root by itself."""
    guard = textwrap.dedent(
        """
        import runpy, sys
        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("cxrnode", "worker", "tests"):
                    raise ImportError(f"{name} is not on a bare GPU image")
        sys.meta_path.insert(0, Refuse())
        sys.argv = ["bench/gpu.py", *sys.argv[1:]]
        runpy.run_path("bench/gpu.py", run_name="__main__")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", guard, *FEW, "--batches", "1", "--device", "cpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["tiny"] and [row["batch"] for row in report["ours"]] == [1]
