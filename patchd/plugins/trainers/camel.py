"""``camel`` trainer: CAMEL stage 2 (Goel et al., "Model Patching").

Loss per step on a group-balanced batch of originals x with their translations F(x), G(x)::

    L = L_CGDRO(CE on originals) + λ · Σ_cells mean_{i∈cell} ℓ_c(x_i)

- ``L_CGDRO``: class-conditional Group DRO (q softmax-normalised within each class, step η,
  C/√n adjustment, q updated from detached losses): :class:`patchd.ml.losses.GroupDRO`.
- ``ℓ_c``: :func:`patchd.ml.losses.consistency_terms`; only the originals enter the
  classification loss, the translations enter only through ℓ_c (``research/camel_gdro.md`` §1.1).
  With balanced cells, Σ_cells mean = cells × batch mean; that is what is computed.

Augmentation inputs:
- ``paired={"F": ..., "G": ...}`` aligned with the training rows (the ``cyclegan`` augmenter):
  the consistency term above.
- ``extra`` (an ImageSet of synthesized labeled samples, the ``diffusion`` augmenter): plain
  rebalancing: the samples join the originals as extra rows of their (class, subgroup) cells, so
  the under-represented cells get fresh samples in every balanced batch; with no paired
  translations the consistency term is 0.
- ``None``: CAMEL reduces to SGDRO (class-conditional GDRO alone).

Hyperparameters (``patch.params.camel``): ``lambda`` 5.0 (MNIST-Correlation/CelebA config),
``eta`` 0.01, ``adj_coef`` 1.0, ``weight_decay`` 5e-4, ``optimizer`` adam|sgd, plus
``epochs``/``batch_size``/``lr`` overriding the run budget.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from patchd.abc import Augmentation, StageContext, Trainer, TrainResult
from patchd.exceptions import StageError
from patchd.ml.data import ImageSet
from patchd.ml.losses import GroupDRO, consistency_terms
from patchd.plugins.trainers.base import (
    BalancedSampler,
    cell_counts,
    cells_of,
    groups_per_class,
    make_optimizer,
    run_epochs,
    start,
)
from patchd.plugins.trainers.gdro import require_groups


def merge_extra(train: ImageSet, extra: ImageSet | None) -> ImageSet:
    """Training rows plus synthesized rows (same classes and group names required)."""
    if extra is None or len(extra) == 0:
        return train
    if extra.group_names != train.group_names or extra.class_names != train.class_names:
        raise StageError(
            f"synthesized samples use groups {extra.group_names} / classes {extra.class_names} but "
            f"the training set uses {train.group_names} / {train.class_names}; synthesize with the "
            "same subgroup assignment as the training set"
        )
    return ImageSet(
        x=torch.cat([train.x, extra.x]),
        y=torch.cat([train.y, extra.y]),
        g=torch.cat([train.g, extra.g]),
        class_names=train.class_names,
        group_names=train.group_names,
        ids=train.ids + extra.ids,
    )


def paired_views(
    train: ImageSet, augmentation: Augmentation | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    if augmentation is None or not augmentation.paired:
        return None
    if set(augmentation.paired) != {"F", "G"}:
        raise StageError(
            f"camel needs paired translations 'F' and 'G', got {sorted(augmentation.paired)}"
        )
    f, g = augmentation.paired["F"], augmentation.paired["G"]
    if f.shape != train.x.shape or g.shape != train.x.shape:
        raise StageError(
            f"paired translations have shape {tuple(f.shape)}/{tuple(g.shape)} but the training "
            f"images are {tuple(train.x.shape)}; re-run the synthesize stage on this training set"
        )
    return f, g


class CamelTrainer(Trainer):
    name = "camel"

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
        views = paired_views(train, augmentation)
        counts_from = train
        extra = augmentation.extra if augmentation else None
        if views is not None and extra is not None and len(extra):
            raise StageError(
                "camel got both paired translations and extra samples; one augmenter per run "
                "(cyclegan for pairs, diffusion for extra samples)"
            )
        data = merge_extra(train, extra)
        k = groups_per_class(data)
        dro = GroupDRO(
            cell_counts(counts_from, k).clamp(min=1) * (cell_counts(data, k) > 0),
            eta=float(params.get("eta", 0.01)),
            adj_coef=float(params.get("adj_coef", 1.0)),
            class_conditional=True,
        )
        cells = cells_of(data, k)
        sampler = BalancedSampler(cells, budget.batch_size, gen)
        lam = float(params.get("lambda", 5.0))
        n_cells = int(dro.valid.sum())

        def step() -> tuple[torch.Tensor, dict[str, float]]:
            idx = sampler()
            x, y = data.x[idx].to(device), data.y[idx].to(device)
            if views is None:
                logits = net(x)
                robust = dro.loss(
                    F.cross_entropy(logits, y, reduction="none"), cells[idx].to(device)
                )
                return robust, {"loss": float(robust.detach()), "robust": float(robust.detach())}
            n = len(idx)
            both = torch.cat([x, views[0][idx].to(device), views[1][idx].to(device)])
            logits = net(both)
            robust = dro.loss(
                F.cross_entropy(logits[:n], y, reduction="none"), cells[idx].to(device)
            )
            probs = torch.softmax(logits, dim=1)
            cons = consistency_terms(probs[:n], probs[n : 2 * n], probs[2 * n :]).mean() * n_cells
            loss = robust + lam * cons
            return loss, {
                "loss": float(loss.detach()),
                "robust": float(robust.detach()),
                "consistency": float(cons.detach()),
            }

        steps = max(1, len(train) // budget.batch_size)
        optimizer = make_optimizer(net, params, budget.lr)
        return run_epochs(ctx, net, val, step, steps, budget, optimizer)
