"""The compat modules (cxrnode.compat.pynetdicom, cxrnode.compat.uvicorn, model.compat) on the
installed libraries: their checks pass, they find what is missing, and the receive tuning's
write-behind file keeps the bytes while it starts writing them out as they arrive."""

from __future__ import annotations

from pathlib import Path

import pynetdicom
import pytest
import uvicorn
from pynetdicom.transport import RequestHandler

from cxrnode.compat import pynetdicom as netcompat
from cxrnode.compat import uvicorn as webcompat
from model import compat as modelcompat


def test_the_installed_pynetdicom_has_every_internal_the_node_needs() -> None:
    assert netcompat.problems() == []
    assert netcompat.startup_problem() is None
    assert netcompat.tuning_problem() is None
    assert pynetdicom.__version__ in netcompat.TESTED_VERSIONS


def test_a_pynetdicom_without_a_needed_internal_stops_the_node_saying_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(RequestHandler, "_create_association")
    problem = netcompat.startup_problem()
    assert problem is not None
    assert "RequestHandler._create_association" in problem
    assert "pip install 'pynetdicom==3.0.4'" in problem


def test_an_untested_pynetdicom_turns_the_tuning_off_but_not_the_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pynetdicom, "__version__", "9.9.9")
    assert "9.9.9" in (netcompat.tuning_problem() or "")
    assert netcompat.request_handler(True) is netcompat.TrackingRequestHandler
    assert netcompat.startup_problem() is None


def test_the_installed_uvicorn_gets_the_quiet_server_and_another_the_stock_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = uvicorn.Config(app=lambda *_: None)
    assert webcompat.problem() is None
    assert type(webcompat.quiet_server(config)) is webcompat.QuietServer
    monkeypatch.setattr(uvicorn, "__version__", "0.1.0")
    assert "0.1.0" in (webcompat.problem() or "")
    assert type(webcompat.quiet_server(config)) is uvicorn.Server


def test_the_installed_transformers_has_what_the_decoder_reruns() -> None:
    assert modelcompat.problems() == []
    modelcompat.require()  # does not raise


def test_a_transformers_without_the_layer_parts_refuses_to_build_the_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from transformers.models.llama import modeling_llama

    monkeypatch.delattr(modeling_llama, "apply_rotary_pos_emb")
    with pytest.raises(RuntimeError, match="apply_rotary_pos_emb.*pip install 'transformers=="):
        modelcompat.require()


def test_write_behind_starts_each_megabyte_and_keeps_every_byte(tmp_path: Path) -> None:
    assert netcompat._sync_file_range is not None, "Linux has sync_file_range"
    chunks = [bytes([index % 251]) * 300_000 for index in range(12)]  # 3.6 MB, as PDUs come
    handle = netcompat.writeback_temporary_file(delete=False, dir=tmp_path, suffix=".dcm")
    started = []
    for chunk in chunks:
        handle.write(chunk)
        handle.file.flush()
        started.append(handle.file._started)
    handle.close()
    assert Path(handle.name).read_bytes() == b"".join(chunks)
    # writeback asked for at 1.2, 2.4 and 3.6 MB: each time everything written so far
    assert sorted(set(started)) == [0, 1_200_000, 2_400_000, 3_600_000]
