"""``patchd bench mining`` end to end on a small real run: every method's columns, both
embeddings of the subgroup miner, the true-group probe ceilings, and fresh seeds by name."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from patchd.bench.mining import mining


def test_bench_mining_reports_both_embeddings_and_the_probe_ceilings(tmp_path: Path) -> None:
    args = [
        "--dataset", "sticker-fmnist", "--n-train", "1500", "--epochs", "1", "--seeds", "1",
        "--first-seed", "4", "--out", str(tmp_path),
    ]  # fmt: skip
    result = CliRunner().invoke(mining, args, env={"PATCHD_BENCH_THREADS": "1"})
    assert result.exit_code == 0, result.output
    (path,) = tmp_path.glob("mining-sticker-fmnist-*-seeds4-4.json")
    body = json.loads(path.read_text())
    (run,) = body["runs"]
    assert run["seed"] == 4 and {"subgroup:train", "penultimate:train"} <= set(run["mine_seconds"])
    rows = run["rows"]
    assert sorted((r["split"], r["cls"]) for r in rows) == [
        ("test", 0), ("test", 1), ("train", 0), ("train", 1)
    ]  # fmt: skip
    for r in rows:
        assert 0 < r["k"] < r["n"]
        for key in ("subgroup_pk", "penultimate_pk", "probe_pooled_pk", "probe_penultimate_pk",
                    "loss_pk", "svm_pk", "subgroup_auroc", "errors_r"):  # fmt: skip
            assert 0.0 <= r[key] <= 1.0, (key, r[key])
    assert "seeds 4..4" in result.output and "| probe P@k pooled / penultimate |" in result.output
