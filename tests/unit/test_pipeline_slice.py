"""The production slice in ``collect``: replayed dataset inputs follow the dataset's split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchd.config import DatasetSpec, build_config
from patchd.exceptions import StageError
from patchd.ml.data import ImageSet
from patchd.ml.datasets import load_splits
from patchd.ml.models import build_model, save_weights
from patchd.runs.recipe import build_recipe
from patchd.workers import artifacts
from patchd.workers.stages import collect

CLASSES = ["0-4", "5-9"]


def _png(image: torch.Tensor, path: Path) -> Path:
    arr = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path


def _events(images: dict[str, torch.Tensor], root: Path) -> list[dict[str, object]]:
    root.mkdir(parents=True, exist_ok=True)
    return [
        {
            "id": name,
            "label": 0,
            "groups": {"color": "red"},
            "input": {"uri": _png(img, root / f"{name}.png").as_uri()},
        }
        for name, img in images.items()
    ]


def _collect(tmp_path: Path, events: list[dict[str, object]]) -> dict[str, object]:
    config = build_config(
        {
            "state_dir": str(tmp_path / "state"),
            "model": {"factory_kwargs": {"width": 4}, "class_names": CLASSES},
            "data": {"train": {"kind": "colored-digits"}, "use_production_slice": True},
            "sources": {"allowed_roots": [str(tmp_path / "images")]},
        }
    )
    weights = tmp_path / "w.safetensors"
    sha = save_weights(build_model(config.model), weights)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "slice.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    recipe = build_recipe(config, (weights, sha, "config"), run_dir / "slice.jsonl", len(events))
    out = run_dir / "collect"
    out.mkdir()
    result = collect.run(run_id="r1", run_dir=run_dir, out=out, recipe=recipe, config=config)
    result["_sets"] = {
        name: artifacts.load_imageset(out / f"{name}.safetensors")
        for name in ("train", "val", "heldout")
    }
    return result


def _prod_ids(data: ImageSet) -> set[str]:
    return {i for i in data.ids if i.startswith("prod:")}


def test_replayed_dataset_inputs_follow_their_split(tmp_path: Path) -> None:
    splits = load_splits(DatasetSpec(kind="colored-digits"))
    other = load_splits(DatasetSpec(kind="colored-digits", seed=1)).test
    known = {collect.pixel_digest(x) for s in (splits.train, splits.val, splits.test) for x in s.x}
    fresh = [i for i in range(len(other)) if collect.pixel_digest(other.x[i]) not in known][:40]
    images = {f"test{i}": splits.test.x[i] for i in range(30)}
    images |= {f"train{i}": splits.train.x[i] for i in range(20)}
    images |= {f"val{i}": splits.val.x[i] for i in range(10)}
    images |= {f"new{i}": other.x[j] for i, j in enumerate(fresh)}
    events = _events(images, tmp_path / "images")
    events.append({**events[-1], "id": "again"})  # the same input twice
    result = _collect(tmp_path, events)
    sets = result["_sets"]
    in_train, in_held = _prod_ids(sets["train"]), _prod_ids(sets["heldout"])
    assert not any(i.startswith(("prod:test", "prod:train", "prod:val")) for i in in_train)
    assert not any(i.startswith(("prod:test", "prod:train")) for i in in_held)
    assert {f"prod:val{i}" for i in range(10)} <= in_held
    assert {i.removeprefix("prod:") for i in in_train | in_held} - {
        f"val{i}" for i in range(10)
    } == {f"new{i}" for i in range(len(fresh))}
    assert len(sets["heldout"]) == len(splits.test) + 10 + len(
        in_held - {f"prod:val{i}" for i in range(10)}
    )
    assert result["slice_overlap"] == {"heldout": 30, "train": 20, "val": 10}
    assert result["slice_duplicates"] == 1
    assert result["slice_to_train"] + result["slice_to_heldout"] == 10 + len(fresh)
    assert result["slice_to_train"] == len(in_train)


def test_a_slice_of_only_replayed_inputs_is_refused(tmp_path: Path) -> None:
    splits = load_splits(DatasetSpec(kind="colored-digits"))
    events = _events({f"test{i}": splits.test.x[i] for i in range(12)}, tmp_path / "images")
    with pytest.raises(StageError, match=r"brings no new data.*'heldout': 12"):
        _collect(tmp_path, events)
