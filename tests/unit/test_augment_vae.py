"""Defuse: the VAE search finds prediction-flipping perturbations, regions are distilled, a person
labels them with `patchd regions`, and the defuse trainer reads those labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from patchd.abc import StageContext
from patchd.config import DatasetSpec, PatchConfig
from patchd.exceptions import StageError
from patchd.ml.data import ImageSet
from patchd.plugins.augmenters.vae import VAEAugmenter, apply_region_labels, labels_path

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits_and_model() -> tuple[object, torch.nn.Module]:
    from patchd.ml.datasets import load_splits
    from patchd.ml.models import small_cnn
    from patchd.ml.training import fit

    splits = load_splits(DatasetSpec(kind="colored-digits"))
    torch.manual_seed(0)
    model = small_cnn(width=8)
    fit(model, splits.train, epochs=8, batch_size=32, lr=3e-3, seed=0)
    return splits, model.eval()


@pytest.mark.slow
def test_vae_finds_flips_and_regions_then_cli_labels_feed_defuse(
    digits_and_model: tuple[object, torch.nn.Module], tmp_path: Path
) -> None:
    splits, model = digits_and_model
    run_dir = tmp_path / "artifacts" / "runs" / "r-1"
    out = run_dir / "synthesize"
    out.mkdir(parents=True)
    params = PatchConfig(
        params={"vae": {"steps": 150, "max_sources": 120, "n_perturb": 10, "samples_per_region": 8}}
    )
    ctx = StageContext(run_id="r-1", stage="synthesize", out_dir=out, params=params)
    aug = VAEAugmenter().synthesize(ctx, model, splits.train)
    assert aug.info["flips"] >= 1 and aug.info["regions"] >= 1
    regions = json.loads((out / "regions.json").read_text())["regions"]
    assert len(regions) == aug.info["regions"] and len(aug.previews) == len(regions)
    assert all((out / r["preview"]).is_file() for r in regions)
    assert aug.extra is not None and len(aug.extra) == 8 * len(regions)
    # the model disagrees with the source class on most region samples: they are failures
    from patchd.plugins.trainers.base import predict

    assert float((predict(model, aug.extra.x) != aug.extra.y).float().mean()) > 0.5

    config = tmp_path / "patchd.yaml"
    config.write_text(f"state_dir: {tmp_path}\nmodel:\n  class_names: ['0-4', '5-9']\n")
    from patchd.cli.regions import regions as regions_cmd

    first = regions[0]["region"]
    res = CliRunner().invoke(regions_cmd, ["r-1", "--label", f"{first}=invalid", "-c", str(config)])
    assert res.exit_code == 0, res.output
    assert "invalid" in res.output and "region_0.png" in res.output
    labels = json.loads(labels_path(run_dir).read_text())["labels"]
    assert labels == {str(first): "invalid"}
    bad = CliRunner().invoke(regions_cmd, ["r-1", "--label", "99=0-4", "-c", str(config)])
    assert bad.exit_code != 0
    kept = apply_region_labels(aug.extra, labels_path(run_dir))
    assert len(kept) == len(aug.extra) - 8 and not bool((kept.g == first).any())


def test_region_labels_relabel_and_reject_unknown_classes(tmp_path: Path) -> None:
    extra = ImageSet(
        torch.zeros(4, 3, 8, 8),
        torch.tensor([0, 0, 1, 1]),
        torch.tensor([0, 0, 1, 1]),
        ("a", "b"),
        ("region=0", "region=1"),
        ("0", "1", "2", "3"),
    )
    path = tmp_path / "labels.json"
    assert apply_region_labels(extra, path) is extra  # no labels file: defaults kept
    path.write_text(json.dumps({"schema": 1, "labels": {"0": "b"}}))
    assert apply_region_labels(extra, path).y.tolist() == [1, 1, 1, 1]
    path.write_text(json.dumps({"schema": 1, "labels": {"1": "zebra"}}))
    with pytest.raises(StageError, match="zebra"):
        apply_region_labels(extra, path)
