"""The GPU path's fail-safes, proven on the CPU by injecting the failures a GPU would raise.

A CUDA out-of-memory error, a lost device and a failed graph capture cannot happen on this
machine's CPU, so they are raised where CUDA raises them: inside a decoder layer's forward
(a forward pre-hook on its first norm, which every prefill and decode step calls) and in a
graph capture attempted without CUDA. Everything around them is the real engine, server,
model host and process.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from model.contracts import GenerationParams
from model.decoder import SlotDecoder
from model.failsafe import is_device_lost, is_out_of_memory
from model.loader import CheckpointTooBig, inspect_checkpoint, load_model
from model.pipeline import ReportEngine
from model.serving import ReportServer
from worker.batcher import DEVICE_LOST_EXIT, ModelHost, ModelUnavailable

GREEDY = GenerationParams(temperature=0, max_new_tokens=6)
REPO = Path(__file__).resolve().parents[2]


@contextmanager
def failing_layer(engine, make_error, when=lambda rows: True):
    """Raise ``make_error()`` from the first decoder layer whenever ``when(rows)`` holds."""
    calls = {"raised": 0}

    def hook(module, args):
        rows = args[0].shape[0]
        if when(rows):
            calls["raised"] += 1
            raise make_error()

    handle = engine.model.llama.layers[0].input_layernorm.register_forward_pre_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def oom() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 15.77 GiB"
    )


def lost() -> BaseException:
    return torch.AcceleratorError("CUDA error: an illegal memory access was encountered")


def test_failures_are_sorted_into_out_of_memory_device_lost_and_other() -> None:
    assert is_out_of_memory(oom()) and not is_device_lost(oom())
    assert is_device_lost(lost()) and not is_out_of_memory(lost())
    assert is_device_lost(RuntimeError("CUDA error: unspecified launch failure"))
    assert is_out_of_memory(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    for other in (ValueError("bad chat"), RuntimeError("shape mismatch")):
        assert not is_out_of_memory(other) and not is_device_lost(other)


def test_out_of_memory_halves_the_batch_and_runs_its_studies_again(engine, images, caplog) -> None:
    expected = [
        r.report for r in engine.generate(images[:4], temperature=0, max_new_tokens=6, seed=0)
    ]
    caplog.set_level(logging.WARNING)
    with failing_layer(engine, oom, when=lambda rows: rows > 2) as calls:
        server = ReportServer(engine, max_batch=4, worker="w")
        try:
            futures = [server.submit(im, None, GREEDY) for im in images[:4]]
            results = [f.result(timeout=300) for f in futures]
        finally:
            server.close()
    assert calls["raised"] >= 1, "the injected failure must have fired"
    assert [r.report for r in results] == expected, "none lost, none changed"
    assert server.max_batch == 2 and all(r.batch_size <= 2 for r in results)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "out of memory" in warnings[0].getMessage()
    assert "halved from 4 to 2" in warnings[0].getMessage()


def test_out_of_memory_at_one_study_fails_it_instead_of_looping(engine, images) -> None:
    with failing_layer(engine, oom):
        server = ReportServer(engine, max_batch=1)
        try:
            future = server.submit(images[0], None, GREEDY)
            with pytest.raises(torch.OutOfMemoryError):
                future.result(timeout=120)
        finally:
            server.close()
    assert server.max_batch == 1


def _prefilled(decoder: SlotDecoder, engine) -> None:
    embeds = [engine.model.embed_tokens(torch.tensor(ids)) for ids in ([1, 5, 9, 30], [1, 7])]
    decoder.prefill([0, 1], [0, 0], embeds)
    decoder.tokens.copy_(torch.tensor([11, 12]))
    decoder.positions.copy_(torch.tensor([4, 2]))


def test_a_failed_graph_capture_falls_back_to_eager_decoding_with_one_warning(
    engine, caplog
) -> None:
    with torch.inference_mode():
        eager = SlotDecoder(engine.model, slots=2, capacity=64)
        _prefilled(eager, engine)
        want = eager.decode(5).clone()

        graphs = SlotDecoder(engine.model, slots=2, capacity=64)
        graphs.cuda_graphs = True  # a capture will be attempted (and fail: there is no CUDA)
        caplog.set_level(logging.WARNING, logger="model.decoder")
        graphs.warm_up()
        assert not graphs.cuda_graphs
        _prefilled(graphs, engine)
        got = graphs.decode(5).clone()
        graphs.decode(5)
    assert torch.equal(got, want)
    warnings = [r for r in caplog.records if r.name == "model.decoder"]
    assert len(warnings) == 1 and "capture failed" in warnings[0].getMessage()


def test_a_lost_device_makes_the_model_host_exit_with_its_status(engine, images, caplog) -> None:
    exits: list[int] = []
    host = ModelHost(lambda: engine, max_batch=2, exit_process=exits.append)
    caplog.set_level(logging.CRITICAL, logger="worker.batcher")
    with failing_layer(engine, lost):
        future = host.submit(images[0], None, GREEDY)
        with pytest.raises(torch.AcceleratorError):
            future.result(timeout=120)
    host.close()
    assert exits == [DEVICE_LOST_EXIT]
    (record,) = [r for r in caplog.records if r.name == "worker.batcher"]
    assert "device is lost" in record.getMessage() and str(DEVICE_LOST_EXIT) in record.getMessage()


def test_a_lost_device_ends_the_worker_process_with_a_non_zero_status(tiny_dir) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time, numpy as np, torch
        from model.contracts import GenerationParams
        from model.pipeline import ReportEngine
        from worker.batcher import ModelHost

        engine = ReportEngine.load({str(tiny_dir)!r}, device="cpu")
        def hook(module, args):
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        engine.model.llama.layers[0].input_layernorm.register_forward_pre_hook(hook)
        host = ModelHost(lambda: engine)
        host.submit(np.full((600, 600), 80, np.uint8), None, GenerationParams(temperature=0))
        time.sleep(120)
        print("still running", flush=True)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == DEVICE_LOST_EXIT, proc.stdout + proc.stderr
    assert "still running" not in proc.stdout
    assert "device is lost" in proc.stderr


def test_a_checkpoint_that_cannot_fit_the_free_memory_is_refused_with_the_numbers(
    tiny_dir,
) -> None:
    checkpoint = inspect_checkpoint(tiny_dir)
    need = checkpoint.load_bytes(torch.float32)
    with pytest.raises(CheckpointTooBig) as refused:
        load_model(checkpoint, "cpu", free_bytes=need // 2)
    message = str(refused.value)
    assert f"needs {need / 1024**2:.1f} MiB on cpu" in message
    assert f"only {need / 2 / 1024**2:.1f} MiB of cpu is free" in message
    assert "refusing" in message and "CXRNODE_QUANTIZE" in message

    host = ModelHost(lambda: ReportEngine.load(tiny_dir, device="cpu", free_bytes=1024))
    with pytest.raises(ModelUnavailable, match=r"needs .* MiB on cpu .* only 0\.0 MiB"):
        host.server()
    fits = ModelHost(lambda: ReportEngine.load(tiny_dir, device="cpu"))
    assert fits.server() is not None
    fits.close()
