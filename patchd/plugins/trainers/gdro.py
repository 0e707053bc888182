"""``gdro`` trainer: Sagawa et al.'s online Group DRO on group-balanced batches.

Hyperparameters (``patch.params.gdro``), defaults from ``research/camel_gdro.md`` §5:
``eta`` 0.01 (robust step size), ``adj_coef`` 1.0 (C of the C/√n adjustment), ``weight_decay``
5e-4, ``optimizer`` adam|sgd, ``class_conditional`` false (true = SGDRO, CAMEL without
consistency), plus ``epochs``/``batch_size``/``lr`` overriding the run budget.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from patchd.abc import Augmentation, StageContext, Trainer, TrainResult
from patchd.exceptions import StageError
from patchd.ml.data import ImageSet
from patchd.ml.losses import GroupDRO
from patchd.plugins.trainers.base import (
    BalancedSampler,
    cell_counts,
    cells_of,
    groups_per_class,
    make_optimizer,
    run_epochs,
    start,
)


def require_groups(train: ImageSet, trainer: str) -> None:
    if not train.has_groups:
        raise StageError(
            f"the {trainer} trainer needs a subgroup per training example but some are unknown "
            "(g = -1); run a miner first (patch.miner: svm) or give the data group attributes"
        )


class GroupDROTrainer(Trainer):
    name = "gdro"
    class_conditional_default = False

    def train(
        self,
        ctx: StageContext,
        model: nn.Module,
        train: ImageSet,
        val: ImageSet,
        augmentation: Augmentation | None,
    ) -> TrainResult:
        require_groups(train, self.name)
        params, gen, device, net, budget = start(ctx, model, self.name)
        k = groups_per_class(train)
        dro = GroupDRO(
            cell_counts(train, k),
            eta=float(params.get("eta", 0.01)),
            adj_coef=float(params.get("adj_coef", 1.0)),
            class_conditional=bool(params.get("class_conditional", self.class_conditional_default)),
        )
        cells = cells_of(train, k)
        sampler = BalancedSampler(cells, budget.batch_size, gen)

        def step() -> tuple[torch.Tensor, dict[str, float]]:
            idx = sampler()
            logits = net(train.x[idx].to(device))
            losses = F.cross_entropy(logits, train.y[idx].to(device), reduction="none")
            loss = dro.loss(losses, cells[idx].to(device))
            return loss, {"loss": float(loss.detach())}

        steps = max(1, len(train) // budget.batch_size)
        optimizer = make_optimizer(net, params, budget.lr)
        return run_epochs(ctx, net, val, step, steps, budget, optimizer)
