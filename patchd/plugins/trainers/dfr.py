"""``dfr`` trainer: Deep Feature Reweighting (Kirichenko, Izmailov, Wilson 2022).

Freezes the incumbent's body and retrains only its last ``nn.Linear`` on **group-balanced
held-out data** (the validation split, which must carry subgroup labels): penultimate features,
standardised, an L1 logistic regression (liblinear) whose C is tuned on one half of the balanced
validation set and scored on the other (worst-group accuracy), then refit on balanced resamples
of the whole validation set and averaged (``research/camel_gdro.md`` §6). The averaged linear
model is folded back into the network's last layer, so the result is a plain module again.

When a validation cell has fewer than ``min_cell`` (10) examples, balanced resamples of the
validation split alone are a handful of images and the fit collapses; DFR then fits on the
training split plus validation (the paper's DFR^Tr variant for scarce held-out data), C still
chosen on validation, and says so in the log and the history (``scarce_validation``).

Hyperparameters (``patch.params.dfr``): ``cs`` [1, .7, .3, .1, .07, .03, .01], ``resamples`` 10,
``min_cell`` 10.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from patchd.abc import StageContext, TrainResult
from patchd.exceptions import StageError
from patchd.ml.data import ImageSet
from patchd.ml.models import features, last_linear
from patchd.plugins.trainers.base import FineTuneTrainer, Job, Start

DEFAULT_CS = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)
MIN_CELL = 10  # below this many validation examples in a cell, fit on train + val


def smallest_cell(cells: np.ndarray) -> int:
    return min(int((cells == c).sum()) for c in np.unique(cells))


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
        z_val, y, cells, mean, scale = self.standardised(net, val, None)
        min_cell = int(params.get("min_cell", MIN_CELL))
        scarce = smallest_cell(cells) < min_cell
        if scarce:
            best_c, z_fit, y_fit, cells_fit = self.scarce_inputs(job, run, z_val, y, cells, rng)
        else:
            best_c = self.tune_c(z_val, y, cells, params, rng, ctx)
            z_fit, y_fit, cells_fit = z_val, y, cells
        coef, intercept = self.averaged_fit(
            z_fit, y_fit, cells_fit, best_c, int(params.get("resamples", 10)), rng, ctx
        )
        self.fold_into(
            last_linear(net), coef / scale, intercept - (coef / scale) @ mean, val.num_classes
        )
        net.eval()
        source = "train+val" if scarce else "val"
        ctx.progress(1.0, f"dfr: C={best_c} on {source}")
        seconds = time.monotonic() - began
        history = ({"C": best_c, "scarce_validation": float(scarce)},)
        return TrainResult(model=net, epochs=1, seconds=seconds, history=history)

    @staticmethod
    def standardised(
        net: nn.Module, data: ImageSet, stats: tuple[np.ndarray, np.ndarray] | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Penultimate features standardised (by ``stats`` or their own), labels and cells."""
        feats = features(net, data.x).numpy().astype(np.float64)
        mean, scale = stats if stats is not None else (feats.mean(0), feats.std(0) + 1e-6)
        cells = (data.y * max(1, len(data.group_names)) + data.g).numpy()
        return (feats - mean) / scale, data.y.numpy(), cells, mean, scale

    def scarce_inputs(
        self,
        job: Job,
        run: Start,
        z_val: np.ndarray,
        y_val: np.ndarray,
        cells_val: np.ndarray,
        rng: np.random.Generator,
    ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        """Too few validation examples per cell for balanced resampling: DFR on train + val.

        The paper's answer when group-labelled held-out data is scarce (its DFR^Tr variant):
        the last layer is fitted on group-balanced resamples of the training split plus the
        validation split, and C is chosen by worst-cell accuracy on the validation split.
        """
        ctx, params = job.ctx, run.params
        if not job.train.has_groups:
            raise StageError(
                "dfr: the validation split has fewer than "
                f"{params.get('min_cell', MIN_CELL)} examples in some (class, subgroup) cell and "
                "the training split has no subgroups to fall back on; use the gdro or camel trainer"
            )
        mean_scale = self.standardised(run.net, job.val, None)[3:]
        z_tr, y_tr, cells_tr, _, _ = self.standardised(run.net, job.train, mean_scale)
        z = np.concatenate([z_tr, z_val])
        y, cells = np.concatenate([y_tr, y_val]), np.concatenate([cells_tr, cells_val])
        if smallest_cell(cells) < 2:
            raise StageError("dfr: a (class, subgroup) cell has fewer than 2 examples in train+val")
        ctx.log.warning(
            "run %s dfr: the smallest validation cell has %d examples (< %s): fitting the last "
            "layer on balanced train+val, C chosen on validation",
            ctx.run_id,
            smallest_cell(cells_val),
            params.get("min_cell", MIN_CELL),
        )
        best, best_c = -1.0, DEFAULT_CS[0]
        for c in params.get("cs", DEFAULT_CS):
            rows = balanced_rows(cells_tr, rng)
            clf = fit_logreg(z_tr[rows], y_tr[rows], float(c), ctx.seed)
            acc = worst_cell_acc(clf.predict(z_val), y_val, cells_val)
            if acc > best:
                best, best_c = acc, float(c)
        return best_c, z, y, cells

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
