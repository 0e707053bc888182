"""Per-(class, subgroup) evaluation reports (numpy only: serve and the gate read these).

A *cell* is a (class, subgroup) pair with id ``cls * n_groups + group`` (the same numbering as
:meth:`patchd.ml.data.ImageSet.cell_index`). For one model, :class:`ModelEvaluation` holds per-cell
accuracy with Wilson intervals, the worst cell, and the average accuracy pooled over examples and
reweighted to the training mix (each cell weighted by its share of the training data). An example
whose group is unknown has cell id ``UNKNOWN_CELL`` (-1): it counts in the pooled average and ``n``
and in no cell, so it never moves a group's accuracy.

:class:`PairedEvaluation` holds the incumbent and the candidate evaluated on the SAME examples, and
the per-example arrays (``cell``, ``incumbent_correct``, ``candidate_correct``) so the gate can run
a paired bootstrap or McNemar test with numpy alone. ``to_json`` / ``from_json`` carry
``"schema": 1``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from patchd.exceptions import ValidationError
from patchd.stats import wilson_interval

SCHEMA = 1
UNKNOWN_CELL = -1  # cell id of an example whose group is unknown (patchd.ml.data.UNKNOWN_GROUP)


@dataclass(frozen=True)
class CellResult:
    cls: int
    group: int
    class_name: str
    group_name: str
    n: int
    correct: int
    accuracy: float  # nan when n == 0
    ci_low: float
    ci_high: float

    @property
    def key(self) -> str:
        """Display name, e.g. ``"top|color=red"``."""
        return f"{self.class_name}|{self.group_name}"


@dataclass(frozen=True)
class ModelEvaluation:
    cells: tuple[CellResult, ...]  # every (class, group) cell, empty ones included (n == 0)
    worst_group_accuracy: float  # min over cells with n >= n_min (nan when none)
    worst_cell: tuple[int, int] | None  # (cls, group) of the worst cell
    average_pooled: float  # accuracy over all examples
    average_reweighted: float  # sum_cell train_share * accuracy (renormalised over non-empty cells)
    n: int
    confidence: float
    n_min: int

    def cell(self, cls: int, group: int) -> CellResult:
        for c in self.cells:
            if c.cls == cls and c.group == group:
                return c
        raise KeyError((cls, group))

    def to_dict(self) -> dict[str, Any]:
        return {
            "cells": [c.__dict__ for c in self.cells],
            "worst_group_accuracy": self.worst_group_accuracy,
            "worst_cell": list(self.worst_cell) if self.worst_cell else None,
            "average_pooled": self.average_pooled,
            "average_reweighted": self.average_reweighted,
            "n": self.n,
            "confidence": self.confidence,
            "n_min": self.n_min,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelEvaluation:
        worst = data.get("worst_cell")
        return cls(
            cells=tuple(_cell_from_dict(c) for c in data["cells"]),
            worst_group_accuracy=_num(data["worst_group_accuracy"]),
            worst_cell=(int(worst[0]), int(worst[1])) if worst else None,
            average_pooled=_num(data["average_pooled"]),
            average_reweighted=_num(data["average_reweighted"]),
            n=int(data["n"]),
            confidence=float(data["confidence"]),
            n_min=int(data["n_min"]),
        )


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _cell_from_dict(data: dict[str, Any]) -> CellResult:
    return CellResult(**{**data, "accuracy": _num(data["accuracy"])})


def _json_safe(value: Any) -> Any:
    """NaN/inf → null, recursively (strict JSON for the API and the browser)."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _group_labels(group_names: Sequence[str]) -> tuple[str, ...]:
    return tuple(group_names) if group_names else ("all",)


def cell_mix(cell: np.ndarray, n_cells: int) -> np.ndarray:
    """Share of each cell id in ``cell`` (the training mix); uniform when no row has a cell.

    Rows of unknown group (``UNKNOWN_CELL``) are in no cell and do not count.
    """
    known = np.asarray(cell, dtype=np.int64)
    counts = np.bincount(known[known >= 0], minlength=n_cells)[:n_cells].astype(float)
    total = counts.sum()
    return counts / total if total > 0 else np.full(n_cells, 1.0 / max(1, n_cells))


