"""CAMEL end to end on colored digits with tiny budgets: CycleGAN translations per class, then
consistency + class-conditional GDRO, against plain ERM fine-tuning from the same incumbent.

Colour correlation p = 0.97 in train (about 13 minority images per class; at the default 0.99
there are 4-5 and no trainer learns the shape in a test-sized budget). Measured on the 2-core
shared machine (seed 0, these budgets): incumbent worst-group 0.00, ERM fine-tune 0.00,
CAMEL 0.76 (λ = 0, i.e. SGDRO alone: 0.71). The margin is set from that run, never 0.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from patchd.abc import Augmentation, StageContext
from patchd.config import BudgetConfig, DatasetSpec, PatchConfig
from patchd.exceptions import StageError
from patchd.ml.data import ImageSet
from patchd.plugins.trainers.base import BalancedSampler, group_scores

torch.set_num_threads(1)

MARGIN = 0.3  # camel worst-group minus erm worst-group, from the measured run above


def ctx_for(tmp_path: Path, stage: str, params: dict[str, dict[str, object]]) -> StageContext:
    budget = BudgetConfig(epochs=6, batch_size=32, lr=1e-3)
    return StageContext(
        run_id="r-camel",
        stage=stage,
        out_dir=tmp_path / stage,
        params=PatchConfig(params=params, budget=budget),
        seed=0,
    )


@pytest.mark.slow
def test_camel_beats_erm_worst_group_on_colored_digits(tmp_path: Path) -> None:
    from patchd.ml.datasets import load_splits
    from patchd.ml.models import small_cnn
    from patchd.ml.training import fit
    from patchd.plugins.augmenters.cyclegan import CycleGANAugmenter
    from patchd.plugins.trainers.camel import CamelTrainer
    from patchd.plugins.trainers.erm import ERMTrainer

    splits = load_splits(DatasetSpec(kind="colored-digits", options={"p_train": 0.97}))
    torch.manual_seed(0)
    incumbent = small_cnn(width=16)
    fit(incumbent, splits.train, epochs=10, batch_size=32, lr=1e-3, seed=0)
    before = {k: v.clone() for k, v in incumbent.state_dict().items()}
    params = {"cyclegan": {"steps": 120}}
    erm = ERMTrainer().train(
        ctx_for(tmp_path, "erm", params), incumbent, splits.train, splits.val, None
    )
    aug = CycleGANAugmenter().synthesize(
        ctx_for(tmp_path, "synthesize", params), incumbent, splits.train
    )
    assert aug.paired["F"].shape == splits.train.x.shape == aug.paired["G"].shape
    assert len(aug.previews) == 4 and all(p.is_file() for p in aug.previews)
    camel = CamelTrainer().train(
        ctx_for(tmp_path, "train", params), incumbent, splits.train, splits.val, aug
    )
    erm_worst = group_scores(erm.model, splits.test).worst
    camel_worst = group_scores(camel.model, splits.test).worst
    print(f"worst-group: erm {erm_worst:.3f} camel {camel_worst:.3f}")
    assert camel_worst >= erm_worst + MARGIN, (camel_worst, erm_worst)
    assert all(torch.equal(before[k], v) for k, v in incumbent.state_dict().items())  # not mutated
    assert camel.history[-1]["consistency"] >= 0


def toy(n: int = 40) -> ImageSet:
    y = torch.arange(n) % 2
    g = (torch.arange(n) // 2) % 2
    return ImageSet(
        torch.rand(n, 3, 8, 8), y, g, ("a", "b"), ("g0", "g1"), tuple(map(str, range(n)))
    )


def test_balanced_sampler_draws_every_cell_equally() -> None:
    data = toy()
    cells = data.y * 2 + data.g
    idx = BalancedSampler(cells, 16, torch.Generator().manual_seed(0))()
    assert torch.bincount(cells[idx], minlength=4).tolist() == [4, 4, 4, 4]


def test_camel_rejects_unknown_groups_and_misaligned_translations(tmp_path: Path) -> None:
    from patchd.ml.models import small_cnn
    from patchd.plugins.trainers.camel import CamelTrainer

    data, model = toy(), small_cnn(width=4)
    hidden = data.with_groups(torch.full_like(data.g, -1), ())
    with pytest.raises(StageError, match="subgroup"):
        CamelTrainer().train(ctx_for(tmp_path, "t", {}), model, hidden, data, None)
    bad = Augmentation(kind="cyclegan", paired={"F": data.x[:3], "G": data.x[:3]})
    with pytest.raises(StageError, match="shape"):
        CamelTrainer().train(ctx_for(tmp_path, "t", {}), model, data, data, bad)


def test_translated_rows_join_their_target_cell_and_identity_rows_do_not() -> None:
    from patchd.plugins.trainers.camel import with_translated_rows

    data = toy()  # class a: g0/g1 rows alternate; same for b
    f, g = data.x.clone(), data.x.clone()
    in_class_a = data.y == 0
    g[in_class_a & (data.g == 0)] = 1.0  # class a, g0 -> g1: G moves the row
    f[in_class_a & (data.g == 1)] = 0.0  # class a, g1 -> g0: F moves the row
    # class b: the fidelity policy replaced its translations by the identity (F = G = x)
    merged, views = with_translated_rows(data, (f, g))
    extra = merged.subset(torch.arange(len(data), len(merged)))
    assert len(extra) == int(in_class_a.sum())  # only class a's moved rows, none of class b
    assert torch.equal(extra.y, torch.zeros(len(extra), dtype=torch.int64))
    source_g = data.g[in_class_a]
    assert torch.equal(extra.g, 1 - source_g)  # each row joins the *other* group's cell
    assert torch.equal(extra.x[extra.g == 1], torch.ones_like(extra.x[extra.g == 1]))
    assert torch.equal(extra.x[extra.g == 0], torch.zeros_like(extra.x[extra.g == 0]))
    # a translated row's pair is (its source image, itself)
    assert torch.equal(views[0][len(data) :], data.x[in_class_a])
    assert torch.equal(views[1][len(data) :], extra.x)
    assert torch.equal(merged.x[: len(data)], data.x) and len(views[0]) == len(merged)


def test_translated_rows_change_nothing_when_every_translation_is_the_identity() -> None:
    from patchd.plugins.trainers.camel import with_translated_rows

    data = toy()
    merged, views = with_translated_rows(data, (data.x.clone(), data.x.clone()))
    assert merged is data and len(views[0]) == len(data)
