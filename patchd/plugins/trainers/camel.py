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

``translated_rows`` (default false, the reference CAMEL): when true, every row whose
translation moved it (a class the fidelity policy kept) also joins its *target* cell as a labeled
row, paired with its source for the consistency term. With a scarce minority cell (tens of real
examples) the balanced batches then see thousands of distinct minority-group images instead of
the same few repeated; the C/√n adjustment still counts the real rows only. Only sound when the
translations were measured faithful, which is what the fidelity policy guarantees for the
classes it keeps.

Hyperparameters (``patch.params.camel``): ``lambda`` 5.0 (MNIST-Correlation/CelebA config),
``eta`` 0.01, ``adj_coef`` 1.0, ``weight_decay`` 5e-4, ``optimizer`` adam|sgd,
``translated_rows`` false, plus ``epochs``/``batch_size``/``lr`` overriding the run budget.
"""

from __future__ import annotations

import torch

from patchd.abc import Augmentation
from patchd.exceptions import StageError
from patchd.ml.data import ImageSet
from patchd.ml.fidelity import class_pairs, translated_view
from patchd.ml.losses import consistency_terms
from patchd.plugins.trainers.base import EpochTrainer, Job, Start, StepFn, StepOut, step_out
from patchd.plugins.trainers.gdro import GroupBatches


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


Views = tuple[torch.Tensor, torch.Tensor]

MOVED_EPS = 1e-3  # a translation within this (max abs pixel change) of its source is the identity


def with_translated_rows(train: ImageSet, views: Views) -> tuple[ImageSet, Views]:
    """``train`` plus each moved translation as a row of its target cell, and the views extended
    so that a translated row's pair is (its source, itself)."""
    view, target = translated_view(train, {"F": views[0], "G": views[1]}, class_pairs(train))
    change = (view - train.x).abs().flatten(1).amax(dim=1)
    moved = ((target >= 0) & (change > MOVED_EPS)).nonzero(as_tuple=True)[0]
    if len(moved) == 0:
        return train, views
    extra = ImageSet(
        x=view[moved],
        y=train.y[moved],
        g=target[moved],
        class_names=train.class_names,
        group_names=train.group_names,
        ids=tuple(f"{train.ids[i]}~translated" for i in moved.tolist()),
    )
    source, translated = train.x[moved], view[moved]
    return merge_extra(train, extra), (
        torch.cat([views[0], source]),
        torch.cat([views[1], translated]),
    )


def camel_inputs(job: Job) -> tuple[ImageSet, tuple[torch.Tensor, torch.Tensor] | None]:
    """The rows to sample (training plus any extra samples) and the paired translations."""
    views = paired_views(job.train, job.augmentation)
    extra = job.augmentation.extra if job.augmentation else None
    if views is not None and extra is not None and len(extra):
        raise StageError(
            "camel got both paired translations and extra samples; one augmenter per run "
            "(cyclegan for pairs, diffusion for extra samples)"
        )
    return merge_extra(job.train, extra), views


class CamelTrainer(EpochTrainer):
    name = "camel"
    needs_groups = True

    def prepare(self, job: Job, run: Start) -> StepFn:
        data, views = camel_inputs(job)
        if views is not None and bool(run.params.get("translated_rows", False)):
            data, views = with_translated_rows(data, views)
            job.ctx.log.info(
                "run %s: %d translated rows join their target cells",
                job.ctx.run_id,
                len(data) - len(job.train),
            )
        batches = GroupBatches(run, data, class_conditional=True, counted=job.train)
        lam = float(run.params.get("lambda", 5.0))
        n_cells = int(batches.dro.valid.sum())
        net, device = run.net, run.device

        def step() -> StepOut:
            idx = batches.draw()
            x = data.x[idx].to(device)
            if views is None:
                robust = batches.robust_loss(net(x), idx)
                return step_out(robust, robust=robust)
            n = len(idx)
            logits = net(torch.cat([x, views[0][idx].to(device), views[1][idx].to(device)]))
            robust = batches.robust_loss(logits[:n], idx)
            probs = torch.softmax(logits, dim=1)
            cons = consistency_terms(probs[:n], probs[n : 2 * n], probs[2 * n :]).mean() * n_cells
            return step_out(robust + lam * cons, robust=robust, consistency=cons)

        return step
