"""``patchd bench quality`` on mined groups: the miner runs with the true groups hidden, its
group is handed to Group DRO, and the row reports how the mined group matches the truth."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from patchd.bench.quality import quality


def test_gdro_on_mined_groups_reports_the_mined_group_against_the_truth(tmp_path: Path) -> None:
    out = tmp_path / "q.json"
    args = [
        "--dataset", "colored-fmnist", "--n-train", "800", "--epochs", "1", "--seeds", "1",
        "--methods", "gdro,gdro-mined", "--minority-per-group", "10", "--out", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(quality, args)
    assert result.exit_code == 0, result.output
    body = json.loads(out.read_text())
    runs = {r["method"]: r for r in body["runs"]}
    mining = runs["gdro-mined"]["mining"]
    # at most 10 minority examples per class: the colour cell is a cluster of its own
    assert 0 < mining["minority"] <= 20 and mining["miner"] == "subgroup"
    assert mining["precision"] >= 0.9 and mining["recall"] >= 0.9, mining
    assert runs["gdro"]["mining"] == {}  # true-group rows carry no mining summary
    assert "mined group P / R" in result.output and "| gdro-mined |" in result.output
