"""bench/gpu.py runs every measurement at tiny sizes on the CPU (what CI can run)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from model.modeling import CXRLLaVAModel

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu.py"
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