def evaluate_correct(
    correct: np.ndarray,
    cell: np.ndarray,
    class_names: Sequence[str],
    group_names: Sequence[str],
    train_mix: np.ndarray | None = None,
    confidence: float = 0.95,
    n_min: int = 1,
) -> ModelEvaluation:
    """Build a :class:`ModelEvaluation` from per-example correctness and cell ids."""
    groups = _group_labels(group_names)
    n_cells = len(class_names) * len(groups)
    correct = np.asarray(correct, dtype=bool)
    cell = np.asarray(cell, dtype=np.int64)
    _check_cells(correct, cell, n_cells)
    known = cell >= 0  # rows of unknown group count in the average, in no cell
    n = np.bincount(cell[known], minlength=n_cells)
    k = (
        np.bincount(cell[known], weights=correct[known].astype(float), minlength=n_cells)
        .round()
        .astype(np.int64)
    )
    cells = tuple(
        _cell_result(i, len(groups), class_names, groups, int(n[i]), int(k[i]), confidence)
        for i in range(n_cells)
    )
    worst = _worst(cells, n_min)
    # no training mix given: the evaluation data's own mix (reweighted == pooled)
    mix = cell_mix(cell, n_cells) if train_mix is None else np.asarray(train_mix, float)
    return ModelEvaluation(
        cells=cells,
        worst_group_accuracy=worst.accuracy if worst else float("nan"),
        worst_cell=(worst.cls, worst.group) if worst else None,
        average_pooled=float(correct.mean()) if len(correct) else float("nan"),
        average_reweighted=_reweighted(cells, mix),
        n=int(len(correct)),
        confidence=confidence,
        n_min=n_min,
    )


def _check_cells(correct: np.ndarray, cell: np.ndarray, n_cells: int) -> None:
    if correct.shape != cell.shape or correct.ndim != 1:
        raise ValidationError(
            "shape",
            f"correct {correct.shape} and cell {cell.shape} must be equal-length 1-d arrays",
        )
    if len(cell) and (cell.min() < UNKNOWN_CELL or cell.max() >= n_cells):
        raise ValidationError(
            "cell_range",
            f"cell ids must lie in [0, {n_cells}) or be {UNKNOWN_CELL} (unknown group), "
            f"got [{cell.min()}, {cell.max()}]",
        )


def _cell_result(
    i: int,
    n_groups: int,
    class_names: Sequence[str],
    groups: Sequence[str],
    n: int,
    k: int,
    conf: float,
) -> CellResult:
    lo, hi = wilson_interval(k, n, conf)
    c, g = divmod(i, n_groups)
    return CellResult(
        cls=c,
        group=g,
        class_name=str(class_names[c]),
        group_name=str(groups[g]),
        n=n,
        correct=k,
        accuracy=k / n if n else float("nan"),
        ci_low=lo,
        ci_high=hi,
    )


def _worst(cells: Sequence[CellResult], n_min: int) -> CellResult | None:
    eligible = [c for c in cells if c.n >= max(1, n_min)]
    return min(eligible, key=lambda c: (c.accuracy, -c.n)) if eligible else None


def _reweighted(cells: Sequence[CellResult], mix: np.ndarray) -> float:
    if len(mix) != len(cells):
        raise ValidationError(
            "train_mix", f"train_mix has {len(mix)} cells, the evaluation {len(cells)}"
        )
    present = np.array([c.n > 0 for c in cells])
    weights = np.where(present, mix, 0.0)
    if weights.sum() <= 0:
        return float("nan")
    acc = np.array([c.accuracy if c.n else 0.0 for c in cells])
    return float((weights * acc).sum() / weights.sum())


@dataclass(frozen=True)
class PairedCell:
    """One row of the side-by-side table."""

    incumbent: CellResult
    candidate: CellResult

    @property
    def delta(self) -> float:
        return self.candidate.accuracy - self.incumbent.accuracy


