"""ReportServer: futures from any thread, continuous batching behind them."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from model.contracts import GenerationParams, ModelResult, StudyContext
from model.preprocess import UnsupportedImageError
from model.serving import ReportServer, ServerClosed

GREEDY = GenerationParams(temperature=0, max_new_tokens=6)


def test_results_from_the_server_match_the_engine_run_alone(engine, images) -> None:
    with ReportServer(engine, max_batch=3, worker="infer@test") as server:
        futures = [
            server.submit(im, StudyContext(age_years=30 + i), GREEDY)
            for i, im in enumerate(images[:5])
        ]
        results = [f.result(timeout=120) for f in futures]
    for i, result in enumerate(results):
        assert isinstance(result, ModelResult)
        (alone,) = engine.generate(
            images[i : i + 1], [StudyContext(age_years=30 + i)], temperature=0, max_new_tokens=6
        )
        assert (result.report, result.differential, result.recommendation) == (
            alone.report,
            alone.differential,
            alone.recommendation,
        )
        assert result.findings == alone.findings
        assert result.worker == "infer@test"
        assert result.batch_id.startswith(server.id + "-")
        assert 1 <= result.batch_size <= 3


def test_batch_size_is_the_most_studies_that_decoded_together(engine, images) -> None:
    long = GenerationParams(temperature=0, max_new_tokens=30)
    with ReportServer(engine, max_batch=4) as server:
        futures = [server.submit(im, None, long) for im in images[:4]]
        results = [f.result(timeout=120) for f in futures]
    assert max(r.batch_size for r in results) >= 2
    assert all(r.batch_size <= 4 for r in results)
    # Studies admitted in the same round share a batch id.
    assert len({r.batch_id for r in results}) < 4


def test_threads_submitting_at_once_all_get_their_own_result(engine, images) -> None:
    results: dict[int, ModelResult] = {}
    with ReportServer(engine, max_batch=2) as server:

        def work(i: int) -> None:
            results[i] = server.submit(images[i], None, GREEDY).result(timeout=120)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    expected = engine.generate(images[:4], temperature=0, max_new_tokens=6)
    assert [results[i].report for i in range(4)] == [r.report for r in expected]


def test_an_image_the_model_does_not_take_is_refused_at_submit(engine) -> None:
    with ReportServer(engine, max_batch=1) as server, pytest.raises(UnsupportedImageError):
        server.submit(np.zeros((600, 600, 3), np.uint8))


def test_a_failing_study_fails_only_its_own_future(engine, images, monkeypatch) -> None:
    real = engine.conversation

    def conversation(image, *args, **kwargs):
        study = real(image, *args, **kwargs)
        if image is images[0]:

            def advance(generated):
                raise RuntimeError("labeler broke on this report")

            study.advance = advance
        return study

    monkeypatch.setattr(engine, "conversation", conversation)
    with ReportServer(engine, max_batch=2) as server:
        bad = server.submit(images[0], None, GREEDY)
        good = server.submit(images[1], None, GREEDY)
        assert good.result(timeout=120).report
        with pytest.raises(RuntimeError, match="labeler broke"):
            bad.result(timeout=120)


def test_a_model_failure_fails_the_running_studies_and_the_server_goes_on(
    engine, images, monkeypatch
) -> None:
    with ReportServer(engine, max_batch=2) as server:
        decoder = server._scheduler.decoder
        real = decoder.decode
        calls = {"n": 0}

        def decode(columns):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("model step failed (simulated)")  # not memory: no retry
            return real(columns)

        monkeypatch.setattr(decoder, "decode", decode)
        running = server.submit(images[0], None, GREEDY)  # its first decode step fails
        with pytest.raises(RuntimeError, match="model step failed"):
            running.result(timeout=120)
        after = server.submit(images[2], None, GREEDY)
        (alone,) = engine.generate(images[2:3], temperature=0, max_new_tokens=6)
        assert after.result(timeout=120).report == alone.report


def test_after_close_submit_is_refused_and_pending_studies_can_be_cancelled(engine, images):
    server = ReportServer(engine, max_batch=1)
    first = server.submit(images[0], None, GenerationParams(temperature=0, max_new_tokens=20))
    queued = [server.submit(im, None, GREEDY) for im in images[1:4]]
    server.close(cancel_pending=True, timeout=120)
    assert first.result(timeout=1).report
    outcomes = [f.exception(timeout=1) for f in queued]
    assert any(isinstance(e, ServerClosed) for e in outcomes)
    with pytest.raises(ServerClosed):
        server.submit(images[0], None, GREEDY)
