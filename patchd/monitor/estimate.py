"""Label-free accuracy estimates per (predicted class x subgroup) cell, with an interval.

Labels arrive late or never; what every prediction carries at once is its predicted class, its
subgroup, its confidence and (when the capture sends one) the incumbent's embedding. The estimate
is the mean over recent traffic of ``p(correct | x)``, fitted on the labeled reference:

- **per cell**: one ridge logistic calibrator per (predicted class, subgroup) cell, on the
  features ``logit(confidence)`` and, when the reference carries embeddings, the reference
  embeddings projected on their top principal directions (:data:`EMBEDDING_DIMS`). A calibrator
  of the confidence score alone (what CBPE does) learns ``p(correct | score)``, which moves with
  the mix of subgroups and classes behind a score; ``p(correct | x)`` does not move under a
  label-preserving shift of that mix, so a calibrator that sees the cell and the embedding holds;
- **aggregated** per subgroup (pooled over predicted classes, class ``*``) by the live counts,
  so a change of a subgroup's class mix moves its estimate;
- **interval**: the sampling spread of the realized accuracy of those events
  (``sum p(1-p) / n^2``) plus the calibrator's own uncertainty (delta method on the inverse
  Hessian), at the monitor's ``confidence``;
- **unreliable** (said instead of a confident number): a cell the reference never saw, traffic
  whose features lie beyond the reference's 99th percentile far more often than 1% of the time
  (:data:`FAR_SHARE`), or, once labels arrive, a realized accuracy of the labeled part of the
  traffic outside the estimate's interval for those same events (a concept shift, which no
  label-free method sees, shows up here).

Never used as accuracy by the alert policy: it has its own state, "estimated degraded", which
opens a patch run only when ``trigger.on`` lists ``estimated``. Numpy/scipy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

EMBEDDING_DIMS = 8  # principal directions of the reference embeddings used as features
RIDGE = 1.0  # L2 penalty on the standardized (non-bias) coefficients
MIN_REFERENCE = 10  # labeled reference events a cell needs for a calibrator
MIN_LABELED_CHECK = 30  # labeled traffic events a cell needs before realized accuracy is checked
FAR_QUANTILE = 0.99  # reference quantile of the feature distance that counts as "far"
FAR_SHARE = 0.25  # share of far traffic (or of events in unseen cells) that marks it unreliable
MINOR_SHARE = 0.1  # a cell below this share of its group does not make the group unreliable
CONF_EPS = 1e-4


@dataclass(frozen=True)
class Calibrator:
    """One cell's logistic model of p(correct | features), fitted on the labeled reference."""

    n: int
    accuracy: float  # the cell's reference accuracy (correct among events predicted as the class)
    mean: np.ndarray  # [d] feature means (standardization)
    scale: np.ndarray  # [d] feature standard deviations
    coef: np.ndarray  # [d + 1] bias first
    cov: np.ndarray  # [d + 1, d + 1] inverse Hessian: the coefficients' covariance
    far: float  # FAR_QUANTILE of the reference's squared standardized distance

    def design(self, features: np.ndarray) -> np.ndarray:
        z = (features - self.mean) / self.scale
        return np.hstack([np.ones((len(z), 1)), z])

    def predict(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(p(correct) per event, the design matrix)."""
        x = self.design(features)
        return _sigmoid(x @ self.coef), x


@dataclass(frozen=True)
class Estimate:
    cls: str  # predicted class name, or "*" for the subgroup pooled over predicted classes
    group: str
    n: int  # traffic events the estimate is over
    accuracy: float  # nan when n == 0 or no calibrator
    ci_low: float
    ci_high: float
    reference_accuracy: float  # the row's labeled reference accuracy (by predicted class)
    reliable: bool
    reason: str | None  # why it is unreliable (None when reliable)
    n_labeled: int  # traffic events of the row that carry a label already
    realized_accuracy: float  # their accuracy (nan when none)


@dataclass(frozen=True)
class Batch:
    """What the estimate reads: the newest predictions (``label`` -1 where not labeled yet)."""

    pred: np.ndarray
    confidence: np.ndarray
    group: np.ndarray
    label: np.ndarray
    embedding: np.ndarray | None  # [n, D] aligned with pred (rows without one: nan), or None


@dataclass(frozen=True)
class Estimator:
    n_classes: int
    basis: np.ndarray | None  # [D, k] principal directions of the reference embeddings
    center: np.ndarray | None  # [D] their mean
    cells: dict[tuple[int, int], Calibrator]
    use_embedding: bool = True

    @classmethod
    def fit(
        cls,
        pred: np.ndarray,
        label: np.ndarray,
        confidence: np.ndarray,
        group: np.ndarray,
        embedding: np.ndarray | None,
        n_classes: int,
        use_embedding: bool = True,
    ) -> Estimator:
        """Fit every cell's calibrator on labeled reference events (``embedding`` aligned)."""
        basis = center = None
        if use_embedding and embedding is not None and len(embedding) >= MIN_REFERENCE:
            rows = embedding[~np.isnan(embedding).any(axis=1)]
            if len(rows) >= MIN_REFERENCE:
                center = rows.mean(axis=0)
                _, _, vt = np.linalg.svd(rows - center, full_matrices=False)
                basis = vt[:EMBEDDING_DIMS].T
        est = cls(n_classes, basis, center, {}, use_embedding)
        feats = est.features(confidence, embedding)
        correct = (pred == label).astype(np.float64)
        for key in {(int(k), int(g)) for k, g in zip(pred, group, strict=True)}:
            mask = (pred == key[0]) & (group == key[1])
            if mask.sum() >= MIN_REFERENCE:
                est.cells[key] = _fit_cell(feats[mask], correct[mask])
        return est

    def features(self, confidence: np.ndarray, embedding: np.ndarray | None) -> np.ndarray:
        conf = np.clip(np.nan_to_num(confidence, nan=0.5), CONF_EPS, 1 - CONF_EPS)
        cols = [np.log(conf / (1 - conf))[:, None]]
        if self.basis is not None and self.center is not None:
            if embedding is None or embedding.shape[1] != len(self.center):  # other width
                proj = np.zeros((len(conf), self.basis.shape[1]))
            else:
                proj = np.nan_to_num((embedding - self.center) @ self.basis)  # missing rows: 0
            cols.append(proj)
        return np.hstack(cols)

    def estimate(
        self,
        traffic: Batch,
        class_names: list[str],
        group_names: list[str],
        confidence: float,
    ) -> tuple[Estimate, ...]:
        """Estimates for every cell and subgroup with traffic (cells first, then ``*`` rows)."""
        z = float(norm.ppf(0.5 + confidence / 2))
        feats = self.features(traffic.confidence, traffic.embedding)
        out: list[Estimate] = []
        for gi in np.unique(traffic.group):
            parts: list[_Part] = []
            in_group = traffic.group == gi
            for ki in np.unique(traffic.pred[in_group]):
                mask = in_group & (traffic.pred == ki)
                part = self._part(
                    int(ki), int(gi), feats[mask], traffic.label[mask], traffic.pred[mask]
                )
                parts.append(part)
                group = _name(int(gi), group_names)
                out.append(part.estimate(_name(int(ki), class_names), group, z))
            out.append(_pooled(parts, "*", _name(int(gi), group_names), z))
        return tuple(out)

    def _part(
        self, k: int, g: int, feats: np.ndarray, label: np.ndarray, pred: np.ndarray
    ) -> _Part:
        cal = self.cells.get((k, g))
        labeled = label >= 0
        ok = (pred[labeled] == label[labeled]).astype(np.float64)
        if cal is None:
            nan = float("nan")
            unseen = "cell unseen in the reference"
            return _Part(len(feats), None, None, None, nan, ok, None, unseen)
        p, x = cal.predict(feats)
        g_vec = (p * (1 - p)) @ x / len(p)
        model_var = float(g_vec @ cal.cov @ g_vec)
        dist = ((x[:, 1:]) ** 2).sum(axis=1)
        far = float((dist > cal.far).mean())
        reason = None
        if far > FAR_SHARE:
            reason = f"{100 * far:.0f}% of inputs beyond the reference's {FAR_QUANTILE:.0%} range"
        return _Part(len(feats), p, model_var, labeled, cal.accuracy, ok, cal, reason)


@dataclass(frozen=True)
class _Part:
    """One cell's estimate before it is named (and what pooling needs)."""

    n: int
    p: np.ndarray | None
    model_var: float | None
    labeled: np.ndarray | None
    reference: float
    ok: np.ndarray  # correctness of the labeled events
    cal: Calibrator | None
    reason: str | None

    @property
    def mean(self) -> float:
        return float(self.p.mean()) if self.p is not None and len(self.p) else float("nan")

    @property
    def sampling(self) -> float:
        """``sum p(1-p)``: the variance of the count of correct events given the estimate."""
        return float((self.p * (1 - self.p)).sum()) if self.p is not None else 0.0

    @property
    def variance(self) -> float:
        if self.p is None or self.model_var is None:
            return float("nan")
        return float((self.p * (1 - self.p)).sum()) / self.n**2 + self.model_var

    def check(self, z: float) -> str | None:
        """Why the labeled part of the traffic contradicts the estimate, or None."""
        if self.p is None or self.labeled is None or len(self.ok) < MIN_LABELED_CHECK:
            return None
        p = self.p[self.labeled]
        spread = float((p * (1 - p)).sum()) / len(p) ** 2 + (self.model_var or 0.0)
        realized, predicted = float(self.ok.mean()), float(p.mean())
        if abs(realized - predicted) > z * np.sqrt(spread) + 1.0 / len(p):
            return (
                f"realized accuracy {realized:.3f} of {len(p)} labeled events outside the "
                f"estimate {predicted:.3f} for them"
            )
        return None

    def estimate(self, cls: str, group: str, z: float) -> Estimate:
        reason = self.reason or self.check(z)
        half = z * np.sqrt(self.variance) if self.p is not None else float("nan")
        return Estimate(
            cls=cls,
            group=group,
            n=self.n,
            accuracy=self.mean,
            ci_low=max(0.0, self.mean - half),
            ci_high=min(1.0, self.mean + half),
            reference_accuracy=self.reference,
            reliable=reason is None,
            reason=reason,
            n_labeled=len(self.ok),
            realized_accuracy=float(self.ok.mean()) if len(self.ok) else float("nan"),
        )


def estimated_degraded(e: Estimate, margin: float, n_min: int, was: bool) -> bool:
    """The row's "estimated degraded" state: a reliable estimate over ``n_min`` events whose
    upper bound lies below ``reference - margin``; it clears once the point estimate is back
    above that level (or the estimate stops being reliable)."""
    level = e.reference_accuracy - margin
    if not e.reliable or e.n < n_min or not np.isfinite(e.accuracy):
        return False
    return e.accuracy < level if was else e.ci_high < level


def _pooled(parts: list[_Part], cls: str, group: str, z: float) -> Estimate:
    """A subgroup's estimate: its cells weighted by their live counts."""
    n = sum(p.n for p in parts)
    seen = [p for p in parts if p.p is not None]
    unseen = n - sum(p.n for p in seen)
    # a cell's problem makes the group unreliable when the cell holds a real part of its traffic
    reasons = [r for p in parts if p.n > MINOR_SHARE * n and (r := p.reason or p.check(z))]
    if unseen > FAR_SHARE * n or not seen:
        reasons.insert(0, f"{unseen} of {n} events in cells unseen in the reference")
    ok = np.concatenate([p.ok for p in parts]) if parts else np.zeros(0)
    if seen:
        m = sum(p.n for p in seen)
        mean = sum(p.n * p.mean for p in seen) / m
        var = sum(p.sampling for p in seen) / m**2
        var += sum((p.n / m) ** 2 * (p.model_var or 0.0) for p in seen)
        ref_n = sum(p.cal.n for p in seen if p.cal is not None)
        reference = sum(p.cal.n * p.cal.accuracy for p in seen if p.cal is not None) / ref_n
        half = z * float(np.sqrt(var))
    else:
        mean = reference = half = float("nan")
    return Estimate(
        cls=cls,
        group=group,
        n=n,
        accuracy=mean,
        ci_low=max(0.0, mean - half) if seen else float("nan"),
        ci_high=min(1.0, mean + half) if seen else float("nan"),
        reference_accuracy=reference,
        reliable=not reasons,
        reason="; ".join(reasons) or None,
        n_labeled=len(ok),
        realized_accuracy=float(ok.mean()) if len(ok) else float("nan"),
    )


def _fit_cell(features: np.ndarray, correct: np.ndarray) -> Calibrator:
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    x = np.hstack([np.ones((len(features), 1)), (features - mean) / scale])
    penalty = np.full(x.shape[1], RIDGE)
    penalty[0] = 1e-6
    # start at the cell's (smoothed) base rate so all-correct cells converge at once
    rate = (correct.sum() + 0.5) / (len(correct) + 1.0)
    coef = np.zeros(x.shape[1])
    coef[0] = np.log(rate / (1 - rate))
    coef, hess = _newton(x, correct, penalty, coef)
    dist = ((x[:, 1:]) ** 2).sum(axis=1)
    return Calibrator(
        n=len(correct),
        accuracy=float(correct.mean()),
        mean=mean,
        scale=scale,
        coef=coef,
        cov=np.linalg.inv(hess),
        far=float(np.quantile(dist, FAR_QUANTILE)) if len(dist) else float("inf"),
    )


def _objective(x: np.ndarray, y: np.ndarray, penalty: np.ndarray, coef: np.ndarray) -> float:
    v = x @ coef
    return float((y * v - np.logaddexp(0.0, v)).sum() - 0.5 * (penalty * coef**2).sum())


def _newton(
    x: np.ndarray, y: np.ndarray, penalty: np.ndarray, coef: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Penalized logistic regression by damped Newton steps; (coefficients, Hessian)."""
    best = _objective(x, y, penalty, coef)
    for _ in range(50):
        p = _sigmoid(x @ coef)
        grad = x.T @ (y - p) - penalty * coef
        hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-4:
            value = _objective(x, y, penalty, coef + t * step)
            if value >= best - 1e-12:
                break
            t /= 2
        coef, best = coef + t * step, max(best, value)
        if np.abs(t * step).max() < 1e-6:
            break
    p = _sigmoid(x @ coef)
    return coef, (x * (p * (1 - p))[:, None]).T @ x + np.diag(penalty)


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(v, -30, 30)))


def _name(index: int, names: list[str]) -> str:
    return names[index] if 0 <= index < len(names) else str(index)
