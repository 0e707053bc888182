"""``gdro`` trainer: Sagawa et al.'s online Group DRO on group-balanced batches.

Hyperparameters (``patch.params.gdro``), defaults from ``research/camel_gdro.md`` §5:
``eta`` 0.01 (robust step size), ``adj_coef`` 1.0 (C of the C/√n adjustment), ``weight_decay``
5e-4, ``optimizer`` adam|sgd, ``class_conditional`` false (true = SGDRO, CAMEL without
consistency), plus ``epochs``/``batch_size``/``lr`` overriding the run budget.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from patchd.ml.data import ImageSet
from patchd.ml.losses import GroupDRO
from patchd.plugins.trainers.base import (
    BalancedSampler,
    EpochTrainer,
    Job,
    Start,
    StepFn,
    StepOut,
    cell_counts,
    cells_of,
    groups_per_class,
    step_out,
)


class GroupBatches:
    """Group-balanced batches of ``data`` and the Group DRO loss over their cells (``eta`` and
    ``adj_coef`` from the trainer's params). The cell sizes of the C/√n adjustment are those of
    ``counted`` (default ``data``); a cell with rows in ``data`` alone counts as 1."""

    def __init__(
        self, run: Start, data: ImageSet, class_conditional: bool, counted: ImageSet | None = None
    ) -> None:
        k = groups_per_class(data)
        seen = cell_counts(data if counted is None else counted, k)
        self.dro = GroupDRO(
            seen.clamp(min=1) * (cell_counts(data, k) > 0),
            eta=float(run.params.get("eta", 0.01)),
            adj_coef=float(run.params.get("adj_coef", 1.0)),
            class_conditional=class_conditional,
        )
        self.y = data.y
        self.cells = cells_of(data, k)
        self.draw = BalancedSampler(self.cells, run.budget.batch_size, run.gen)

    def robust_loss(self, logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The Group DRO loss of rows ``idx`` given their logits (updates the group weights)."""
        losses = F.cross_entropy(logits, self.y[idx].to(logits.device), reduction="none")
        return self.dro.loss(losses, self.cells[idx].to(logits.device))


class GroupDROTrainer(EpochTrainer):
    name = "gdro"
    needs_groups = True
    class_conditional_default = False

    def prepare(self, job: Job, run: Start) -> StepFn:
        train = job.train
        cc = bool(run.params.get("class_conditional", self.class_conditional_default))
        batches = GroupBatches(run, train, cc)

        def step() -> StepOut:
            idx = batches.draw()
            loss = batches.robust_loss(run.net(train.x[idx].to(run.device)), idx)
            return step_out(loss)

        return step
