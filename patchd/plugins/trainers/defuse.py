"""``defuse`` trainer: Defuse's correction step (Slack et al.).

Fine-tunes the incumbent on ``CE(train batch) + λ·CE(region-sample batch)``: each step pairs one
training batch with one batch of labeled failure-region samples drawn with replacement
(``research/failure_mining.md`` §2.7). Region samples come from the ``vae`` augmenter as
``augmentation.extra``; their labels are the source images' classes unless a person relabelled a
region with ``patchd regions RUN --label REGION=CLASS`` (the augmenter's ``region`` ids are kept
in ``extra.g``; the labels file is ``<run>/regions/labels.json``, read by
:func:`patchd.plugins.augmenters.vae.apply_region_labels`). Regions labelled ``invalid`` are
dropped.

Hyperparameters (``patch.params.defuse``): ``lambda`` 1.0 (the reference code hard-codes 0.01
with far more region samples than training rows; here the region set is small, so its mean loss
gets a larger weight), ``weight_decay`` 5e-4, ``optimizer`` adam|sgd, ``epochs``/``batch_size``/
``lr`` overriding the run budget, ``labels_file`` (path) overriding the default labels location.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from patchd.abc import Augmentation, StageContext
from patchd.exceptions import StageError
from patchd.ml.data import ImageSet
from patchd.plugins.trainers.base import EpochTrainer, Job, Start, StepFn, StepOut, step_out


def region_samples(augmentation: Augmentation | None) -> ImageSet:
    """The augmenter's failure-region samples, as synthesized (before any person's labels)."""
    if augmentation is None or augmentation.extra is None or len(augmentation.extra) == 0:
        raise StageError(
            "the defuse trainer needs failure-region samples; set patch.augmenter: vae "
            "(or pass an augmentation with extra samples)"
        )
    return augmentation.extra


def region_set(
    ctx: StageContext, augmentation: Augmentation | None, params: dict[str, Any]
) -> ImageSet:
    """The region samples with the run's region labels applied."""
    from patchd.plugins.augmenters.vae import apply_region_labels, labels_path

    path = (
        Path(params["labels_file"]) if "labels_file" in params else labels_path(ctx.out_dir.parent)
    )
    return apply_region_labels(region_samples(augmentation), path)


class DefuseTrainer(EpochTrainer):
    name = "defuse"

    def check(self, job: Job) -> None:
        region_samples(job.augmentation)

    def prepare(self, job: Job, run: Start) -> StepFn:
        train, regions = job.train, region_set(job.ctx, job.augmentation, run.params)
        net, device, gen = run.net, run.device, run.gen
        lam = float(run.params.get("lambda", 1.0))
        bs = run.budget.batch_size

        def step() -> StepOut:
            i = torch.randint(len(train), (bs,), generator=gen)
            j = torch.randint(len(regions), (bs,), generator=gen)
            base = F.cross_entropy(net(train.x[i].to(device)), train.y[i].to(device))
            region = F.cross_entropy(net(regions.x[j].to(device)), regions.y[j].to(device))
            return step_out(base + lam * region, train_ce=base, region_ce=region)

        return step
