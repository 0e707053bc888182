"""``svm``: failure directions in embedding space (Jain et al., ICLR 2023) + DP-GMM clusters.

For each class, a linear SVM separates the examples the model gets right from those it gets
wrong (see :mod:`.directions`); its unit normal is the class's failure direction, the signed
distance to the boundary is each example's hardness (> 0: failure side), and its 2-fold CV
balanced accuracy is the strength of the failure mode (0.5 = no coherent failure, also used
when a class has fewer than 2 errors or 2 correct examples).

Embeddings: the classifier's own penultimate features, or a local open_clip image encoder when
``patch.clip_checkpoint`` is set. Subgroups handed downstream: the true groups when the data
carries them (``mined=False``), otherwise the hard/easy side within each class (``mined=True``;
group names ``svm=easy`` / ``svm=hard``). Descriptions: CLIP captions when CLIP is configured,
else the group attribute most over-represented on the hard side.

Parameters (``patch.params.svm``): ``c_grid``, ``max_per_class`` (subsample for the SVM fit,
default 5000), ``tiles`` (examples per PNG row, default 8), ``max_clusters`` (10),
``clip_model`` (architecture of a CLIP weights file, default ``ViT-B-32``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from patchd.abc import FailureMode, Miner, MiningResult, StageContext
from patchd.exceptions import ConfigError, StageError
from patchd.ml.data import ImageSet
from patchd.ml.models import features, predict
from patchd.plugins.miners import captions
from patchd.plugins.miners.clusters import dp_clusters
from patchd.plugins.miners.directions import C_GRID, ClassDirection, Preprocessor
from patchd.plugins.miners.directions import fit_class_direction as fit_direction
from patchd.plugins.miners.report import (
    MIN_DESCRIBED_ERRORS,
    ClassReport,
    FailureCluster,
    FailureReport,
    GridRow,
    GroupLift,
    Tile,
    describe,
    lifts_for,
    render_grid,
)

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

PSEUDO_GROUPS = ("svm=easy", "svm=hard")
Embed = Callable[[torch.Tensor], np.ndarray]


@dataclass(frozen=True)
class SVMParams:
    c_grid: tuple[float, ...] = C_GRID
    max_per_class: int = 5000
    tiles: int = 8
    max_clusters: int = 10
    clip_model: str = "ViT-B-32"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SVMParams:
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(
                f"patch.params.svm has unknown keys {sorted(unknown)}; "
                f"known: {sorted(cls.__dataclass_fields__)}"
            )
        if "c_grid" in raw:
            raw = {**raw, "c_grid": tuple(float(c) for c in raw["c_grid"])}
        return cls(**raw)


@dataclass(frozen=True, eq=False)
class Scored:
    """One image set seen by the miner: embeddings, predictions, hardness."""

    data: ImageSet
    z: np.ndarray  # preprocessed embeddings
    pred: np.ndarray
    margin: np.ndarray  # p(true class) - max p(other); < 0 when wrong
    hardness: np.ndarray | None = None  # signed hardness, set once the directions are fit

    @property
    def correct(self) -> np.ndarray:
        return self.pred == self.data.y.numpy()

    @property
    def fitted_hardness(self) -> np.ndarray:
        """``hardness``, for the steps that run after the directions are fit."""
        assert self.hardness is not None, "hardness is set once the directions are fit"
        return self.hardness


class SVMDirectionMiner(Miner):
    """Per-class correct-vs-wrong linear SVMs; see the module docstring."""

    def mine(
        self,
        ctx: StageContext,
        model: nn.Module,
        data: ImageSet,
        fit_data: ImageSet | None = None,
    ) -> MiningResult:
        """Fit directions on ``fit_data`` (default ``data``); assign groups to ``data``."""
        params = SVMParams.from_dict(ctx.plugin_params("svm"))
        fit_set = data if fit_data is None else fit_data
        if len(data) == 0 or len(fit_set) == 0:
            raise StageError(f"run {ctx.run_id}: cannot mine failures on an empty set")
        embed, clip, name = self._embedder(ctx, model, params)
        ctx.progress(0.1, f"embedding {len(fit_set)} examples ({name})")
        raw_fit = embed(fit_set.x)
        pre = Preprocessor.fit(raw_fit)
        fit = _score(model, fit_set, pre(raw_fit))
        assign = fit if fit_data is None else _score(model, data, pre(embed(data.x)))
        ctx.progress(0.4, "fitting per-class SVMs")
        dirs = [self._fit_class(fit, c, params, ctx.seed) for c in range(data.num_classes)]
        fit = replace(fit, hardness=_hardness(fit, dirs))
        assign = fit if fit_data is None else replace(assign, hardness=_hardness(assign, dirs))
        groups, names, mined = _groups(data, assign.fitted_hardness)
        ctx.progress(0.7, "clustering failures and writing the report")
        cap = captions.caption_classes(clip, pre, dirs, data.class_names) if clip else None
        report = self._report(ctx, name, fit, assign, dirs, cap, params, mined)
        return MiningResult(
            modes=tuple(_mode(d, r) for d, r in zip(dirs, report.classes, strict=True)),
            groups=groups,
            group_names=names,
            hardness=torch.as_tensor(assign.hardness, dtype=torch.float32),
            mined=mined,
            report_json=report.write(ctx.out_dir / "failure_report.json"),
            report_png=self._png(ctx, fit, params),
        )

    def _embedder(
        self, ctx: StageContext, model: nn.Module, params: SVMParams
    ) -> tuple[Embed, Any, str]:
        checkpoint = ctx.params.clip_checkpoint
        if checkpoint is None:
            return (lambda x: features(model, x).numpy()), None, "classifier-features"
        from patchd.plugins.miners.clip_embedder import ClipEmbedder

        clip = ClipEmbedder(checkpoint, params.clip_model, ctx.device)
        return (lambda x: clip.embed_images(x).numpy()), clip, f"clip:{checkpoint}"

    @staticmethod
    def _fit_class(fit: Scored, cls: int, params: SVMParams, seed: int) -> ClassDirection:
        rows = np.flatnonzero(fit.data.y.numpy() == cls)
        if len(rows) > params.max_per_class:
            rows = np.sort(np.random.default_rng(seed).choice(rows, params.max_per_class, False))
        direction = fit_direction(cls, fit.z[rows], fit.correct[rows], seed, params.c_grid)
        log.info(
            "class %d: %d/%d wrong, CV balanced accuracy %.3f (C=%s)",
            cls,
            direction.n_wrong,
            direction.n_total,
            direction.strength,
            direction.c,
        )
        return direction

    def _report(
        self,
        ctx: StageContext,
        embedding: str,
        fit: Scored,
        assign: Scored,
        dirs: list[ClassDirection],
        cap: list[tuple[tuple[str, ...], tuple[str, ...]]] | None,
        params: SVMParams,
        mined: bool,
    ) -> FailureReport:
        src = assign if assign.data.has_groups or not fit.data.has_groups else fit
        classes = tuple(
            _class_report(fit, src, d, cap[d.cls] if cap else None, params.tiles) for d in dirs
        )
        return FailureReport(
            run_id=ctx.run_id,
            embedding=embedding,
            mined=mined,
            group_names=PSEUDO_GROUPS if mined else assign.data.group_names,
            n_fit=len(fit.data),
            n_assigned=len(assign.data),
            classes=classes,
            clusters=_clusters(fit, ctx.seed, params.max_clusters),
        )

    @staticmethod
    def _png(ctx: StageContext, fit: Scored, params: SVMParams) -> Path:
        h_fit = fit.fitted_hardness
        rows = []
        names = fit.data.class_names
        for c, name in enumerate(names):
            idx = np.flatnonzero(fit.data.y.numpy() == c)
            order = idx[np.argsort(-h_fit[idx], kind="stable")]
            for kind, pick in (
                ("hardest", order[: params.tiles]),
                ("easiest", order[::-1][: params.tiles]),
            ):
                tiles = tuple(
                    Tile(
                        fit.data.x[i],
                        names[int(fit.data.y[i])],
                        names[int(fit.pred[i])],
                        float(h_fit[i]),
                    )
                    for i in pick
                )
                wrong = int((~fit.correct[idx]).sum())
                rows.append(GridRow(f"{name}: {kind}", f"{wrong}/{len(idx)} wrong", tiles))
        title = (
            f"run {ctx.run_id}: hardest and easiest examples along each class's failure direction"
        )
        return render_grid(rows, title, ctx.out_dir / "failure_report.png")


def _score(model: nn.Module, data: ImageSet, z: np.ndarray) -> Scored:
    probs = predict(model, data.x).numpy()
    y = data.y.numpy()
    true_p = probs[np.arange(len(y)), y]
    others = probs.copy()
    others[np.arange(len(y)), y] = -np.inf
    return Scored(data, z, probs.argmax(1), true_p - others.max(1))


def _hardness(scored: Scored, dirs: list[ClassDirection]) -> np.ndarray:
    """Signed hardness per example; the model's own (negated) margin where no direction exists."""
    out = np.zeros(len(scored.data))
    y = scored.data.y.numpy()
    for d in dirs:
        rows = np.flatnonzero(y == d.cls)
        out[rows] = d.hardness(scored.z[rows]) if d.defined else -scored.margin[rows]
    return out


