"""``erm``: a plain fine-tune of the incumbent on the collected data (plus any synthesized extra).

The baseline every robust trainer is compared to, and the trainer that lets the pipeline run end
to end with ``augmenter: none``. Budget from ``patch.budget`` (epochs, batch_size, lr); optional
``patch.params.erm.weight_decay``. Works on a deep copy: the incumbent is never mutated.
"""

from __future__ import annotations

import copy

import torch

from patchd.abc import Augmentation, StageContext, Trainer, TrainResult
from patchd.ml.data import ImageSet
from patchd.ml.training import fit


def with_extra(train: ImageSet, augmentation: Augmentation | None) -> ImageSet:
    """``train`` plus the augmenter's new labeled samples when they share the class names."""
    extra = augmentation.extra if augmentation is not None else None
    if extra is None or len(extra) == 0 or extra.class_names != train.class_names:
        return train
    g = extra.g if extra.group_names == train.group_names else torch.full_like(extra.g, -1)
    return ImageSet(
        torch.cat([train.x, extra.x.to(train.x.dtype)]),
        torch.cat([train.y, extra.y]),
        torch.cat([train.g, g]),
        train.class_names,
        train.group_names,
        train.ids + extra.ids,
    )


class ERMTrainer(Trainer):
    def train(
        self,
        ctx: StageContext,
        model: torch.nn.Module,
        train: ImageSet,
        val: ImageSet,
        augmentation: Augmentation | None,
    ) -> TrainResult:
        budget = ctx.params.budget
        params = ctx.plugin_params("erm")
        data = with_extra(train, augmentation)
        twin = copy.deepcopy(model)
        device = torch.device("cuda" if torch.cuda.is_available() else ctx.device)
        ctx.log.info(
            "erm: fine-tuning on %d examples for %d epochs on %s", len(data), budget.epochs, device
        )
        return fit(
            twin,
            data,
            epochs=budget.epochs,
            batch_size=budget.batch_size,
            lr=float(params.get("lr", budget.lr)),
            device=device,
            progress=ctx.progress,
            seed=ctx.seed,
            weight_decay=float(params.get("weight_decay", 0.0)),
        )
