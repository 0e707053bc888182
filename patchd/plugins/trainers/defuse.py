"""``defuse`` trainer: Defuse's correction step (Slack et al.).

Fine-tunes the incumbent on ``CE(train batch) + λ·CE(region-sample batch)``: each step pairs one
training batch with one batch of labeled failure-region samples drawn with replacement
(``research/failure_mining.md`` §2.7). Region samples come from the ``vae`` augmenter as
``augmentation.extra``; their labels are the source images' classes unless a person relabelled a
region with ``patchd regions RUN --label REGION=CLASS`` or on the run's failure-regions page
under ``/ui`` (the augmenter's ``region`` ids are kept
in ``extra.g``; the labels file is ``<run>/regions/labels.json``, read by
:func:`patchd.plugins.augmenters.vae.apply_region_labels`). Regions labelled ``invalid`` are
dropped.

Hyperparameters (``patch.params.defuse``): ``lambda`` 1.0 (the reference code hard-codes 0.01
with far more region samples than training rows; here the region set is small, so its mean loss
gets a larger weight), ``weight_decay`` 5e-4, ``optimizer`` adam|sgd, ``epochs``/``batch_size``/
``lr`` overriding the run budget, ``labels_file`` (path) overriding the default labels location,
``select`` best (default: the epoch best on val plus the labelled region samples, as one more
group ``defuse-regions``; the held-out region samples stay unseen) or last. Serve reads two more
keys: ``wait_for_labels`` (default true: a ``vae`` run pauses after synthesize in
``awaiting_labels`` until a person resumes it, :mod:`patchd.runs.component`) and
``label_timeout_h`` (default 72: a run left waiting longer fails). Unlabelled regions
train with their source class and the trainer logs that no person confirmed it. The labels it
trained with (per region: the label, who gave it, or ``null`` for the unconfirmed source class)
go into the train stage's ``region_labels.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from patchd.abc import Augmentation, StageContext, TrainResult
from patchd.exceptions import StageError
from patchd.ml.data import ImageSet
from patchd.plugins.trainers.base import (
    EpochTrainer,
    Job,
    Start,
    StepFn,
    StepOut,
    make_optimizer,
    run_epochs,
    step_out,
)


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
    from patchd.plugins.augmenters.vae import read_labels

    samples = region_samples(augmentation)
    given = read_labels(path)
    labelled = set(given)
    unlabelled = sorted(int(r) for r in set(samples.g.tolist()) - labelled)
    write_used_labels(ctx.out_dir / "region_labels.json", path, samples, unlabelled)
    if unlabelled:
        ctx.log.warning(
            "run %s defuse: regions %s are unlabelled (no entry in %s); training them with "
            "their source class, which no person confirmed",
            ctx.run_id,
            unlabelled,
            path,
        )
    return apply_region_labels(samples, path)


def write_used_labels(out: Path, path: Path, samples: ImageSet, unlabelled: list[int]) -> None:
    """Record which label each region trained with, and who gave it."""
    from patchd.runs.regions import read_labels as read_given

    given = read_given(path)
    regions: dict[str, dict[str, Any]] = {}
    for region in sorted(int(r) for r in set(samples.g.tolist())):
        if region in unlabelled:
            source = samples.class_names[int(samples.y[samples.g == region][0])]
            regions[str(region)] = {"label": source, "by": None, "source_class": True}
        else:
            label = given.labels[region]
            regions[str(region)] = {"label": label, "by": given.by(region), "source_class": False}
    out.write_text(json.dumps({"labels_file": str(path), "regions": regions}, indent=2))


def selection_set(val: ImageSet, regions: ImageSet) -> ImageSet:
    """``val`` plus the labelled region samples as one more group, ``defuse-regions``: the best
    epoch is picked on both (the held-out region samples stay unseen)."""
    names = (*val.group_names, "defuse-regions")
    return ImageSet(
        x=torch.cat([val.x, regions.x]),
        y=torch.cat([val.y, regions.y]),
        g=torch.cat([val.g, torch.full((len(regions),), len(names) - 1, dtype=torch.int64)]),
        class_names=val.class_names,
        group_names=names,
        ids=val.ids + regions.ids,
    )


class DefuseTrainer(EpochTrainer):
    name = "defuse"

    def check(self, job: Job) -> None:
        region_samples(job.augmentation)

    def fit(self, job: Job, run: Start) -> TrainResult:
        """The epoch loop, with the best epoch picked on val + the labelled region samples
        (``select: last`` keeps the last epoch instead)."""
        select = str(run.params.get("select", "best"))
        if select not in ("best", "last"):
            raise StageError(f"patch.params.defuse.select must be best or last, got {select!r}")
        regions = region_set(job.ctx, job.augmentation, run.params)
        val = selection_set(job.val, regions)
        step = self.prepare(job, run)
        steps = max(1, len(job.train) // run.budget.batch_size)
        optimizer = make_optimizer(run.net, run.params, run.budget.lr)
        return run_epochs(
            job.ctx, run.net, val, step, steps, run.budget, optimizer, keep_best=select == "best"
        )

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