def _groups(data: ImageSet, hardness: np.ndarray) -> tuple[torch.Tensor, tuple[str, ...], bool]:
    if data.has_groups:
        return data.g.clone(), data.group_names, False
    return torch.as_tensor(hardness > 0, dtype=torch.int64), PSEUDO_GROUPS, True


def _class_report(
    fit: Scored,
    src: Scored,
    d: ClassDirection,
    cap: tuple[tuple[str, ...], tuple[str, ...]] | None,
    tiles: int,
) -> ClassReport:
    name = fit.data.class_names[d.cls]
    h_fit, h_src = fit.fitted_hardness, src.fitted_hardness
    rows = np.flatnonzero(src.data.y.numpy() == d.cls)
    hard = h_src[rows] > 0
    lifts: tuple[GroupLift, ...] = ()
    if src.data.has_groups:
        lifts = lifts_for(src.data.g.numpy()[rows], hard, src.data.group_names)
    fit_rows = np.flatnonzero(fit.data.y.numpy() == d.cls)
    order = fit_rows[np.argsort(-h_fit[fit_rows], kind="stable")]
    n_wrong = int((~src.correct[rows]).sum())
    description = describe(name, int(hard.sum()), len(rows), lifts, n_wrong)
    if cap and cap[0] and n_wrong >= MIN_DESCRIBED_ERRORS:
        description = f"{name}: hard examples look like '{cap[0][0]}'"
    return ClassReport(
        cls=d.cls,
        name=name,
        n_total=d.n_total,
        n_wrong=d.n_wrong,
        n_hard=int(hard.sum()),
        strength=d.strength,
        c=d.c,
        direction_defined=d.defined,
        description=description,
        lifts=lifts,
        captions_hard=cap[0] if cap else (),
        captions_easy=cap[1] if cap else (),
        hardest_ids=tuple(fit.data.ids[i] for i in order[:tiles]),
        easiest_ids=tuple(fit.data.ids[i] for i in order[::-1][:tiles]),
    )


