"""A run's Defuse region labels through the one shared module: who gave each label is kept per
region, bad input (unknown region, unknown class, no regions, a run past labelling) is refused
with an error naming it, the CLI shows what another writer stored, and a region's grid is served
only from inside the run's ``synthesize/`` folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from patchd.exceptions import ConflictError, NotFoundError, ValidationError
from patchd.runs import regions as store
from tests.ui_support import write_regions


def test_labels_keep_who_gave_each_one(tmp_path: Path) -> None:
    run = write_regions(tmp_path, "r-1")
    assert store.read_labels(store.labels_path(run)).labels == {}
    store.set_labels(run, {"0": "other"}, "ana", ["top", "other"])
    now = store.set_labels(run, {"1": "invalid"}, "bo (token alice)", ["top", "other"])
    assert dict(now.labels) == {0: "other", 1: "invalid"}
    assert now.by(0) == "ana" and now.by(1) == "bo (token alice)"
    assert now.people == "ana, bo (token alice)"
    again = store.set_labels(run, {"0": "top"}, "bo (token alice)", [])
    assert again.labels[0] == "top" and again.by(0) == "bo (token alice)"
    # a schema-1 file (one "by" for all) still reads
    store.labels_path(run).write_text(json.dumps({"schema": 1, "by": "x", "labels": {"1": "top"}}))
    old = store.read_labels(store.labels_path(run))
    assert dict(old.labels) == {1: "top"} and old.by(1) == "x" and old.by(0) is None


def test_bad_labels_are_refused_with_what_was_wrong(tmp_path: Path) -> None:
    run = write_regions(tmp_path, "r-1")
    with pytest.raises(ValidationError, match="class 'shoe' is unknown"):
        store.set_labels(run, {"0": "shoe"}, "ana", ["top", "other"])
    with pytest.raises(NotFoundError, match=r"region \(the run's regions are \[0, 1\]\) '7'"):
        store.set_labels(run, {"7": "top"}, "ana", [])
    with pytest.raises(NotFoundError, match="region"):
        store.set_labels(run, {"../0": "top"}, "ana", [])
    bare = tmp_path / "runs" / "r-2"
    bare.mkdir()
    with pytest.raises(NotFoundError, match="regions of run"):
        store.set_labels(bare, {"0": "top"}, "ana", [])
    with pytest.raises(ValidationError, match="not a plain run id"):
        store.run_dir(tmp_path, "../r-1")
    (run / ".tmp-train-abc").mkdir()  # the train stage is building: it has read the labels
    with pytest.raises(ConflictError, match="past labelling"):
        store.set_labels(run, {"0": "top"}, "ana", [])
    assert not store.labels_path(run).exists()


def test_cli_shows_labels_the_pages_stored(tmp_path: Path) -> None:
    from patchd.cli.regions import regions as regions_cmd

    state = tmp_path / "state"
    run = write_regions(state / "artifacts", "r-1")
    config = tmp_path / "patchd.yaml"
    config.write_text(f"state_dir: {state}\nmodel:\n  class_names: ['top', 'other']\n")
    store.set_labels(run, {"1": "invalid"}, "ana (token alice)", ["top", "other"])
    shown = CliRunner().invoke(regions_cmd, ["r-1", "-c", str(config)])
    assert shown.exit_code == 0, shown.output
    row1 = next(line for line in shown.output.splitlines() if line.startswith("| 1 |"))
    assert "invalid (by ana (token alice))" in row1
    assert "unlabelled regions: 0" in shown.output
    bad = CliRunner().invoke(regions_cmd, ["r-1", "--label", "0=shoe", "-c", str(config)])
    assert bad.exit_code != 0 and "class 'shoe' is unknown" in str(bad.exception)


def test_grid_is_only_a_png_inside_the_run(tmp_path: Path) -> None:
    run = write_regions(tmp_path, "r-1")
    assert store.read_grid(run, 0).startswith(store.PNG_SIGNATURE)
    (tmp_path / "secret.png").write_bytes(store.PNG_SIGNATURE + b"secret")
    body = json.loads(store.regions_path(run).read_text())
    body["regions"][0]["preview"] = "../../../secret.png"
    body["regions"][1]["preview"] = "regions.json"
    store.regions_path(run).write_text(json.dumps(body))
    for region in (0, 1, 9):
        with pytest.raises(NotFoundError):
            store.read_grid(run, region)
