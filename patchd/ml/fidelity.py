"""Synthesis fidelity: are the translated images what they claim to be?

A subgroup translation of ``x`` (class ``c``, group ``s``) should show group ``t`` and still be
class ``c``. Each check uses judges that the translator never saw and could not have learned to
fool, trained on *real* images of the reference split (validation: held out from the
translation's training):

- ``flip_rate``: share of translations that a group judge (per class, trained on real images with
  their group labels) assigns to the target group. A generator can fool such a judge with faint
  adversarial marks, so it is never read alone;
- ``tttr`` (train on translated, test on real): a fresh group judge trained only on the
  translations (label = target group) and scored on real reference images with their true
  groups (balanced accuracy). Faint marks teach it nothing about real images; the identity
  translation teaches it the inverse (near 0);
- ``class_kept``: share of translations that a class judge trained on *group-balanced* real data
  (so it cannot lean on the group) assigns to the source class; ``class_kept_ceiling`` is the
  same judge on real images of the target cell (the pair may be hard to tell apart);
- ``change_spread`` vs ``real_spread``: where a translation changes the image (the centroid of
  ``|x' - x|`` on a 3x3 grid, normalised entropy) against where real target-group images differ
  from the source group's mean image. A translator that always paints one corner has a low
  spread where real instances vary in position.

:func:`apply_policy` turns a report into what the trainer uses: the translations of a class that
misses a threshold are replaced by the identity, so the consistency term of that class is 0 and
CAMEL falls back to class-conditional Group DRO there, and the verdict says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from patchd.abc import Augmentation
from patchd.ml.data import ImageSet
from patchd.stats import wilson_interval

SPREAD_GRID = 3
MAX_JUDGED = 1000  # translations judged per direction (a seeded subset of larger groups)


@dataclass(frozen=True)
class FidelityPolicy:
    """Thresholds below which a class's translations are not used (``patch.fidelity``)."""

    min_flip_rate: float = 0.8
    min_tttr: float = 0.75
    min_class_kept_ratio: float = 0.9  # class_kept / class_kept_ceiling
    judge_steps: int = 300
    keep_unmeasured: bool = True  # no reference groups to judge with: keep, and say so

    @classmethod
    def from_mapping(cls, values: Any) -> FidelityPolicy:
        """From ``patch.fidelity`` (a config section or a dict); unknown keys are ignored."""
        data = values if isinstance(values, dict) else values.model_dump()
        return cls(**{k: data[k] for k in asdict(cls()) if k in data})


@dataclass(frozen=True)
class DirectionFidelity:
    cls: int
    source: int
    target: int
    n: int
    flip_rate: float
    tttr: float
    class_kept: float
    class_kept_ceiling: float
    change_spread: float
    real_spread: float
    verdict: str = "kept"

    @property
    def kept(self) -> bool:
        return self.verdict == "kept"


@dataclass(frozen=True)
class FidelityReport:
    directions: tuple[DirectionFidelity, ...] = ()
    group_judge_accuracy: dict[str, float] = field(default_factory=dict)  # class -> held-out acc
    class_judge_accuracy: float = float("nan")
    measured: bool = True
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "directions": [asdict(d) for d in self.directions],
            "group_judge_accuracy": self.group_judge_accuracy,
            "class_judge_accuracy": _finite(self.class_judge_accuracy),
            "measured": self.measured,
            "reason": self.reason,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FidelityReport:
        accuracy = data.get("class_judge_accuracy")
        return cls(
            directions=tuple(DirectionFidelity(**d) for d in data.get("directions", [])),
            group_judge_accuracy=dict(data.get("group_judge_accuracy", {})),
            class_judge_accuracy=float("nan") if accuracy is None else float(accuracy),
            measured=bool(data.get("measured", True)),
            reason=str(data.get("reason", "")),
        )

    def dropped_classes(self) -> dict[int, str]:
        """Classes whose translations the policy replaced by the identity, with the reason."""
        out: dict[int, str] = {}
        for d in self.directions:
            if not d.kept:
                out.setdefault(d.cls, d.verdict)
        return out


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), 4)


# --- which rows are translated where -------------------------------------------------------


def class_pairs(train: ImageSet) -> dict[int, tuple[int, int]]:
    """Per class, its two largest subgroups (larger first), the pair a translator maps between."""
    pairs: dict[int, tuple[int, int]] = {}
    for cls in range(train.num_classes):
        counts = torch.bincount(train.g[train.y == cls].clamp(min=0), minlength=1)
        order = [int(g) for g in torch.argsort(counts, descending=True, stable=True) if counts[g]]
        if len(order) >= 2:
            pairs[cls] = (order[0], order[1])
    return pairs