def _clusters(fit: Scored, seed: int, max_clusters: int) -> tuple[FailureCluster, ...]:
    wrong = np.flatnonzero(~fit.correct)
    result = dp_clusters(fit.z[wrong], seed=seed, max_components=max_clusters)
    y, ids = fit.data.y.numpy(), fit.data.ids
    g = fit.data.g.numpy() if fit.data.has_groups else None
    out = []
    for k, weight in enumerate(result.weights):
        members = wrong[result.labels == k]
        counts = np.bincount(y[members], minlength=fit.data.num_classes)
        top, share = None, 0.0
        if g is not None and len(members):
            gc = np.bincount(g[members], minlength=len(fit.data.group_names))
            top, share = fit.data.group_names[int(gc.argmax())], float(gc.max() / len(members))
        examples = tuple(ids[i] for i in members[:8])
        out.append(
            FailureCluster(
                k, len(members), weight, tuple(int(v) for v in counts), top, share, examples
            )
        )
    return tuple(out)


def _mode(d: ClassDirection, r: ClassReport) -> FailureMode:
    return FailureMode(
        cls=d.cls,
        direction=[float(v) for v in d.direction],
        strength=float(d.strength),
        description=r.description,
        n_wrong=d.n_wrong,
        n_total=d.n_total,
    )
