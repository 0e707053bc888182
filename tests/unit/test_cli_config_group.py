"""``-c/--config`` on either side of a ``config`` subcommand means the same file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from patchd.cli import cli


@pytest.mark.parametrize(
    "argv",
    [["config", "-c", "{cfg}", "check"], ["config", "check", "-c", "{cfg}"]],
    ids=["before", "after"],
)
def test_config_check_reads_c_before_or_after_the_subcommand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    monkeypatch.delenv("PATCHD_CONFIG", raising=False)
    cfg = tmp_path / "patchd.yaml"
    cfg.write_text(yaml.safe_dump({"state_dir": str(tmp_path), "model": {"name": "from-file"}}))
    done = CliRunner().invoke(cli, [a.format(cfg=cfg) for a in argv])
    assert done.exit_code == 0, done.output
    assert yaml.safe_load(done.output)["model"]["name"] == "from-file"


def test_the_subcommand_c_wins_over_the_group_c(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PATCHD_CONFIG", raising=False)
    files = []
    for name in ("group", "own"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"state_dir": str(tmp_path), "model": {"name": name}}))
        files.append(str(path))
    done = CliRunner().invoke(cli, ["config", "-c", files[0], "check", "-c", files[1]])
    assert done.exit_code == 0, done.output
    assert yaml.safe_load(done.output)["model"]["name"] == "own"
