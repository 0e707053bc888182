"""Per-class failure directions: a linear SVM separating correct from wrong predictions.

Following Jain et al. (ICLR 2023): embeddings are standardised with the fit set's mean and
standard deviation, then L2-normalised (exactly once); per class a linear SVM with balanced class
weights separates correctly (1) from wrongly (0) predicted examples; C is chosen from a grid by
2-fold cross-validated balanced accuracy, which is also the *strength* of the failure mode.

Sign convention: ``direction`` is the unit normal pointing toward the FAILURE side, and
``hardness(z)`` is the signed distance to the decision boundary, positive on the failure side.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

C_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
MIN_PER_SIDE = 2  # 2-fold stratified CV needs at least 2 wrong and 2 right examples
UNDEFINED_STRENGTH = 0.5  # chance-level balanced accuracy


@dataclass(frozen=True, eq=False)
class Preprocessor:
    """Standardise with fit-set statistics, then L2-normalise."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, z: np.ndarray) -> Preprocessor:
        z = np.asarray(z, dtype=np.float64)
        return cls(mean=z.mean(0), std=z.std(0) + 1e-6)

    def __call__(self, z: np.ndarray) -> np.ndarray:
        w = (np.asarray(z, dtype=np.float64) - self.mean) / self.std
        norm = np.linalg.norm(w, axis=1, keepdims=True)
        return w / np.maximum(norm, 1e-12)


@dataclass(frozen=True, eq=False)
class ClassDirection:
    cls: int
    weights: np.ndarray  # SVM normal (label 1 = correct); zeros when undefined
    intercept: float
    strength: float  # best mean 2-fold CV balanced accuracy (0.5 when undefined)
    c: float | None  # chosen C
    n_wrong: int
    n_total: int

    @property
    def defined(self) -> bool:
        return self.c is not None

    @property
    def direction(self) -> np.ndarray:
        """Unit vector toward the failure side (zeros when undefined)."""
        norm = float(np.linalg.norm(self.weights))
        return -self.weights / norm if norm > 0 else np.zeros_like(self.weights)

    def hardness(self, z: np.ndarray) -> np.ndarray:
        """Signed distance to the boundary, > 0 on the failure side (preprocessed inputs)."""
        norm = float(np.linalg.norm(self.weights))
        if norm == 0:
            return np.zeros(len(z))
        return -(np.asarray(z) @ self.weights + self.intercept) / norm


def _svc(c: float, seed: int):  # noqa: ANN202 - sklearn estimator
    from sklearn.svm import LinearSVC

    return LinearSVC(C=c, class_weight="balanced", max_iter=20000, random_state=seed)


def _cv_score(z: np.ndarray, label: np.ndarray, c: float, seed: int) -> float:
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    folds = StratifiedKFold(n_splits=2, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at large C is expected
        scores = cross_val_score(_svc(c, seed), z, label, cv=folds, scoring="balanced_accuracy")
    return float(np.mean(scores))


def fit_class_direction(
    cls: int, z: np.ndarray, correct: np.ndarray, seed: int = 0, c_grid: tuple[float, ...] = C_GRID
) -> ClassDirection:
    """The correct-vs-wrong SVM of one class (``z`` already preprocessed)."""
    correct = np.asarray(correct, dtype=bool)
    n_wrong, n_right = int((~correct).sum()), int(correct.sum())
    if n_wrong < MIN_PER_SIDE or n_right < MIN_PER_SIDE:
        return ClassDirection(
            cls, np.zeros(z.shape[1]), 0.0, UNDEFINED_STRENGTH, None, n_wrong, len(correct)
        )
    label = correct.astype(np.int64)
    scores = [_cv_score(z, label, c, seed) for c in c_grid]
    best = int(np.argmax(scores))
    svc = _svc(c_grid[best], seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        svc.fit(z, label)
    return ClassDirection(
        cls=cls,
        weights=svc.coef_[0].astype(np.float64),
        intercept=float(svc.intercept_[0]),
        strength=scores[best],
        c=c_grid[best],
        n_wrong=n_wrong,
        n_total=len(correct),
    )
