"""``subgroup`` (the default miner): the failing *subgroup* of each class, not its error mask.

Per class, an error-seeded Gaussian mixture on the held-out rows finds the cluster the model's
errors sit in, a balanced logistic regression distils it into a membership score, and the
share of members in the scored split is estimated from the data (:mod:`.membership` explains
each step and why; ``patchd bench mining`` measures it against the loss ranking, the error mask
and the ``svm`` miner).

- Fit on ``fit_data`` (the pipeline passes validation + labeled production events); score
  ``data`` (the training split, whose errors an ERM model has memorized away). Without
  ``fit_data`` it fits on ``data`` and logs a warning.
- Embeddings (``embedding``): ``pooled`` (default), the classifier's last spatial activation,
  max- and mean-pooled per channel (:func:`patchd.ml.models.pooled_features`; a model without
  one falls back to ``penultimate``); ``penultimate``, the input of its last linear layer; or a
  local open_clip image encoder when ``patch.clip_checkpoint`` is set (then hard/easy CLIP
  captions describe each group). Why pooled: on the training split an ERM model's penultimate
  features are memorized toward the class, so even a probe fitted on validation with the *true*
  groups recovers only 0.86-0.98 of the minority cells there (sticker-fmnist, image-csv), against
  0.99-1.00 in the pooled space (``patchd bench mining`` reports both spaces).
- The monitor's copy (``mined_groups.json``) lives in the penultimate space, the one production
  events carry: each mined group is re-distilled there on the same held-out rows
  (:func:`.membership.transfer`).
- Handed downstream: the true groups when ``data`` carries them (``mined=False``), otherwise
  ``subgroup=rest`` (0) / ``subgroup=failing`` (1) within each class; ``hardness`` = log-odds of
  membership (> 0: member), ``membership`` = its probability; each class's FailureMode carries
  the group's confidence and size.

Parameters (``patch.params.subgroup``): ``dims`` (PCA dimensions tried, default 2..32),
``max_per_class`` (held-out rows per class for the fit, default 5000), ``tiles`` (8),
``max_clusters`` (10), ``clip_model`` (``ViT-B-32``), ``embedding`` (``pooled`` or
``penultimate``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from patchd.abc import FailureMode, Miner, MiningResult, StageContext
from patchd.exceptions import ConfigError, StageError
from patchd.ml.data import ImageSet
from patchd.ml.models import features, pooled_features
from patchd.monitor.mined import MinedDirection, MinedGroups
from patchd.plugins.miners import captions
from patchd.plugins.miners.directions import ClassDirection, Preprocessor
from patchd.plugins.miners.membership import (
    DIMS,
    ClassMembership,
    Scores,
    fit_class_membership,
    score_class,
    transfer,
)
from patchd.plugins.miners.report import (
    ClassReport,
    FailureReport,
    GridRow,
    Tile,
    describe,
    lifts_for,
    render_grid,
)
from patchd.plugins.miners.svm import Scored, SVMDirectionMiner, _clusters, _score

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

SUBGROUPS = ("subgroup=rest", "subgroup=failing")
EMBEDDINGS = ("pooled", "penultimate")
PENULTIMATE, POOLED = "classifier-features", "classifier-pooled"
Embed = Callable[[torch.Tensor], np.ndarray]


@dataclass(frozen=True)
class SubgroupParams:
    dims: tuple[int, ...] = DIMS
    max_per_class: int = 5000
    tiles: int = 8
    max_clusters: int = 10
    clip_model: str = "ViT-B-32"
    embedding: str = "pooled"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SubgroupParams:
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(
                f"patch.params.subgroup has unknown keys {sorted(unknown)}; "
                f"known: {sorted(cls.__dataclass_fields__)}"
            )
        if "dims" in raw:
            dims = tuple(int(d) for d in raw["dims"])
            if not dims or min(dims) < 1:
                raise ConfigError(f"patch.params.subgroup.dims must be positive, got {dims}")
            raw = {**raw, "dims": dims}
        if raw.get("embedding", "pooled") not in EMBEDDINGS:
            raise ConfigError(
                f"patch.params.subgroup.embedding must be one of {list(EMBEDDINGS)}, "
                f"got {raw['embedding']!r}"
            )
        return cls(**raw)


@dataclass(frozen=True, eq=False)
class Assigned:
    """Membership of every row of the scored set, gathered over the classes."""

    probability: np.ndarray
    hardness: np.ndarray
    members: np.ndarray
    per_class: tuple[Scores, ...]


class SubgroupMiner(Miner):
    """Error-seeded mixture + distilled membership per class; see the module docstring."""

    def mine(
        self,
        ctx: StageContext,
        model: nn.Module,
        data: ImageSet,
        fit_data: ImageSet | None = None,
    ) -> MiningResult:
        params = SubgroupParams.from_dict(ctx.plugin_params("subgroup"))
        if fit_data is None:
            log.warning(
                "run %s: no held-out data given; fitting the subgroups on the scored set itself "
                "(its errors may be memorized away)",
                ctx.run_id,
            )
        fit_set = data if fit_data is None else fit_data
        if len(data) == 0 or len(fit_set) == 0:
            raise StageError(f"run {ctx.run_id}: cannot mine failures on an empty set")
        if fit_set.num_classes != data.num_classes:
            raise StageError(
                f"run {ctx.run_id}: held-out data has {fit_set.num_classes} classes, "
                f"the training split {data.num_classes}"
            )
        embed, clip, name = _embedder(ctx, model, params, fit_set.x[:2])
        ctx.progress(0.1, f"embedding {len(fit_set)} held-out examples ({name})")
        raw_fit = embed(fit_set.x)
        _check_finite(raw_fit, ctx.run_id)
        pre = Preprocessor.fit(raw_fit)
        fit = _score(model, fit_set, pre(raw_fit))
        scored = fit if fit_data is None else _score(model, data, pre(embed(data.x)))
        ctx.progress(0.4, "fitting the failing subgroup of each class")
        from threadpoolctl import threadpool_limits

        # small fits: one BLAS/OpenMP thread is ~30x faster than many on a busy 2-core host
        with threadpool_limits(1):
            models = [_fit(fit, c, params, ctx.seed) for c in range(data.num_classes)]
            clusters = _clusters(fit, ctx.seed, params.max_clusters)
        assigned = _assign(scored, models)
        groups, names, mined = _groups(data, assigned.members)
        ctx.progress(0.7, "describing the groups and writing the report")
        dirs = [_as_direction(m) for m in models]
        cap = captions.caption_classes(clip, pre, dirs, data.class_names) if clip else None
        classes = tuple(
            _class_report(scored, m, s, cap[m.cls] if cap else None, params.tiles)
            for m, s in zip(models, assigned.per_class, strict=True)
        )
        report = FailureReport(
            run_id=ctx.run_id,
            embedding=name,
            mined=mined,
            group_names=SUBGROUPS if mined else data.group_names,
            n_fit=len(fit.data),
            n_assigned=len(data),
            classes=classes,
            clusters=clusters,
        )
        log.info("run %s mining report:\n%s", ctx.run_id, report.summary())
        return MiningResult(
            modes=tuple(_mode(m, r) for m, r in zip(models, classes, strict=True)),
            groups=groups,
            group_names=names,
            hardness=torch.as_tensor(assigned.hardness, dtype=torch.float32),
            mined=mined,
            report_json=report.write(ctx.out_dir / "failure_report.json"),
            report_png=_png(ctx, scored, assigned, report, params.tiles),
            membership=torch.as_tensor(assigned.probability, dtype=torch.float32),
            pseudo_groups=_monitor_copy(ctx, model, fit, models, classes, name, pre),
        )


def _embedder(
    ctx: StageContext, model: nn.Module, params: SubgroupParams, probe: torch.Tensor
) -> tuple[Embed, Any, str]:
    """(embed, CLIP embedder or None, embedding name) for ``params.embedding``."""
    if ctx.params.clip_checkpoint is None and params.embedding == "pooled":
        if pooled_features(model, probe) is not None:

            def embed(x: torch.Tensor) -> np.ndarray:
                z = pooled_features(model, x)
                if z is None:  # the probe had one: only an input-dependent architecture
                    raise StageError(f"run {ctx.run_id}: the model's spatial activation vanished")
                return z.numpy()

            return embed, None, POOLED
        log.info(
            "run %s: %s has no spatial activation to pool; mining on its penultimate features",
            ctx.run_id,
            type(model).__name__,
        )
    return SVMDirectionMiner()._embedder(ctx, model, _as_svm(params))


def _monitor_copy(
    ctx: StageContext,
    model: nn.Module,
    fit: Scored,
    models: list[ClassMembership],
    classes: tuple[ClassReport, ...],
    name: str,
    pre: Preprocessor,
) -> MinedGroups | None:
    """The membership models in the penultimate space (what production events carry): as
    fitted when the miner embedded there, else each group re-distilled there on the held-out
    rows it was mined on. None for CLIP embeddings (events do not carry them)."""
    if name == PENULTIMATE:
        return _pseudo_groups(pre, models, classes)
    if name != POOLED:
        return None
    raw = features(model, fit.data.x).numpy()
    pen = Preprocessor.fit(raw)
    z, y = pen(raw), fit.data.y.numpy()
    moved = []
    for m in models:
        rows = np.flatnonzero(y == m.cls)
        members = score_class(m, fit.z[rows], fit.margin[rows]).members
        moved.append(transfer(m, z[rows], members, ctx.seed))
    return _pseudo_groups(pen, moved, classes)


def _pseudo_groups(
    pre: Preprocessor, models: list[ClassMembership], classes: tuple[ClassReport, ...]
) -> MinedGroups:
    """The mined classes' membership models for the monitor. A member is an event whose
    calibrated log-odds exceed the log-odds of the held-out share of the subgroup (where the
    prior-corrected posterior is 0.5 at that share)."""
    directions = []
    for m, r in zip(models, classes, strict=True):
        if not m.mined:
            continue
        share = min(max(m.n_members_fit / max(m.n_fit, 1), 1e-6), 1 - 1e-6)
        directions.append(
            MinedDirection(
                cls=m.cls,
                name=r.name,
                coef=np.asarray(m.coef, np.float64),
                intercept=float(m.intercept),
                threshold=float(np.log((1 - share) / share)),
                confidence=float(min(max(m.confidence, 0.0), 1.0)),
                description=r.description,
            )
        )
    mean, std = np.asarray(pre.mean, np.float64), np.asarray(pre.std, np.float64)
    return MinedGroups("", "", "", PENULTIMATE, mean, std, tuple(directions))


def _as_svm(params: SubgroupParams) -> Any:
    from patchd.plugins.miners.svm import SVMParams

    return SVMParams(clip_model=params.clip_model)


def _check_finite(z: np.ndarray, run_id: str) -> None:
    if not np.isfinite(z).all():
        bad = int((~np.isfinite(z)).any(axis=1).sum())
        raise StageError(f"run {run_id}: {bad} held-out embeddings contain NaN or infinite values")


def _fit(fit: Scored, cls: int, params: SubgroupParams, seed: int) -> ClassMembership:
    rows = np.flatnonzero(fit.data.y.numpy() == cls)
    if len(rows) > params.max_per_class:
        rows = np.sort(np.random.default_rng(seed).choice(rows, params.max_per_class, False))
    model = fit_class_membership(cls, fit.z[rows], ~fit.correct[rows], seed, params.dims)
    log.info(
        "class %d: %d/%d held-out wrong; %s: %s (confidence %.3f)",
        cls,
        model.n_wrong,
        model.n_fit,
        model.status,
        model.reason,
        model.confidence,
    )
    return model


def _assign(scored: Scored, models: list[ClassMembership]) -> Assigned:
    n = len(scored.data)
    prob, hard, members = np.zeros(n), np.zeros(n), np.zeros(n, bool)
    y = scored.data.y.numpy()
    per_class = []
    for m in models:
        rows = np.flatnonzero(y == m.cls)
        s = score_class(m, scored.z[rows], scored.margin[rows])
        prob[rows], hard[rows], members[rows] = s.probability, s.hardness, s.members
        per_class.append(s)
    return Assigned(prob, hard, members, tuple(per_class))


def _groups(data: ImageSet, members: np.ndarray) -> tuple[torch.Tensor, tuple[str, ...], bool]:
    if data.has_groups:
        return data.g.clone(), data.group_names, False
    return torch.as_tensor(members, dtype=torch.int64), SUBGROUPS, True


def _as_direction(m: ClassMembership) -> ClassDirection:
    """The membership classifier in :class:`ClassDirection` form (for CLIP captions)."""
    return ClassDirection(
        cls=m.cls,
        weights=-m.coef,  # ClassDirection's label 1 is the easy side
        intercept=-m.intercept,
        strength=m.confidence,
        c=1.0 if m.mined else None,
        n_wrong=m.n_wrong,
        n_total=m.n_fit,
    )


def _class_report(
    scored: Scored,
    m: ClassMembership,
    s: Scores,
    cap: tuple[tuple[str, ...], tuple[str, ...]] | None,
    tiles: int,
) -> ClassReport:
    data = scored.data
    name = data.class_names[m.cls]
    rows = np.flatnonzero(data.y.numpy() == m.cls)
    lifts = lifts_for(data.g.numpy()[rows], s.members, data.group_names) if data.has_groups else ()
    n_members = int(s.members.sum())
    if not m.mined:
        description = f"{name}: no failing subgroup mined ({m.reason})"
    elif cap and cap[0]:
        description = f"{name}: the failing subgroup looks like '{cap[0][0]}'"
    elif lifts:
        n_wrong = int((~scored.correct[rows]).sum())
        description = describe(name, n_members, len(rows), lifts, n_wrong)
    else:
        description = (
            f"{name}: {n_members}/{len(rows)} in the failing subgroup; held-out error rate "
            f"{m.error_rate_in:.0%} inside vs {m.error_rate_out:.0%} outside"
        )
    order = rows[np.argsort(-s.hardness, kind="stable")]
    return ClassReport(
        cls=m.cls,
        name=name,
        n_total=m.n_fit,
        n_wrong=m.n_wrong,
        n_hard=n_members,
        strength=m.cv_accuracy,
        c=None,
        direction_defined=m.mined,
        description=description,
        lifts=lifts,
        captions_hard=cap[0] if cap else (),
        captions_easy=cap[1] if cap else (),
        hardest_ids=tuple(data.ids[i] for i in order[:tiles]),
        easiest_ids=tuple(data.ids[i] for i in order[::-1][:tiles]),
        status=m.status,
        reason=m.reason,
        confidence=round(m.confidence, 4),
        share=n_members / len(rows) if len(rows) else 0.0,
    )


def _mode(m: ClassMembership, r: ClassReport) -> FailureMode:
    return FailureMode(
        cls=m.cls,
        direction=[float(v) for v in m.direction],
        strength=float(m.cv_accuracy),
        description=r.description,
        n_wrong=m.n_wrong,
        n_total=m.n_fit,
        confidence=float(m.confidence),
        n_members=r.n_hard,
        status=m.status,
    )


def _png(
    ctx: StageContext, scored: Scored, assigned: Assigned, report: FailureReport, tiles: int
) -> Path:
    data, names = scored.data, scored.data.class_names
    y = data.y.numpy()
    rows = []
    for c, cr in zip(range(data.num_classes), report.classes, strict=True):
        idx = np.flatnonzero(y == c)
        order = idx[np.argsort(-assigned.hardness[idx], kind="stable")]
        conf = "n/a" if cr.confidence is None else f"{cr.confidence:.2f}"
        for kind, pick in (("members", order[:tiles]), ("rest", order[::-1][:tiles])):
            shown = tuple(
                Tile(data.x[i], names[y[i]], names[scored.pred[i]], float(assigned.hardness[i]))
                for i in pick
            )
            subtitle = f"{cr.n_hard}/{len(idx)} members, conf {conf}"
            rows.append(GridRow(f"{names[c]}: {kind}", subtitle, shown))
    title = f"run {ctx.run_id}: each class's failing subgroup (top) and the rest (bottom)"
    return render_grid(rows, title, ctx.out_dir / "failure_report.png")
