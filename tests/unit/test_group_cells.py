"""Subgroup cells: one canonical group name (dataset rows, production events, the monitor's
reading of an evaluation), and rows of unknown group in no group's cell."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from patchd.config import GateConfig, GroupsConfig, build_config
from patchd.evaluation import UNKNOWN_CELL, evaluate_correct
from patchd.ml.data import UNKNOWN_GROUP, ImageSet, group_name
from patchd.ml.evaluate import evaluate_model
from patchd.ml.models import build_model, load_weights, save_weights
from patchd.monitor.groups import GroupSpace
from patchd.monitor.reference import from_evaluation
from patchd.promotion.gate import GateInput, decide
from patchd.runs.recipe import build_recipe
from patchd.workers import artifacts
from patchd.workers.stages import collect

SIZE = 8
CELLS = [(site, bandage) for site in ("A", "B") for bandage in ("yes", "no")]


def _png(path: Path, rng: np.random.Generator) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
    return path.name


def _table(root: Path, rng: np.random.Generator) -> None:
    """4 rows per split and (site, bandage) cell, the group columns in that (unsorted) order."""
    with open(root / "labels.csv", "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["path", "label", "site", "bandage", "split"])
        for split in ("train", "val", "test"):
            for site, bandage in CELLS:
                for k in range(4):
                    name = _png(root / f"{split}-{site}-{bandage}-{k}.png", rng)
                    out.writerow([name, k % 2, site, bandage, split])


def _events(root: Path, rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
    # serve exports ``groups`` in groups.attributes order: here site first, like the table
    return [
        {
            "id": f"e{i}",
            "label": i % 2,
            "groups": {"site": "B", "bandage": "no"} if i % 2 else {"site": "A", "bandage": "yes"},
            "input": {"uri": (root / _png(root / f"e{i}.png", rng)).as_uri()},
        }
        for i in range(n)
    ]


def _collect(tmp_path: Path, group_columns: list[str]) -> tuple[dict[str, ImageSet], Any]:
    rng = np.random.default_rng(0)
    root, prod = tmp_path / "data", tmp_path / "prod"
    root.mkdir()
    _table(root, rng)
    events = _events(prod, rng, 40)
    config = build_config(
        {
            "state_dir": str(tmp_path / "state"),
            "model": {"factory_kwargs": {"width": 4}, "class_names": ["0", "1"]},
            "data": {
                "train": {
                    "kind": "image-csv",
                    "root": str(root),
                    "group_columns": group_columns,
                    "image_size": SIZE,
                },
            },
            "sources": {"allowed_roots": [str(prod)]},
        }
    )
    weights = tmp_path / "w.safetensors"
    sha = save_weights(build_model(config.model), weights)
    run_dir = tmp_path / "run"
    (run_dir / "collect").mkdir(parents=True)
    (run_dir / "slice.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    recipe = build_recipe(config, (weights, sha, "config"), run_dir / "slice.jsonl", len(events))
    out = run_dir / "collect"
    collect.run(run_id="r1", run_dir=run_dir, out=out, recipe=recipe, config=config)
    sets = {n: artifacts.load_imageset(out / f"{n}.safetensors") for n in ("train", "heldout")}
    model = build_model(config.model)
    load_weights(model, weights)
    return sets, model


def _names_of_prod_rows(data: ImageSet) -> set[str]:
    return {data.group_names[int(g)] for i, g in zip(data.ids, data.g, strict=True) if "prod:" in i}


def test_a_production_event_lands_in_the_table_cell_of_the_same_attributes(
    tmp_path: Path,
) -> None:
    sets, _ = _collect(tmp_path, ["site", "bandage"])
    table_names = {group_name({"site": s, "bandage": b}) for s, b in CELLS}
    assert table_names == {"bandage=yes,site=A", "bandage=no,site=A", "bandage=yes,site=B",
                           "bandage=no,site=B"}  # fmt: skip
    for data in sets.values():
        assert set(data.group_names) == table_names  # no second name for the same cell
        assert _names_of_prod_rows(data) <= {"bandage=no,site=B", "bandage=yes,site=A"}
    assert _names_of_prod_rows(sets["train"]) and _names_of_prod_rows(sets["heldout"])


def test_a_bare_group_key_is_put_in_the_canonical_order() -> None:
    assert collect._group_key({"group_key": "site=B,bandage=no"}) == "bandage=no,site=B"
    assert collect._group_key({"groups": {"site": "B", "bandage": "no"}}) == "bandage=no,site=B"
    assert collect._group_key({"group_key": "all", "groups": {}}) is None
    assert collect._group_key({}) is None


def test_group_less_heldout_rows_are_in_no_group_cell(tmp_path: Path) -> None:
    sets, model = _collect(tmp_path, [])  # the table has no groups; the events do
    held = sets["heldout"]
    n_test, prod_rows = 16, len([i for i in held.ids if i.startswith("prod:")])
    assert prod_rows > 0 and len(held) == n_test + prod_rows
    assert (held.g[:n_test] == UNKNOWN_GROUP).all()
    assert (held.cell_index()[:n_test] == UNKNOWN_CELL).all()
    report = evaluate_model(model, held)
    assert report.n == len(held)
    assert sum(c.n for c in report.cells) == prod_rows  # the 16 test rows are in no cell
    by_group: dict[str, int] = {}
    for c in report.cells:
        by_group[c.group_name] = by_group.get(c.group_name, 0) + c.n
    prod_groups = [held.group_names[int(g)] for g in held.g[n_test:]]
    assert by_group == {name: prod_groups.count(name) for name in held.group_names}


def test_without_group_names_every_row_is_in_its_class_cell() -> None:
    data = ImageSet(
        torch.zeros(3, 3, 2, 2),
        torch.tensor([0, 1, 1]),
        torch.full((3,), UNKNOWN_GROUP),
        ("a", "b"),
        (),
        ("x", "y", "z"),
    )
    assert data.cell_index().tolist() == [0, 1, 1]


def test_rows_of_unknown_group_count_in_the_average_not_in_a_cell() -> None:
    cell = np.array([UNKNOWN_CELL] * 6 + [0] * 5 + [1] * 5)
    correct = np.array([False] * 6 + [True] * 10)
    report = evaluate_correct(correct, cell, ["c"], ["g=a", "g=b"])
    assert [c.n for c in report.cells] == [5, 5]
    assert report.worst_group_accuracy == 1.0
    assert report.n == 16 and report.average_pooled == 10 / 16


def test_the_gate_judges_groups_without_the_unknown_rows_and_averages_with_them() -> None:
    known = np.repeat([0, 1], 60)
    cell = np.concatenate([known, np.full(80, UNKNOWN_CELL)])
    inc = np.concatenate([np.arange(120) % 2 == 0, np.ones(80, bool)])  # 0.5 per cell
    cand = np.concatenate([np.ones(120, bool), np.zeros(80, bool)])  # cells 1.0, unknown 0.0
    decision = decide(
        GateInput(("c|g=a", "c|g=b"), cell, inc, cand),
        GateConfig(n_min=10, min_improvement=0.0, avg_tolerance=0.05),
    )
    assert [c.n for c in decision.cells] == [60, 60]
    assert decision.worst_group_delta == 0.5
    assert decision.incumbent_avg == (60 + 80) / 200 and decision.candidate_avg == 120 / 200
    assert decision.verdict.value == "fail"  # the average falls 0.1 with the unknown rows


def test_the_monitor_reads_an_evaluation_in_its_own_attribute_order() -> None:
    space = GroupSpace.from_config(GroupsConfig(attributes=["site", "bandage"]))
    assert space.ordered("bandage=no,site=B") == "site=B,bandage=no"
    assert space.ordered("subgroup=failing") == "subgroup=failing"  # not these attributes: as is
    cells = [
        {"class_name": "0", "group_name": "bandage=no,site=B", "n": 40, "correct": 30},
        {"class_name": "0", "group_name": "bandage=yes,site=A", "n": 0, "correct": 0},
    ]
    ref = from_evaluation("m", {"cells": cells}, 0.0, space.ordered)
    assert ref is not None and [c.group for c in ref.cells] == ["site=B,bandage=no"]
    # the monitor's cell for the same values, from an ingest key in any order
    assert space.canonical("bandage=no,site=B") == ref.cells[0].group