def translated_view(
    train: ImageSet, paired: dict[str, torch.Tensor], pairs: dict[int, tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, its translation (``G`` for the larger group A, ``F`` for B) and target group.

    Rows outside a class's pair get their own image and target -1.
    """
    view = train.x.clone()
    target = torch.full_like(train.g, -1)
    for cls, (a, b) in pairs.items():
        in_a = (train.y == cls) & (train.g == a)
        in_b = (train.y == cls) & (train.g == b)
        view[in_a], target[in_a] = paired["G"][in_a], b
        view[in_b], target[in_b] = paired["F"][in_b], a
    return view, target


# --- judges --------------------------------------------------------------------------------


class Judge(nn.Module):
    """A small CNN classifier, independent of every model in the run."""

    def __init__(self, channels: int, n_out: int, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(2 * width * 16, n_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_judge(
    x: torch.Tensor, labels: torch.Tensor, n_out: int, steps: int, seed: int, device: str
) -> Judge:
    """A judge trained with label-balanced batches (each label equally often)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    judge = Judge(x.shape[1], n_out).to(device)
    optimizer = torch.optim.Adam(judge.parameters(), lr=2e-3)
    counts = torch.bincount(labels, minlength=n_out).float()
    weights = (1.0 / counts.clamp(min=1))[labels]
    judge.train()
    for _ in range(steps):
        idx = torch.multinomial(weights, 64, replacement=True, generator=generator)
        loss = nn.functional.cross_entropy(judge(x[idx].to(device)), labels[idx].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return judge.eval()


@torch.no_grad()
def judge_predict(judge: Judge, x: torch.Tensor, device: str) -> torch.Tensor:
    if len(x) == 0:
        return torch.zeros(0, dtype=torch.int64)
    out = [judge(chunk.to(device)).argmax(1).cpu() for chunk in torch.split(x, 512)]
    return torch.cat(out)


def balanced_accuracy(pred: torch.Tensor, truth: torch.Tensor, labels: tuple[int, ...]) -> float:
    recalls = [float((pred[truth == k] == k).float().mean()) for k in labels if (truth == k).any()]
    return sum(recalls) / len(recalls) if recalls else float("nan")


def _halves(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[: n // 2], order[n // 2 :]


# --- spread of where the change lands ------------------------------------------------------


def centroid_cells(delta: torch.Tensor) -> torch.Tensor:
    """The 3x3 grid cell of each image's change centroid (``delta`` is [N, H, W], >= 0)."""
    n, h, w = delta.shape
    mass = delta.flatten(1).sum(1).clamp(min=1e-8)
    rows = torch.arange(h, dtype=delta.dtype)[None, :, None]
    cols = torch.arange(w, dtype=delta.dtype)[None, None, :]
    r = (delta * rows).flatten(1).sum(1) / mass
    c = (delta * cols).flatten(1).sum(1) / mass
    gr = (r * SPREAD_GRID / h).long().clamp(0, SPREAD_GRID - 1)
    gc = (c * SPREAD_GRID / w).long().clamp(0, SPREAD_GRID - 1)
    return gr * SPREAD_GRID + gc


def spread(cells: torch.Tensor) -> float:
    """Normalised entropy of a histogram over the grid (0: one cell, 1: uniform)."""
    if len(cells) == 0:
        return float("nan")
    p = torch.bincount(cells, minlength=SPREAD_GRID**2).float() / len(cells)
    p = p[p > 0]
    return max(0.0, float(-(p * p.log()).sum() / math.log(SPREAD_GRID**2)))


def change_spread(before: torch.Tensor, after: torch.Tensor) -> float:
    return spread(centroid_cells((after - before).abs().sum(1)))


def real_spread(target_imgs: torch.Tensor, source_imgs: torch.Tensor) -> float:
    """Where real target-group images depart from the source group beyond its own variation.

    Per pixel, the departure is ``|x_t - mean_s|`` above the source group's 95th percentile of
    ``|x_s - mean_s|`` there: what the source group never shows (a sticker, a colour).
    """
    if len(target_imgs) == 0 or len(source_imgs) == 0:
        return float("nan")
    mean = source_imgs.mean(0, keepdim=True)
    usual = torch.quantile((source_imgs - mean).abs().flatten(1), 0.95, dim=0)
    usual = usual.reshape(1, *source_imgs.shape[1:])
    departure = ((target_imgs - mean).abs() - usual).clamp(min=0).sum(1)
    return spread(centroid_cells(departure))


# --- the report ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _ClassJudges:
    group: Judge
    group_accuracy: float
    tttr: float


def _class_judges(
    view: torch.Tensor,
    target: torch.Tensor,
    ref: ImageSet,
    cls: int,
    pair: tuple[int, int],
    policy: FidelityPolicy,
    seed: int,
    device: str,
) -> _ClassJudges:
    n_groups = max(len(ref.group_names), max(pair) + 1)
    rows = (ref.y == cls) & ((ref.g == pair[0]) | (ref.g == pair[1]))
    rx, rg = ref.x[rows], ref.g[rows]
    fit_idx, held_idx = _halves(len(rx), seed)
    held_judge = train_judge(rx[fit_idx], rg[fit_idx], n_groups, policy.judge_steps, seed, device)
    held_pred = judge_predict(held_judge, rx[held_idx], device)
    accuracy = balanced_accuracy(held_pred, rg[held_idx], pair)
    group = train_judge(rx, rg, n_groups, policy.judge_steps, seed, device)
    mine = target >= 0
    tttr_judge = train_judge(view[mine], target[mine], n_groups, policy.judge_steps, seed, device)
    tttr = balanced_accuracy(judge_predict(tttr_judge, rx, device), rg, pair)
    return _ClassJudges(group, accuracy, tttr)


def _balanced_class_judge(
    ref: ImageSet, policy: FidelityPolicy, seed: int, device: str
) -> tuple[Judge, float]:
    """A class judge on group-balanced real data (each cell equally weighted), and its accuracy."""
    cells = ref.cell_index()
    fit_idx, held_idx = _halves(len(ref), seed + 1)

    def fit(idx: torch.Tensor) -> Judge:
        weights = (1.0 / torch.bincount(cells[idx]).float().clamp(min=1))[cells[idx]]
        pick = torch.multinomial(
            weights, len(idx), replacement=True, generator=torch.Generator().manual_seed(seed)
        )
        sel = idx[pick]
        return train_judge(
            ref.x[sel], ref.y[sel], ref.num_classes, policy.judge_steps, seed, device
        )

    held = fit(fit_idx)
    pred = judge_predict(held, ref.x[held_idx], device)
    accuracy = balanced_accuracy(pred, ref.y[held_idx], tuple(range(ref.num_classes)))
    return fit(torch.arange(len(ref))), accuracy


def measure(
    train: ImageSet,
    paired: dict[str, torch.Tensor],
    reference: ImageSet,
    policy: FidelityPolicy,
    *,
    seed: int = 0,
    device: str = "cpu",
) -> FidelityReport:
    """Fidelity of ``paired`` translations of ``train``, judged on the real ``reference`` split."""
    if set(paired) != {"F", "G"}:
        return _unmeasured(f"translations {sorted(paired)} are not an F/G pair")
    if not reference.has_groups or reference.group_names != train.group_names:
        return _unmeasured(
            "the reference split has no subgroup labels for these groups (mined groups): "
            "fidelity cannot be judged on real images"
        )
    pairs = class_pairs(train)
    view, target = translated_view(train, paired, pairs)
    class_judge, class_accuracy = _balanced_class_judge(reference, policy, seed, device)
    directions, group_accuracy = [], {}
    for cls, pair in pairs.items():
        in_cls = train.y == cls
        judges = _class_judges(
            view[in_cls], target[in_cls], reference, cls, pair, policy, seed, device
        )
        group_accuracy[str(cls)] = round(judges.group_accuracy, 4)
        for source, tgt in (pair, pair[::-1]):
            rows = in_cls & (train.g == source)
            directions.append(
                _direction(train, view, rows, reference, cls, source, tgt, judges, class_judge)
            )
    report = FidelityReport(tuple(directions), group_accuracy, class_accuracy)
    return with_verdicts(report, policy)


def _direction(
    train: ImageSet,
    view: torch.Tensor,
    rows: torch.Tensor,
    ref: ImageSet,
    cls: int,
    source: int,
    target: int,
    judges: _ClassJudges,
    class_judge: Judge,
) -> DirectionFidelity:
    device = str(next(class_judge.parameters()).device)
    total = int(rows.sum())
    rows = _at_most(rows, MAX_JUDGED, seed=cls * 31 + source)
    translated = view[rows]
    flips = judge_predict(judges.group, translated, device) == target
    kept = judge_predict(class_judge, translated, device) == cls
    real_t = ref.x[(ref.y == cls) & (ref.g == target)]
    real_s = ref.x[(ref.y == cls) & (ref.g == source)]
    ceiling = judge_predict(class_judge, real_t, device) == cls
    return DirectionFidelity(
        cls=cls,
        source=source,
        target=target,
        n=total,
        flip_rate=_mean(flips),
        tttr=round(judges.tttr, 4),
        class_kept=_mean(kept),
        class_kept_ceiling=_mean(ceiling),
        change_spread=round(change_spread(train.x[rows], translated), 4),
        real_spread=round(real_spread(real_t, real_s), 4),
    )


def _at_most(rows: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    """A bool mask with at most ``limit`` of the True rows kept (seeded choice)."""
    idx = rows.nonzero(as_tuple=True)[0]
    if len(idx) <= limit:
        return rows
    keep = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:limit]]
    out = torch.zeros_like(rows)
    out[keep] = True
    return out


def _mean(mask: torch.Tensor) -> float:
    return round(float(mask.float().mean()), 4) if len(mask) else float("nan")


def _unmeasured(reason: str) -> FidelityReport:
    return FidelityReport(measured=False, reason=reason)


def upper_bound(rate: float, n: int) -> float:
    """The 95% Wilson upper bound of a share measured on ``n`` translations."""
    if n <= 0 or math.isnan(rate):
        return float("nan")
    return wilson_interval(round(rate * n), n)[1]


def verdict(d: DirectionFidelity, policy: FidelityPolicy) -> str:
    """``kept``, or ``dropped: <which measure missed which threshold>``.

    A share measured on few translations (a scarce minority group) misses only when even its
    95% upper bound is below the threshold: five good translations of which three were judged
    right are not evidence of an unfaithful translator, five of which none were are.
    """
    misses = []
    judged = min(d.n, MAX_JUDGED)
    if not upper_bound(d.flip_rate, judged) >= policy.min_flip_rate:
        misses.append(f"flip rate {d.flip_rate:.2f} < {policy.min_flip_rate:.2f}")
    if not d.tttr >= policy.min_tttr:
        misses.append(f"train-on-translated accuracy {d.tttr:.2f} < {policy.min_tttr:.2f}")
    ceiling = d.class_kept_ceiling
    ratio = upper_bound(d.class_kept, judged) / ceiling if ceiling > 0 else 0.0
    if not ratio >= policy.min_class_kept_ratio:
        misses.append(
            f"class kept {d.class_kept:.2f} against the real cell's {ceiling:.2f} "
            f"(ratio < {policy.min_class_kept_ratio:.2f})"
        )
    return "kept" if not misses else "dropped: " + "; ".join(misses)


def with_verdicts(report: FidelityReport, policy: FidelityPolicy) -> FidelityReport:
    """Each direction's verdict; a class is dropped when either of its directions is."""
    judged = [replace(d, verdict=verdict(d, policy)) for d in report.directions]
    failing = {d.cls for d in judged if not d.kept}
    final = tuple(
        replace(d, verdict="dropped with its class (the other direction missed)")
        if d.kept and d.cls in failing
        else d
        for d in judged
    )
    return replace(report, directions=final)


def apply_policy(
    train: ImageSet, paired: dict[str, torch.Tensor], report: FidelityReport
) -> dict[str, torch.Tensor]:
    """The translations with every dropped class's rows set to the identity (no consistency)."""
    dropped = report.dropped_classes()
    if not dropped:
        return paired
    rows = torch.zeros(len(train), dtype=torch.bool)
    for cls in dropped:
        rows |= train.y == cls
    out = {}
    for key, tensor in paired.items():
        fixed = tensor.clone()
        fixed[rows] = train.x[rows]
        out[key] = fixed
    return out


def judged(
    aug: Augmentation,
    train: ImageSet,
    reference: ImageSet,
    policy: FidelityPolicy,
    *,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[Augmentation, FidelityReport, dict[int, str]]:
    """An augmentation's translations measured and the policy applied: what the trainer gets.

    Returns the augmentation to train with (dropped classes set to the identity; all classes
    when nothing could be measured and ``policy.keep_unmeasured`` is off), the report, and the
    dropped classes with their reasons. Augmentations without pairs pass through unjudged.
    """
    if not aug.paired:
        return aug, _unmeasured("no paired translations"), {}
    report = measure(train, aug.paired, reference, policy, seed=seed, device=device)
    dropped = report.dropped_classes()
    paired = apply_policy(train, aug.paired, report)
    if not report.measured and not policy.keep_unmeasured:
        dropped = {c: f"unmeasured: {report.reason}" for c in range(train.num_classes)}
        paired = {k: train.x.clone() for k in aug.paired}
    info = {
        **aug.info,
        "fidelity": report.to_dict(),
        "fidelity_dropped": {str(c): why for c, why in dropped.items()},
    }
    return replace(aug, paired=paired, info=info), report, dropped
