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