@dataclass(frozen=True, eq=False)
class PairedEvaluation:
    incumbent: ModelEvaluation
    candidate: ModelEvaluation
    class_names: tuple[str, ...]
    group_names: tuple[str, ...]
    train_mix: tuple[float, ...]  # per cell id
    cell: np.ndarray  # int64 [N] cell id per held-out example
    incumbent_correct: np.ndarray  # bool [N]
    candidate_correct: np.ndarray  # bool [N]
    ids: tuple[str, ...] = ()  # example ids when known (same order)

    @property
    def rows(self) -> tuple[PairedCell, ...]:
        return tuple(
            PairedCell(a, b)
            for a, b in zip(self.incumbent.cells, self.candidate.cells, strict=True)
        )

    @property
    def worst_group_delta(self) -> float:
        return self.candidate.worst_group_accuracy - self.incumbent.worst_group_accuracy

    @property
    def average_delta(self) -> float:
        return self.candidate.average_pooled - self.incumbent.average_pooled

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "class_names": list(self.class_names),
            "group_names": list(self.group_names),
            "train_mix": list(self.train_mix),
            "incumbent": self.incumbent.to_dict(),
            "candidate": self.candidate.to_dict(),
            "cell": self.cell.astype(int).tolist(),
            "incumbent_correct": self.incumbent_correct.astype(int).tolist(),
            "candidate_correct": self.candidate_correct.astype(int).tolist(),
            "ids": list(self.ids),
        }

    def to_json(self) -> str:
        return json.dumps(_json_safe(self.to_dict()), allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> PairedEvaluation:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValidationError("json", f"evaluation JSON does not parse: {err}") from err
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> PairedEvaluation:
        schema = data.get("schema") if isinstance(data, dict) else None
        if schema != SCHEMA:
            raise ValidationError(
                "schema",
                f"evaluation has schema {schema!r}; this patchd reads schema {SCHEMA} "
                "(re-run the evaluate stage with this version)",
            )
        try:
            return cls(
                incumbent=ModelEvaluation.from_dict(data["incumbent"]),
                candidate=ModelEvaluation.from_dict(data["candidate"]),
                class_names=tuple(data["class_names"]),
                group_names=tuple(data["group_names"]),
                train_mix=tuple(float(v) for v in data["train_mix"]),
                cell=np.asarray(data["cell"], dtype=np.int64),
                incumbent_correct=np.asarray(data["incumbent_correct"], dtype=bool),
                candidate_correct=np.asarray(data["candidate_correct"], dtype=bool),
                ids=tuple(data.get("ids", ())),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValidationError("evaluation", f"evaluation JSON is malformed: {err!r}") from err


def paired(
    incumbent_correct: np.ndarray,
    candidate_correct: np.ndarray,
    cell: np.ndarray,
    class_names: Sequence[str],
    group_names: Sequence[str],
    train_mix: np.ndarray | None = None,
    confidence: float = 0.95,
    n_min: int = 1,
    ids: Sequence[str] = (),
) -> PairedEvaluation:
    """Both models' reports on the same examples (numpy in, :class:`PairedEvaluation` out)."""

    def build(correct: np.ndarray) -> ModelEvaluation:
        return evaluate_correct(
            correct, cell, class_names, group_names, train_mix, confidence, n_min=n_min
        )

    inc = build(incumbent_correct)
    cand = build(candidate_correct)
    n_cells = len(inc.cells)
    mix = cell_mix(cell, n_cells) if train_mix is None else np.asarray(train_mix, float)
    return PairedEvaluation(
        incumbent=inc,
        candidate=cand,
        class_names=tuple(class_names),
        group_names=tuple(group_names),
        train_mix=tuple(float(v) for v in mix),
        cell=np.asarray(cell, dtype=np.int64),
        incumbent_correct=np.asarray(incumbent_correct, dtype=bool),
        candidate_correct=np.asarray(candidate_correct, dtype=bool),
        ids=tuple(ids),
    )
