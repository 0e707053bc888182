"""The gdro and dfr baselines on colored digits: they fine-tune a copy and raise worst-group."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from patchd.abc import StageContext
from patchd.config import BudgetConfig, DatasetSpec, PatchConfig
from patchd.exceptions import StageError
from patchd.plugins.trainers.base import group_scores

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup() -> tuple[object, torch.nn.Module]:
    from patchd.ml.datasets import load_splits
    from patchd.ml.models import small_cnn
    from patchd.ml.training import fit

    splits = load_splits(DatasetSpec(kind="colored-digits", options={"p_train": 0.97}))
    torch.manual_seed(0)
    model = small_cnn(width=16)
    fit(model, splits.train, epochs=10, batch_size=32, lr=1e-3, seed=0)
    return splits, model.eval()


def ctx(tmp_path: Path) -> StageContext:
    budget = BudgetConfig(epochs=4, batch_size=32)
    return StageContext(
        run_id="r-b", stage="train", out_dir=tmp_path, params=PatchConfig(budget=budget)
    )


@pytest.mark.slow
def test_dfr_retrains_only_the_head_and_lifts_worst_group(setup, tmp_path: Path) -> None:  # noqa: ANN001
    from patchd.plugins.trainers.dfr import DFRTrainer

    splits, model = setup
    result = DFRTrainer().train(ctx(tmp_path), model, splits.train, splits.val, None)
    old, new = model.state_dict(), result.model.state_dict()
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed == {"head.weight", "head.bias"}
    before = group_scores(model, splits.test).worst
    after = group_scores(result.model, splits.test).worst
    assert after >= before + 0.3, (before, after)  # the incumbent is at 0.00 here
    hidden = splits.val.with_groups(torch.full_like(splits.val.g, -1), ())
    with pytest.raises(StageError, match="validation"):
        DFRTrainer().train(ctx(tmp_path), model, splits.train, hidden, None)


@pytest.mark.slow
def test_gdro_trainer_lifts_worst_group(setup, tmp_path: Path) -> None:  # noqa: ANN001
    from patchd.plugins.trainers.gdro import GroupDROTrainer

    splits, model = setup
    result = GroupDROTrainer().train(ctx(tmp_path), model, splits.train, splits.val, None)
    assert (
        group_scores(result.model, splits.test).worst
        >= group_scores(model, splits.test).worst + 0.2
    )
    assert result.history[0]["epoch"] == 0.0 and len(result.history) == 5


def _scarce_val(val, per_cell: int):  # noqa: ANN001, ANN202
    """The validation split with every (class, group) cell cut to ``per_cell`` rows."""
    keep = torch.zeros(len(val), dtype=torch.bool)
    for cell in val.cell_index().unique():
        keep[(val.cell_index() == cell).nonzero()[:per_cell, 0]] = True
    return val.subset(keep)


@pytest.mark.slow
def test_dfr_with_a_scarce_validation_split_falls_back_to_train_plus_val(
    setup,  # noqa: ANN001
    tmp_path: Path,
) -> None:
    from patchd.plugins.trainers.dfr import DFRTrainer

    splits, model = setup
    scarce = _scarce_val(splits.val, 3)
    result = DFRTrainer().train(ctx(tmp_path), model, splits.train, scarce, None)
    assert result.history[0]["scarce_validation"] == 1.0
    before = group_scores(model, splits.test).worst
    after = group_scores(result.model, splits.test).worst
    assert after >= before + 0.2, (before, after)  # no collapse with 3 examples a cell
    plenty = DFRTrainer().train(ctx(tmp_path), model, splits.train, splits.val, None)
    assert plenty.history[0]["scarce_validation"] == 0.0
    hidden = splits.train.with_groups(torch.full_like(splits.train.g, -1), ())
    with pytest.raises(StageError, match="no subgroups to fall back on"):
        DFRTrainer().train(ctx(tmp_path), model, hidden, scarce, None)


@pytest.mark.slow
def test_jtt_error_set_is_mostly_the_minority_and_trains_without_groups(
    setup,  # noqa: ANN001
    tmp_path: Path,
) -> None:
    from patchd.plugins.trainers.base import Job, start
    from patchd.plugins.trainers.jtt import JTTTrainer, error_set

    splits, model = setup
    job = Job(ctx(tmp_path), splits.train, splits.val, None)
    errors = error_set(start(job.ctx, model, "jtt"), job)
    assert 0 < int(errors.sum()) < len(splits.train) // 4
    assert bool((splits.train.y[errors] != splits.train.g[errors]).float().mean() > 0.5)
    no_groups = splits.train.with_groups(torch.full_like(splits.train.g, -1), ())
    result = JTTTrainer().train(ctx(tmp_path), model, no_groups, splits.val, None)
    changed = [
        k for k, v in model.state_dict().items() if not torch.equal(v, result.model.state_dict()[k])
    ]
    assert changed and len(result.history) == 5  # trains without groups; quality: bench quality
