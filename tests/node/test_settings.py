"""Settings: environment, TOML file, validation, and the example file kept in sync."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cxrnode.jobs.broker import broker_url, socket_path
from cxrnode.settings import Settings, example_toml

REPO = Path(__file__).resolve().parents[2]


def test_example_config_is_in_sync_with_the_settings_class() -> None:
    example = (REPO / "config" / "cxrnode.example.toml").read_text()
    assert example.strip() == example_toml().strip(), (
        "run: cxrnode config example > config/cxrnode.example.toml"
    )
    for name in Settings.model_fields:
        assert f"# {name} = " in example


def test_environment_overrides_the_toml_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        'ae_title = "FROMFILE"\ndicom_port = 4242\nallowed_calling_aets = ["A", "B@10.0.0.1"]\n'
    )
    monkeypatch.setenv("CXRNODE_CONFIG", str(config))
    monkeypatch.setenv("CXRNODE_DICOM_PORT", "5555")
    settings = Settings()
    assert settings.ae_title == "FROMFILE"
    assert settings.dicom_port == 5555
    assert settings.allowed_calling_aets == ["A", "B@10.0.0.1"]


def test_comma_separated_lists_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXRNODE_ALLOWED_CALLING_AETS", "PACS1, PACS2@192.0.2.7")
    monkeypatch.setenv("CXRNODE_DESTINATIONS", "ORTHANC@pacs:4242")
    settings = Settings()
    assert settings.allowed_calling_aets == ["PACS1", "PACS2@192.0.2.7"]
    assert settings.calling_aet_allowed("PACS2", "192.0.2.7")
    assert not settings.calling_aet_allowed("PACS2", "192.0.2.8")
    assert not settings.calling_aet_allowed("OTHER", "192.0.2.7")


@pytest.mark.parametrize(
    "name,value,message",
    [
        ("AE_TITLE", "WAY_TOO_LONG_AE_TITLE", "not a valid AE title"),
        ("DESTINATIONS", "ORTHANC@pacs", "AET@host:port"),
        ("DICOM_PORT", "70000", "less than or equal"),
    ],
)
def test_invalid_settings_say_what_is_wrong(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(f"CXRNODE_{name}", value)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_a_data_dir_too_deep_for_a_unix_socket_gets_a_short_socket_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    monkeypatch.setenv("CXRNODE_DATA_DIR", str(deep))
    path = socket_path(Settings())
    assert len(str(path)) <= 100 and path.name == "redis.sock"
    monkeypatch.setenv("CXRNODE_DATA_DIR", str(deep))
    assert socket_path(Settings()) == path  # every process of one DATA_DIR agrees


def test_defaults_are_the_embedded_mode(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CXRNODE_DATA_DIR", str(tmp_path))
    settings = Settings()
    assert settings.effective_database_url == f"sqlite:///{tmp_path / 'cxrnode.db'}"
    assert broker_url(settings) == f"redis+socket://{tmp_path / 'run' / 'redis.sock'}"
    assert (settings.ae_title, settings.dicom_port, settings.settle_seconds) == (
        "CXRNODE",
        11112,
        5.0,
    )
