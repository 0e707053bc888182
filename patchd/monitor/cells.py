"""Per-(class x subgroup) statistics of a window of labeled events, computed with numpy.

A *cell* is (true class, subgroup). Each subgroup also gets a pooled row with class ``"*"``.
Accuracy intervals are Wilson intervals (:func:`patchd.stats.wilson_interval`); the worst-group
accuracy is the minimum over cells (not pooled rows) with at least ``n_min`` events.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from patchd.monitor.groups import ALL
from patchd.monitor.window import LabeledEvents
from patchd.stats import wilson_interval


@dataclass(frozen=True)
class CellStats:
    cls: str  # class name, or "*" for the subgroup's pooled row
    group: str
    n: int
    correct: int
    accuracy: float  # nan when n == 0
    ci_low: float
    ci_high: float
    pred_mix: tuple[float, ...]  # share of each predicted class among the cell's events
    mean_confidence: float  # nan when no event carried probabilities

    @property
    def pooled(self) -> bool:
        return self.cls == ALL


@dataclass(frozen=True)
class WindowStats:
    cells: tuple[CellStats, ...]  # every class x group cell, then one pooled row per group
    n: int
    worst_group_accuracy: float | None  # over cells with n >= n_min; None when none qualifies
    worst_cell: tuple[str, str] | None


@dataclass(frozen=True)
class _Counts:
    n: np.ndarray  # [K, G]
    correct: np.ndarray  # [K, G]
    mix: np.ndarray  # [K, G, K] prediction counts
    conf_sum: np.ndarray  # [K, G]
    conf_n: np.ndarray  # [K, G]


def _counts(ev: LabeledEvents, k: int, g: int) -> _Counts:
    code = ev.label * g + ev.group
    correct = (ev.pred == ev.label).astype(np.float64)
    has_conf = ~np.isnan(ev.confidence)
    n = np.bincount(code, minlength=k * g)
    return _Counts(
        n=n.reshape(k, g),
        correct=np.bincount(code, correct, minlength=k * g).round().astype(np.int64).reshape(k, g),
        mix=np.bincount(code * k + ev.pred, minlength=k * g * k).reshape(k, g, k),
        conf_sum=np.bincount(code[has_conf], ev.confidence[has_conf], minlength=k * g).reshape(
            k, g
        ),
        conf_n=np.bincount(code[has_conf], minlength=k * g).reshape(k, g),
    )


def _cell(
    cls: str,
    group: str,
    n: int,
    correct: int,
    mix: np.ndarray,
    conf: tuple[float, int],
    confidence: float,
) -> CellStats:
    lo, hi = wilson_interval(correct, n, confidence)
    share = tuple(float(x) for x in (mix / n if n else np.zeros_like(mix, dtype=float)))
    return CellStats(
        cls=cls,
        group=group,
        n=n,
        correct=correct,
        accuracy=correct / n if n else float("nan"),
        ci_low=lo,
        ci_high=hi,
        pred_mix=share,
        mean_confidence=conf[0] / conf[1] if conf[1] else float("nan"),
    )


def class_count(ev: LabeledEvents, class_names: list[str]) -> int:
    top = int(max(ev.label.max(initial=-1), ev.pred.max(initial=-1))) + 1
    return max(len(class_names), top)


def class_name(index: int, class_names: list[str]) -> str:
    return class_names[index] if 0 <= index < len(class_names) else str(index)


def window_stats(
    ev: LabeledEvents,
    class_names: list[str],
    group_names: list[str],
    n_min: int,
    confidence: float,
) -> WindowStats:
    """Every cell's statistics, pooled rows per group, and the worst-group accuracy."""
    k, g = class_count(ev, class_names), len(group_names)
    c = _counts(ev, k, g) if g else None
    rows: list[CellStats] = []
    for gi, group in enumerate(group_names):
        assert c is not None  # group_names is not empty
        for ki in range(k):
            rows.append(
                _cell(
                    class_name(ki, class_names),
                    group,
                    int(c.n[ki, gi]),
                    int(c.correct[ki, gi]),
                    c.mix[ki, gi],
                    (float(c.conf_sum[ki, gi]), int(c.conf_n[ki, gi])),
                    confidence,
                )
            )
        rows.append(
            _cell(
                ALL,
                group,
                int(c.n[:, gi].sum()),
                int(c.correct[:, gi].sum()),
                c.mix[:, gi].sum(axis=0),
                (float(c.conf_sum[:, gi].sum()), int(c.conf_n[:, gi].sum())),
                confidence,
            )
        )
    qualified = [r for r in rows if not r.pooled and r.n >= n_min]
    worst = min(qualified, key=lambda r: r.accuracy, default=None)
    return WindowStats(
        cells=tuple(rows),
        n=len(ev),
        worst_group_accuracy=worst.accuracy if worst else None,
        worst_cell=(worst.cls, worst.group) if worst else None,
    )


def group_shares(group: np.ndarray, group_names: list[str]) -> dict[str, float]:
    """Each subgroup's share of the given events (0 for configured groups without traffic)."""
    total = len(group)
    if not total:
        return dict.fromkeys(group_names, 0.0)
    counts = np.bincount(group, minlength=len(group_names))
    return {name: float(counts[i]) / total for i, name in enumerate(group_names)}
