"""`patchd config check` and config errors with field paths; `patchd serve` flag overrides."""

from __future__ import annotations

from pathlib import Path

import yaml
from click.testing import CliRunner

from patchd.cli import cli
from patchd.cli.options import with_overrides
from patchd.config import load_config


def run(tmp_path: Path, text: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    path = tmp_path / "patchd.yaml"
    path.write_text(text)
    return CliRunner().invoke(cli, ["config", "check", "-c", str(path)], env=env or {})


def test_valid_config_prints_resolved_yaml(tmp_path: Path) -> None:
    result = run(tmp_path, "model: {name: skin}\napi: {port: 9000}\n", {"PATCHD_API__PORT": "9100"})
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.output)
    assert resolved["model"]["name"] == "skin"
    assert resolved["api"]["port"] == 9100  # the environment overrides the file
    assert resolved["state_dir"] == str(tmp_path / ".patchd")  # relative to the file


def test_every_error_is_listed_with_its_field_path(tmp_path: Path) -> None:
    text = "api: {port: 99999, bogus: 1}\nmonitor: {confidence: 2}\nmodel: {factory: nocolon}\n"
    result = run(tmp_path, text)
    assert result.exit_code == 1
    for where in ("api.port", "api.bogus", "monitor.confidence", "model.factory"):
        assert where in result.output
    assert "99999" in result.output


def test_tail_glob_outside_roots_fails_the_check(tmp_path: Path) -> None:
    text = f"sources:\n  allowed_roots: [{tmp_path / 'logs'}]\n  tail: [{{glob: /etc/*.conf}}]\n"
    result = run(tmp_path, text)
    assert result.exit_code == 1
    assert "sources.tail.0.glob" in result.output and "outside" in result.output


def test_unreadable_yaml_is_one_clear_line(tmp_path: Path) -> None:
    result = run(tmp_path, "model: [unclosed\n")
    assert result.exit_code == 1 and "not valid YAML" in result.output


def test_serve_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "patchd.yaml"
    path.write_text("api: {port: 9000, host: 127.0.0.1}\n")
    config = with_overrides(load_config(path, {}), api={"host": None, "port": 9555})
    assert (config.api.host, config.api.port) == ("127.0.0.1", 9555)
    assert config.state_dir == tmp_path / ".patchd"
