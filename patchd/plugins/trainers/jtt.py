"""``jtt`` trainer: Just Train Twice (Liu et al. 2021), the standard two-stage baseline.

Stage 1 is the incumbent itself (an ERM model): its errors on the training split are the error
set. Stage 2 fine-tunes a copy on batches drawn with the error set upweighted by ``lambda_up``
(each error row ``lambda_up`` times as likely as a correct one), plain cross-entropy. JTT needs
no subgroup labels for training; the validation split's groups, when present, only choose the
epoch kept (as for every trainer here).

Hyperparameters (``patch.params.jtt``): ``lambda_up`` 20 (the paper uses 6-100 by dataset),
``weight_decay``, ``optimizer``, plus ``epochs``/``batch_size``/``lr`` overriding the budget.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from patchd.plugins.trainers.base import (
    EpochTrainer,
    Job,
    Start,
    StepFn,
    StepOut,
    predict,
    step_out,
)


def error_set(run: Start, job: Job) -> torch.Tensor:
    """Training rows the stage-1 model (the incumbent, before any update) gets wrong."""
    return predict(run.net, job.train.x).cpu() != job.train.y


class JTTTrainer(EpochTrainer):
    name = "jtt"

    def prepare(self, job: Job, run: Start) -> StepFn:
        train = job.train
        errors = error_set(run, job)
        lam = float(run.params.get("lambda_up", 20.0))
        weights = torch.where(errors, lam, 1.0)
        job.ctx.log.info(
            "run %s jtt: %d of %d training rows in the error set, upweighted x%g",
            job.ctx.run_id,
            int(errors.sum()),
            len(train),
            lam,
        )

        def step() -> StepOut:
            idx = torch.multinomial(weights, run.budget.batch_size, True, generator=run.gen)
            logits = run.net(train.x[idx].to(run.device))
            loss = F.cross_entropy(logits, train.y[idx].to(run.device))
            return step_out(loss)

        return step
