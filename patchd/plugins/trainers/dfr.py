"""``dfr`` trainer: Deep Feature Reweighting (Kirichenko, Izmailov, Wilson 2022).

Freezes the incumbent's body and retrains only its last ``nn.Linear`` on **group-balanced
held-out data** (the validation split, which must carry subgroup labels): penultimate features,
standardised, an L1 logistic regression (liblinear) whose C is tuned on one half of the balanced
validation set and scored on the other (worst-group accuracy), then refit on balanced resamples
of the whole validation set and averaged (``research/camel_gdro.md`` §6). The averaged linear
model is folded back into the network's last layer, so the result is a plain module again.

Hyperparameters (``patch.params.dfr``): ``cs`` [1, .7, .3, .1, .07, .03, .01], ``resamples`` 10.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from patchd.abc import StageContext, TrainResult
from patchd.exceptions import StageError
from patchd.ml.models import features, last_linear
from patchd.plugins.trainers.base import FineTuneTrainer, Job, Start

DEFAULT_CS = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)


def balanced_rows(cells: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of a subsample with the size of the smallest cell from every cell."""
    uniq = np.unique(cells)
    n = min(int((cells == c).sum()) for c in uniq)
    return np.concatenate([rng.choice(np.flatnonzero(cells == c), n, replace=False) for c in uniq])


def worst_cell_acc(pred: np.ndarray, y: np.ndarray, cells: np.ndarray) -> float:
    return min(float((pred[cells == c] == y[cells == c]).mean()) for c in np.unique(cells))


def fit_logreg(feats: np.ndarray, y: np.ndarray, c: float, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression

    multi = len(np.unique(y)) > 2
    model = LogisticRegression(
        C=c,
        l1_ratio=0.0 if multi else 1.0,
        solver="lbfgs" if multi else "liblinear",
        max_iter=2000,
        random_state=seed,
    )
    return model.fit(feats, y)


class DFRTrainer(FineTuneTrainer):
    name = "dfr"

    def check(self, job: Job) -> None:
        if not job.val.has_groups:
            raise StageError(
                "dfr retrains the last layer on group-balanced validation data, but the "
                "validation split has unknown subgroups; give it group attributes or use the "
                "camel/gdro trainer"
            )

    def fit(self, job: Job, run: Start) -> TrainResult:
        began = time.monotonic()
        ctx, val, params, net = job.ctx, job.val, run.params, run.net
        rng = np.random.default_rng(ctx.seed)
        feats = features(net, val.x).numpy().astype(np.float64)
        mean, scale = feats.mean(0), feats.std(0) + 1e-6
        z = (feats - mean) / scale
        y = val.y.numpy()
        cells = (val.y * max(1, len(val.group_names)) + val.g).numpy()
        best_c = self.tune_c(z, y, cells, params, rng, ctx)
        coef, intercept = self.averaged_fit(
            z, y, cells, best_c, int(params.get("resamples", 10)), rng, ctx
        )
        self.fold_into(
            last_linear(net), coef / scale, intercept - (coef / scale) @ mean, val.num_classes
        )
        net.eval()
        ctx.progress(1.0, f"dfr: C={best_c}")
        seconds = time.monotonic() - began
        return TrainResult(model=net, epochs=1, seconds=seconds, history=({"C": best_c},))

    def tune_c(
        self,
        z: np.ndarray,
        y: np.ndarray,
        cells: np.ndarray,
        params: dict[str, Any],
        rng: np.random.Generator,
        ctx: StageContext,
    ) -> float:
        """C with the best worst-cell accuracy on one half of val, fitted on the other half."""
        half = rng.permutation(len(y)) < len(y) // 2
        fit_rows = np.flatnonzero(half)[balanced_rows(cells[half], rng)]
        best, best_c = -1.0, DEFAULT_CS[0]
        for c in params.get("cs", DEFAULT_CS):
            clf = fit_logreg(z[fit_rows], y[fit_rows], float(c), ctx.seed)
            acc = worst_cell_acc(clf.predict(z[~half]), y[~half], cells[~half])
            ctx.log.info("run %s dfr C=%s val-half worst %.3f", ctx.run_id, c, acc)
            if acc > best:
                best, best_c = acc, float(c)
        return best_c

    def averaged_fit(
        self,
        z: np.ndarray,
        y: np.ndarray,
        cells: np.ndarray,
        c: float,
        resamples: int,
        rng: np.random.Generator,
        ctx: StageContext,
    ) -> tuple[np.ndarray, np.ndarray]:
        coefs, intercepts = [], []
        for i in range(max(1, resamples)):
            rows = balanced_rows(cells, rng)
            clf = fit_logreg(z[rows], y[rows], c, ctx.seed + i)
            coefs.append(clf.coef_)
            intercepts.append(clf.intercept_)
        return np.mean(coefs, axis=0), np.mean(intercepts, axis=0)

    @staticmethod
    @torch.no_grad()
    def fold_into(
        layer: nn.Linear, coef: np.ndarray, intercept: np.ndarray, num_classes: int
    ) -> None:
        """Write the linear model into ``layer`` (binary: logit difference split over 2 rows)."""
        w = torch.as_tensor(coef, dtype=layer.weight.dtype, device=layer.weight.device)
        b = torch.as_tensor(intercept, dtype=layer.weight.dtype, device=layer.weight.device)
        if num_classes == 2 and w.shape[0] == 1:
            w = torch.cat([-w / 2, w / 2])
            b = torch.cat([-b / 2, b / 2])
        layer.weight.copy_(w)
        if layer.bias is not None:
            layer.bias.copy_(b)
