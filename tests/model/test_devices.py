"""Device choice: one inference process per GPU, each seeing its GPU as cuda:0."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from model.devices import parse_visible_devices, visible_gpus
from model.loader import choose_device


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0,1,3", [0, 1, 3]), ("2", [2]), ("", []), ("-1", []), ("1,-1,2", [1]), (" 4 , 5", [4, 5])],
)
def test_cuda_visible_devices_lists_the_gpus_to_hand_out(value, expected) -> None:
    assert parse_visible_devices(value) == expected


def test_gpus_named_by_uuid_are_refused_with_advice() -> None:
    with pytest.raises(ValueError, match="give indices"):
        parse_visible_devices("GPU-8f6c0d4e-1111-2222-3333-444455556666")


def test_the_environment_wins_over_the_driver(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert visible_gpus() == [3, 1]


def test_nvidia_smi_listing_is_read_when_the_environment_is_silent(monkeypatch, tmp_path) -> None:
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-a)'\necho 'GPU 1: NVIDIA H200 (UUID: GPU-b)'\n"
    )
    smi.chmod(0o755)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert visible_gpus() == [0, 1]


def test_visible_gpus_does_not_import_torch() -> None:
    code = "import sys, model.devices; model.devices.parse_visible_devices('0'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_default_device_is_the_first_visible_gpu_or_the_cpu(monkeypatch) -> None:
    assert choose_device(None) == (
        torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_device(None) == torch.device("cuda", 0)
    assert choose_device("cpu") == torch.device("cpu")
