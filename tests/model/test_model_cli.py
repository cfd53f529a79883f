"""`cxrnode model make-tiny` and `cxrnode model report`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cxrnode.cli.model import model_app

runner = CliRunner()


@pytest.fixture
def png(tmp_path, images):
    path = tmp_path / "chest.png"
    Image.fromarray(images[0]).save(path)
    return path


def report(*args: str, env: dict | None = None):
    return runner.invoke(model_app, ["report", *args], env=env or {"CXRNODE_MODEL": ""})


def test_make_tiny_writes_a_loadable_checkpoint(tmp_path) -> None:
    target = tmp_path / "tiny"
    result = runner.invoke(model_app, ["make-tiny", str(target)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(target)
    assert (target / "config.json").is_file() and (target / "tokenizer.model").is_file()
    assert len(list(target.glob("model-*-of-*.safetensors"))) >= 2


def test_report_on_a_png_prints_one_json_object(png, tiny_dir) -> None:
    args = [str(png), "--model", str(tiny_dir), "--json", "--temperature", "0"]
    result = report(*args, "--max-new-tokens", "5")
    assert result.exit_code == 0, result.output
    d = json.loads(result.output)
    assert {"report", "differential", "recommendation", "findings", "model_id"} <= set(d)
    assert d["model_id"] == str(tiny_dir.resolve()) and len(d["model_hash"]) == 64


def test_report_takes_the_model_from_cxrnode_model_and_prints_sections(png, tiny_dir) -> None:
    result = report(str(png), "--max-new-tokens", "3", env={"CXRNODE_MODEL": str(tiny_dir)})
    assert result.exit_code == 0, result.output
    for title in ("REPORT", "DIFFERENTIAL DIAGNOSIS", "RECOMMENDATION", "FINDINGS", "cardiomegaly"):
        assert title in result.output


def test_png_conversion_matches_pil_luma_like_the_reference(tmp_path, tiny_dir, engine) -> None:
    rgb = np.random.default_rng(2).integers(0, 256, (530, 540, 3), dtype=np.uint8)
    path = tmp_path / "rgb.png"
    Image.fromarray(rgb).save(path)
    result = report(
        str(path), "--model", str(tiny_dir), "--json", "--temperature", "0", "--max-new-tokens", "4"
    )
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    (expected,) = engine.generate([gray], temperature=0, max_new_tokens=4)
    assert json.loads(result.output)["report"] == expected.report


def test_a_missing_model_is_a_clear_error_not_a_traceback(png, tmp_path) -> None:
    result = report(str(png), "--model", str(tmp_path / "no-such-model"))
    assert result.exit_code == 2
    assert "cannot load model" in result.output and "no such directory" in result.output
    assert "Traceback" not in result.output
    result = report(str(png))
    assert result.exit_code == 2 and "no model given" in result.output


def test_bad_sampling_options_are_refused_before_loading(png, tiny_dir) -> None:
    result = report(str(png), "--model", str(tiny_dir), "--top-p", "2")
    assert result.exit_code == 2 and "top_p must be in (0, 1]" in result.output


def test_sixteen_bit_images_are_refused(tmp_path, tiny_dir) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((600, 600), 4000, dtype=np.uint16)).save(path)
    result = report(str(path), "--model", str(tiny_dir))
    assert result.exit_code == 2 and "16-bit" in result.output


def test_dicom_input_uses_the_node_display_pipeline_and_patient_age(tmp_path, tiny_dir) -> None:
    import dicomgen

    path = dicomgen.make_chest(tmp_path / "child.dcm", patient_age="006Y", rows=600, cols=560)
    result = report(
        str(path), "--model", str(tiny_dir), "--json", "--temperature", "0", "--max-new-tokens", "3"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["prompts"]["report"] == "paediatric"


def test_the_cli_module_does_not_import_torch() -> None:
    code = "import sys, cxrnode.cli.model\nassert 'torch' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_make_random_refuses_a_size_other_than_full(tmp_path) -> None:
    result = runner.invoke(model_app, ["make-random", str(tmp_path / "x"), "--size", "13b"])
    assert result.exit_code == 2
    assert "the only size is 'full'" in result.output
    assert not (tmp_path / "x").exists()
