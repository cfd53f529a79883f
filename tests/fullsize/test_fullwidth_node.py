"""CI's run of bench/fullsize.py: the full-width, 2-layer checkpoint through the whole node.

The same path as the full-size benchmark (make or reuse the checkpoint, disk read and copy
bandwidth measured, `cxrnode serve` on embedded defaults with the checkpoint, one radiograph
sent with storescu, the text SR and the SC awaited at a dcmtk storescp), in bf16 and int8, with
3 tokens per answer. Figures are printed, not asserted: speed and memory are bench/ business.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from fullwidth import LAYERS

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[2] / "bench" / "fullsize.py"


def test_a_study_goes_through_the_node_with_the_full_width_checkpoint(
    fullwidth_model: Path, capsys
) -> None:
    pytest.importorskip("torchao", reason="the int8 run needs the quant extra (torchao)")
    spec = importlib.util.spec_from_file_location("bench_fullsize", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--model-dir", str(fullwidth_model), "--layers", str(LAYERS), "--tokens", "3"]
    report = bench.main([*args, "--json", "--timeout", "600"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and json.loads(printed[0]) == json.loads(json.dumps(report))
    assert report["layers"] == LAYERS and report["made_s"] is None  # the shared one, reused
    assert report["weight_bytes"] == sum(
        p.stat().st_size for p in fullwidth_model.glob("model-*.safetensors")
    )
    expected_files = ["Comprehensive SR Storage", "Secondary Capture Image Storage"]
    for run in (report, report["int8"]):
        assert run["pacs_files"] == expected_files  # the draft arrived at the PACS
        # 1024 image positions + the prompt, then the follow-up turns' new tokens
        assert run["prefill_tokens"] > 1024 + 60
        assert run["decode_steps"] == 3 * (3 - 1)  # 3 answers, first tokens from prefill
        for key in ("peak_rss_bytes", "load_s", "encode_s", "prefill_s", "decode_tok_s"):
            assert run[key] > 0, key
        assert run["decode_limit_tok_s"] > 0 and run["total_s"] > 0
    assert report["int8"]["bytes_per_token"] < report["bytes_per_token"]
    assert report["disk_read_s"] > 0 and report["copy_bandwidth_gbps"] > 0
