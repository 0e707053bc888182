"""Defuse's failure regions are worth labelling: their samples spread like real images of the
class (not one image repeated), held-out samples are a separate draw, unlabelled regions are
reported as unlabelled (CLI and report page), and the annotator marks unsure regions invalid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from patchd.abc import Augmentation, StageContext
from patchd.config import DatasetSpec, PatchConfig
from patchd.ml.data import ImageSet
from patchd.plugins.augmenters import region_quality as rq
from patchd.plugins.augmenters.vae import (
    Component,
    VAEAugmenter,
    draw_region,
    load_vae,
    read_heldout,
)

torch.set_num_threads(1)

PARAMS = {
    "steps": 150,
    "max_sources": 80,
    "n_perturb": 10,
    "samples_per_region": 16,
    "heldout_per_region": 8,
    "scale": 1.0,
    "components": 3,
    "min_weight": 0.02,
}


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Augmentation, ImageSet]:
    from patchd.ml.datasets import load_splits
    from patchd.ml.models import small_cnn
    from patchd.ml.training import fit

    splits = load_splits(DatasetSpec(kind="colored-digits"))
    torch.manual_seed(0)
    model = small_cnn(width=8)
    fit(model, splits.train, epochs=4, batch_size=32, lr=3e-3, seed=0)
    run_dir = tmp_path_factory.mktemp("state") / "artifacts" / "runs" / "r-1"
    out = run_dir / "synthesize"
    out.mkdir(parents=True)
    ctx = StageContext("r-1", "synthesize", out, PatchConfig(params={"vae": PARAMS}))
    aug = VAEAugmenter().synthesize(ctx, model.eval(), splits.train)
    return run_dir, aug, splits.train


def test_region_samples_spread_like_real_images_not_one_image(
    synthesized: tuple[Path, Augmentation, ImageSet],
) -> None:
    run_dir, aug, _ = synthesized
    body = json.loads((run_dir / "synthesize" / "regions.json").read_text())
    assert body["schema"] == 2 and body["regions"] and aug.extra is not None
    ratios = [r["spread"] / r["real_spread"] for r in body["regions"]]
    # collapsed regions (one image, or tau = 0.01 around the mean) have a spread near 0
    assert min(ratios) >= 0.15 and float(np.median(ratios)) >= 0.3, ratios
    for r in body["regions"]:
        x = aug.extra.x[aug.extra.g == r["region"]]
        assert rq.mean_pairwise(x) == pytest.approx(r["spread"], rel=1e-4)
        distinct = torch.unique((x.flatten(1) * 50).round(), dim=0)
        assert len(distinct) == len(x), f"region {r['region']} repeats images"
    assert body["vae"]["recon_mse"] < 0.05 and (run_dir / "synthesize" / body["vae"]["preview"])


def test_heldout_samples_are_a_separate_draw_per_region(
    synthesized: tuple[Path, Augmentation, ImageSet],
) -> None:
    run_dir, aug, _ = synthesized
    x, g = read_heldout(run_dir / "synthesize")
    assert aug.extra is not None
    assert sorted(set(g.tolist())) == sorted(set(aug.extra.g.tolist()))
    assert torch.cdist(x.flatten(1), aug.extra.x.flatten(1)).min() > 1e-3  # no sample reused
    vae = load_vae(run_dir / "synthesize")  # the weights round-trip (safetensors)
    assert vae.z_dim == 8


def test_spread_metric_flags_a_collapsed_region(
    synthesized: tuple[Path, Augmentation, ImageSet],
) -> None:
    run_dir, _, train = synthesized
    vae = load_vae(run_dir / "synthesize")
    comp = Component(np.zeros(8), np.eye(8), 0.5, 0, 10)
    rng = np.random.default_rng(0)
    wide = rq.mean_pairwise(draw_region(vae, comp, 32, 1.0, rng))
    narrow = rq.mean_pairwise(draw_region(vae, comp, 32, 1e-4, rng))
    real = rq.mean_pairwise(train.x[train.y == 0][:64])
    assert narrow < 0.05 * real < wide


def test_cli_and_report_say_unlabelled_until_labelled(
    synthesized: tuple[Path, Augmentation, ImageSet], tmp_path: Path
) -> None:
    from patchd.cli.regions import regions as regions_cmd
    from patchd.promotion.report.candidate import defuse_regions

    run_dir, _, _ = synthesized
    state = run_dir.parent.parent.parent
    config = tmp_path / "patchd.yaml"
    config.write_text(f"state_dir: {state}\nmodel:\n  class_names: ['0-4', '5-9']\n")
    listed = CliRunner().invoke(regions_cmd, ["r-1", "-c", str(config)])
    assert listed.exit_code == 0, listed.output
    assert "unlabelled" in listed.output and "(default)" not in listed.output
    data, images = defuse_regions(run_dir)
    assert data is not None and data["labelled_by"] is None
    assert all(r["label"] is None for r in data["regions"])
    assert any(i.caption.startswith("VAE") for i in images)

    labelled = CliRunner().invoke(
        regions_cmd, ["r-1", "--label", "0=invalid", "--by", "ana", "-c", str(config)]
    )
    assert labelled.exit_code == 0, labelled.output
    data, _ = defuse_regions(run_dir)
    assert data is not None and data["labelled_by"] == "ana" and data["n_labelled"] == 1
    assert {r["region"]: r["label"] for r in data["regions"]}[0] == "invalid"


def test_report_page_shows_regions_and_the_unlabelled_warning(
    synthesized: tuple[Path, Augmentation, ImageSet],
) -> None:
    from patchd.promotion.report.candidate import defuse_regions
    from patchd.promotion.report.html import _regions_section

    run_dir, _, _ = synthesized
    data, images = defuse_regions(run_dir)
    assert data is not None
    unlabelled = {**data, "labelled_by": None, "n_labelled": 0}
    unlabelled["regions"] = [{**r, "label": None} for r in data["regions"]]

    class _Report:  # the two fields the section reads
        regions, region_images = unlabelled, images

    page = _regions_section(_Report())  # type: ignore[arg-type]
    assert "Unlabelled:" in page and "spread / real" in page and "novelty" in page
    assert page.count("data:image/png;base64,") == len(images)


def test_annotator_marks_unsure_regions_invalid() -> None:
    from patchd.bench.defuse import annotate

    class Fixed(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # region 0 rows: sure of class 1; region 1 rows: two classes equally likely
            sure = torch.tensor([0.0, 8.0, 0.0])
            unsure = torch.tensor([4.0, 4.0, 0.0])
            return torch.stack([sure if float(r.sum()) > 0 else unsure for r in x])

    x = torch.cat([torch.ones(3, 1, 4, 4), torch.zeros(3, 1, 4, 4)])
    extra = ImageSet(
        x, torch.zeros(6, dtype=torch.int64), torch.tensor([0, 0, 0, 1, 1, 1]), ("a", "b", "c"),
        ("region=0", "region=1"), tuple(str(i) for i in range(6)),
    )  # fmt: skip
    labels, conf = annotate(Fixed(), extra, threshold=0.6)
    assert labels == {0: "b", 1: "invalid"}
    assert conf[0] > 0.99 and conf[1] < 0.5


def _tiny(n: int, groups: tuple[str, ...]) -> ImageSet:
    gen = torch.Generator().manual_seed(n)
    return ImageSet(
        torch.rand(n, 3, 8, 8, generator=gen),
        torch.arange(n) % 2,
        torch.arange(n) % max(1, len(groups)),
        ("a", "b"),
        groups,
        tuple(f"{n}-{i}" for i in range(n)),
    )


def test_defuse_trainer_picks_epochs_on_val_plus_region_samples(tmp_path: Path) -> None:
    from patchd.exceptions import StageError
    from patchd.ml.models import small_cnn
    from patchd.plugins.trainers.defuse import DefuseTrainer, selection_set

    val, regions = _tiny(6, ("g=0", "g=1")), _tiny(4, ("region=0", "region=1"))
    picked = selection_set(val, regions)
    assert picked.group_names == ("g=0", "g=1", "defuse-regions") and len(picked) == 10
    assert picked.g[6:].tolist() == [2, 2, 2, 2]  # the region rows are one more group

    aug = Augmentation(kind="vae", extra=regions)
    for select, ok in (("last", True), ("bogus", False)):
        params = {"defuse": {"select": select, "epochs": 1, "labels_file": str(tmp_path / "x")}}
        ctx = StageContext("r", "train", tmp_path, PatchConfig(params=params))
        model = small_cnn(width=4)
        if ok:
            res = DefuseTrainer().train(ctx, model, _tiny(8, ("g=0", "g=1")), val, aug)
            assert res.epochs == 1
        else:
            with pytest.raises(StageError, match="select"):
                DefuseTrainer().train(ctx, model, _tiny(8, ("g=0", "g=1")), val, aug)
