"""ServerSettings: one definition behind the serve flags, APPLIANCE_* variables and --config."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli import cli
from appliance.server.settings import DEFAULT_PARALLEL, ServerSettings
from signing.errors import InputError


def test_flags_beat_environment_beats_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "server.toml"
    config.write_text("max_queue = 3\nport = 9000\nlog_prompts = true\nhost = '10.0.0.1'\n")
    monkeypatch.setenv("APPLIANCE_PORT", "9100")
    monkeypatch.setenv("APPLIANCE_HOST", "10.0.0.2")
    monkeypatch.setenv("APPLIANCE_ROOT", str(tmp_path))  # the CLI's, not a server setting
    settings = ServerSettings.load(config=config, host="127.0.0.9", max_queue=None)
    assert settings.host == "127.0.0.9"  # flag
    assert settings.port == 9100  # environment
    assert settings.max_queue == 3  # file (the flag was not given)
    assert settings.log_prompts is True  # file
    assert settings.max_body_bytes == ServerSettings.model_fields["max_body_bytes"].default


def test_defaults_are_safe() -> None:
    settings = ServerSettings.load()
    assert settings.host == "127.0.0.1"
    assert settings.log_prompts is False
    assert settings.public_docs is False
    assert settings.concurrency == DEFAULT_PARALLEL


def test_resolved_puts_keys_and_log_under_the_root(tmp_path: Path) -> None:
    settings = ServerSettings.load(max_concurrency=3).resolved(root=tmp_path)
    assert settings.api_key_file == tmp_path / "api-keys.json"
    assert settings.request_log == tmp_path / "requests.jsonl"
    assert settings.concurrency == 3
    assert settings.resolved(root=Path("/elsewhere")).api_key_file == settings.api_key_file


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("max_quee = 3\n", "max_quee: Extra inputs are not permitted"),
        ("max_queue = -1\n", "max_queue: Input should be greater than or equal to 0"),
        ("max_queue = \n", "server config"),
    ],
)
def test_a_bad_config_file_is_one_clear_error(tmp_path: Path, content: str, message: str) -> None:
    config = tmp_path / "server.toml"
    config.write_text(content)
    with pytest.raises(InputError, match=message):
        ServerSettings.load(config=config)


def test_a_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        ServerSettings.load(config=tmp_path / "nope.toml")


def test_a_bad_environment_value_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLIANCE_PORT", "eighty")
    with pytest.raises(InputError, match="server setting port"):
        ServerSettings.load()


def test_every_setting_is_a_serve_flag() -> None:
    help_text = CliRunner().invoke(cli, ["serve", "--help"]).stdout
    for name in ServerSettings.model_fields:
        assert "--" + name.replace("_", "-") in help_text
        assert f"APPLIANCE_{name.upper()}" in help_text
    assert "--no-log-prompts" in help_text
