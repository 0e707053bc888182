"""Failing-subgroup membership of one class: an error-seeded mixture, distilled into a classifier.

Why not the correct-vs-wrong SVM (:mod:`.directions`): trained to separate errors from correct
predictions, its hard side is the *error mask*. When a model gets only part of a minority cell
wrong, the minority examples it still gets right (barely) stay on the easy side, so the group
handed to Group DRO is "the errors" (JTT), not the subgroup. ``patchd bench mining`` measures it.

What is fitted here, per class, on held-out labeled data (validation + labeled production
events, where errors are real and not memorized away):

1. **Mixture.** The class's preprocessed embeddings are reduced by PCA to ``d`` dimensions for
   each ``d`` in :data:`DIMS`; a 2-component full-covariance Gaussian mixture is fitted with its
   means seeded at the mean of the wrong and of the correct examples. EM then moves on the
   embeddings alone, so the failing component grows from the errors to the whole cluster they
   sit in (the minority examples the model still gets right included). The failing component
   is the one with the higher error rate.
2. **Choice of the fit.** Among the candidate ``d``, the one whose failing component is best
   *separated* from the rest and *covers* the errors: (2-fold cross-validated balanced accuracy
   of a linear classifier of "in the component") x (share of the errors inside). Neither needs
   group labels. An earlier criterion, F1 against the errors, preferred the component that
   matched the error mask: with a model wrong on half of a minority cell, "the errors" score
   F1 0.9 and the whole cell 0.6, although the cell is the cleaner cluster (colored-fmnist,
   ``patchd bench mining``).
   The chosen component is then made self-consistent: relabelled by a linear classifier of
   itself until the labels stop changing (at most :data:`REFINE_ITERS` rounds), which moves
   the boundary from the mixture's curved one to the linear gap the score will use.
3. **Distillation.** A class-balanced logistic regression on the full embedding learns "failing
   component vs the rest" on the held-out rows, Platt-scaled on 2-fold out-of-fold decision
   values so that its log-odds are calibrated. Its decision value scores any split (training,
   test); it transfers to the training split where the mixture's densities, fitted at the
   held-out prevalence, do not (measured in the bench).
4. **Threshold from the data.** The classifier is balanced (implicit prior 0.5); the share of the
   subgroup in the scored split is estimated by EM on the scored decision values (Saerens et al.
   2002, prior shift), and an example is a member when its prior-corrected posterior is > 0.5.

:func:`transfer` re-distils a mined group in a second embedding of the same rows (step 3 only):
the miner mines in pooled spatial features, the monitor needs the penultimate ones events carry.

Confidence of a mined group = (2-fold cross-validated accuracy of the distilled classifier on the
held-out rows: how reproducibly the group is recognised) x (share of the held-out errors inside
the group: how much of the failure it explains). Both factors are reported.

Classes that cannot be mined get a reason and a fallback, never NaN: no held-out errors (no
failing subgroup: nobody is a member), too few held-out examples or errors (the model's own loss
ranks, members = the scored split's errors, confidence 0), no usable embedding dimensions (same).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np

DIMS: tuple[int, ...] = (2, 4, 8, 16, 32)
MIN_CLASS = 20  # held-out examples of a class needed to fit a mixture
MIN_ERRORS = 5  # held-out errors (and correct predictions) needed
MIN_SHARE = 0.02  # a failing component smaller than this share of the class is ignored
PRIOR_ITERS = 100
REFINE_ITERS = 10  # self-consistency rounds of the chosen component
REFINE_C = 1.0  # inverse L2 strength of the relabelling classifier (see _self_consistent)


@dataclass(frozen=True, eq=False)
class ClassMembership:
    """The fitted subgroup model of one class (``z`` preprocessed, see :class:`Preprocessor`)."""

    cls: int
    status: str  # "mined", "no_errors", "few_examples", "few_errors", "no_features"
    reason: str  # human-readable; names what was missing when status != "mined"
    coef: np.ndarray  # Platt-scaled logistic normal (toward the subgroup); zeros when not mined
    intercept: float  # with ``coef``: calibrated log-odds of membership at a balanced prior
    n_fit: int  # held-out examples of the class
    n_wrong: int  # held-out errors of the class
    n_members_fit: int  # held-out examples in the failing component
    dims: int  # PCA dimensions of the chosen mixture (0 when not mined)
    error_f1: float  # F1 of the group vs the errors on the held-out rows
    error_share: float  # share of held-out errors inside the group
    error_rate_in: float  # held-out error rate inside the group
    error_rate_out: float  # held-out error rate outside the group
    cv_accuracy: float  # 2-fold CV accuracy of the distilled classifier (0 when not mined)

    @property
    def mined(self) -> bool:
        return self.status == "mined"

    @property
    def confidence(self) -> float:
        return float(self.cv_accuracy * self.error_share) if self.mined else 0.0

    @property
    def direction(self) -> np.ndarray:
        """Unit vector toward the subgroup (zeros when not mined)."""
        norm = float(np.linalg.norm(self.coef))
        return self.coef / norm if norm > 0 else np.zeros_like(self.coef)

    def decision(self, z: np.ndarray) -> np.ndarray:
        """Balanced-prior log-odds of membership (> 0: subgroup side)."""
        return np.asarray(z) @ self.coef + self.intercept


@dataclass(frozen=True, eq=False)
class Scores:
    """Membership of the scored rows of one class."""

    probability: np.ndarray  # prior-corrected posterior of membership
    hardness: np.ndarray  # signed score, > 0 for members (log-odds, or -margin in fallbacks)
    members: np.ndarray  # bool
    prior: float  # estimated share of the subgroup in the scored rows


def _not_mined(
    cls: int, status: str, reason: str, dims: int, n: int, n_wrong: int
) -> ClassMembership:
    return ClassMembership(
        cls, status, reason, np.zeros(dims), 0.0, n, n_wrong, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0
    )


def _candidate(z: np.ndarray, wrong: np.ndarray, d: int, seed: int) -> np.ndarray | None:
    """Failing-component mask of the error-seeded 2-component mixture in ``d`` dimensions."""
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    x = PCA(n_components=d, random_state=seed).fit_transform(z)
    means = np.stack([x[~wrong].mean(0), x[wrong].mean(0)])
    gmm = GaussianMixture(
        2, covariance_type="full", means_init=means, reg_covar=1e-4, random_state=seed
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on small sets
        gmm.fit(x)
    hard_any = gmm.predict_proba(x) > 0.5
    rates = [wrong[hard_any[:, k]].mean() if hard_any[:, k].any() else -1.0 for k in (0, 1)]
    hard = hard_any[:, int(np.argmax(rates))]
    share = hard.mean()
    return hard if MIN_SHARE <= share <= 1 - MIN_SHARE else None


def _f1(hard: np.ndarray, wrong: np.ndarray) -> float:
    """F1 of "in the group" against "predicted wrong"."""
    precision = wrong[hard].mean() if hard.any() else 0.0
    recall = hard[wrong].mean()
    return float(2 * precision * recall / max(precision + recall, 1e-12))


def _logistic(seed: int, c: float = 1.0):  # noqa: ANN202 - sklearn estimator
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=seed)


def _calibrate(z: np.ndarray, hard: np.ndarray, seed: int) -> tuple[float, float, float]:
    """(CV balanced accuracy, slope, offset) from 2-fold out-of-fold decision values: Platt
    scaling, so the log-odds are calibrated (a regularized fit on separable data is not) and the
    offset is expressed at a balanced prior."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    if min(int(hard.sum()), int((~hard).sum())) < 2:
        return 0.0, 1.0, 0.0
    folds = StratifiedKFold(n_splits=2, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oof = cross_val_predict(_logistic(seed), z, hard, cv=folds, method="decision_function")
        platt = LogisticRegression(C=1e4, class_weight="balanced", max_iter=1000).fit(
            oof[:, None], hard
        )
    accuracy = float(balanced_accuracy_score(hard, oof > 0))
    slope = max(float(platt.coef_[0, 0]), 1e-3)  # keep the ranking's direction
    return accuracy, slope, float(platt.intercept_[0])


def _self_consistent(z: np.ndarray, hard: np.ndarray, seed: int) -> tuple[np.ndarray, int]:
    """Relabel ``hard`` by a linear classifier of itself until it is a fixed point (or
    :data:`REFINE_ITERS` rounds); a round that would leave fewer than :data:`MIN_SHARE` of the
    class on either side is not taken. Returns the labels and the rounds taken.

    Measured (``patchd bench mining``, C = 1, penultimate features): the rounds straighten a
    curved component on colored-fmnist (seed 2, "rest": train P@k 0.62 -> 1.00) but eroded a
    clean one toward its error core on sticker-fmnist (train P@k 2-4 points lower). In the
    default pooled space the components are already separated: with and without the rounds,
    train P@k 1.00 on every class of colored-fmnist, sticker-fmnist and image-csv, seeds 0-2
    (development run on the bench's recorded embeddings)."""
    n = len(hard)
    for rounds in range(REFINE_ITERS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            new = _logistic(seed, REFINE_C).fit(z, hard).decision_function(z) > 0
        if (new == hard).all() or not MIN_SHARE * n <= new.sum() <= (1 - MIN_SHARE) * n:
            return hard, rounds
        hard = new
    return hard, REFINE_ITERS


def _distil(z: np.ndarray, hard: np.ndarray, seed: int) -> tuple[np.ndarray, float, float]:
    """Step 3: (coef, intercept, CV accuracy) of the Platt-scaled balanced logistic regression
    of ``hard`` on ``z``."""
    clf = _logistic(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(z, hard)
    accuracy, slope, offset = _calibrate(z, hard, seed)
    return slope * clf.coef_[0], slope * float(clf.intercept_[0]) + offset, accuracy


def _live(z: np.ndarray) -> np.ndarray:
    """Columns of ``z`` that vary over its rows (none when it has no rows)."""
    return z.std(0) > 1e-9 if len(z) else np.zeros(int(z.shape[1]), bool)


def _widen(coef: np.ndarray, live: np.ndarray) -> np.ndarray:
    out = np.zeros(len(live))
    out[live] = coef
    return out


def transfer(
    model: ClassMembership, z: np.ndarray, members: np.ndarray, seed: int = 0
) -> ClassMembership:
    """``model``'s group re-distilled in another embedding of the same held-out rows (``z``
    preprocessed; ``members``: the group on those rows): the same subgroup, recognised in the
    space production events carry. A class that was not mined is returned with zero weights."""
    z = np.asarray(z, dtype=np.float64)
    members = np.asarray(members, dtype=bool)
    dims = int(z.shape[1])
    if not model.mined:
        return replace(model, coef=np.zeros(dims))
    live = _live(z)
    if not live.any() or min(int(members.sum()), int((~members).sum())) < 2:
        reason = f"the mined group ({int(members.sum())} of {len(members)}) cannot be re-fitted"
        return _not_mined(model.cls, "no_features", reason, dims, model.n_fit, model.n_wrong)
    coef, intercept, accuracy = _distil(z[:, live], members, seed)
    return replace(model, coef=_widen(coef, live), intercept=intercept, cv_accuracy=accuracy)


def fit_class_membership(
    cls: int, z: np.ndarray, wrong: np.ndarray, seed: int = 0, dims: tuple[int, ...] = DIMS
) -> ClassMembership:
    """The subgroup model of class ``cls`` from its held-out rows (``z`` preprocessed)."""
    wrong = np.asarray(wrong, dtype=bool)
    z = np.asarray(z, dtype=np.float64)
    if not np.isfinite(z).all():
        raise ValueError(f"class {cls}: the embeddings contain NaN or infinite values")
    full = int(z.shape[1])
    live = _live(z)  # dead / constant dimensions out
    z = z[:, live]
    n, n_wrong, width = len(wrong), int(wrong.sum()), int(z.shape[1])
    if width == 0:
        reason = f"all {full} embedding dimensions are constant on the held-out rows"
        return _not_mined(cls, "no_features", reason, full, n, n_wrong)
    if n_wrong == 0:
        reason = f"no errors among {n} held-out examples: no failing subgroup"
        return _not_mined(cls, "no_errors", reason, full, n, 0)
    if n < MIN_CLASS:
        reason = f"{n} held-out examples (< {MIN_CLASS}): too few to fit a subgroup"
        return _not_mined(cls, "few_examples", reason, full, n, n_wrong)
    if min(n_wrong, n - n_wrong) < MIN_ERRORS:
        reason = (
            f"{n_wrong} errors and {n - n_wrong} correct among {n} held-out examples "
            f"(< {MIN_ERRORS} of either): too few to fit a subgroup"
        )
        return _not_mined(cls, "few_errors", reason, full, n, n_wrong)
    best: tuple[float, int, np.ndarray] | None = None
    for d in dims:
        if d > min(width, n // 10):
            continue
        found = _candidate(z, wrong, d, seed)
        if found is None:
            continue
        key = _calibrate(z, found, seed)[0] * float(found[wrong].mean())
        if best is None or key > best[0] + 1e-9:
            best = (key, d, found)
    if best is None:
        reason = "no mixture split the class into a failing component and the rest"
        return _not_mined(cls, "few_errors", reason, full, n, n_wrong)
    _, d, hard = best
    hard, rounds = _self_consistent(z, hard, seed)
    f1 = _f1(hard, wrong)
    coef, intercept, accuracy = _distil(z, hard, seed)
    return ClassMembership(
        cls=cls,
        status="mined",
        reason=(
            f"error-seeded mixture in {d} PCA dimensions (F1 vs errors {f1:.2f}), "
            f"self-consistent after {rounds} relabelling rounds"
        ),
        coef=_widen(coef, live),
        intercept=intercept,
        n_fit=n,
        n_wrong=n_wrong,
        n_members_fit=int(hard.sum()),
        dims=d,
        error_f1=f1,
        error_share=float(hard[wrong].mean()),
        error_rate_in=float(wrong[hard].mean()),
        error_rate_out=float(wrong[~hard].mean()) if (~hard).any() else 0.0,
        cv_accuracy=accuracy,
    )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def estimate_prior(log_odds: np.ndarray, start: float = 0.5) -> float:
    """EM estimate of the member share given balanced-prior log-odds (Saerens et al. 2002)."""
    if len(log_odds) == 0:
        return 0.0
    prior = start
    for _ in range(PRIOR_ITERS):
        shift = np.log(max(prior, 1e-9) / max(1.0 - prior, 1e-9))
        new = float(_sigmoid(log_odds + shift).mean())
        if abs(new - prior) < 1e-7:
            return new
        prior = new
    return prior


def score_class(model: ClassMembership, z: np.ndarray, margin: np.ndarray) -> Scores:
    """Membership of rows of the class (``margin``: p(true) - max p(other), for fallbacks)."""
    n = len(margin)
    if model.status == "no_errors":
        zero = np.zeros(n)
        return Scores(zero, -np.abs(margin) - 1.0, np.zeros(n, bool), 0.0)
    if not model.mined:
        members = margin < 0
        return Scores(members.astype(float), -margin, members, float(members.mean()) if n else 0.0)
    log_odds = model.decision(z)
    prior = estimate_prior(log_odds)
    shift = np.log(max(prior, 1e-9) / max(1.0 - prior, 1e-9))
    posterior = _sigmoid(log_odds + shift)
    return Scores(posterior, log_odds + shift, posterior > 0.5, prior)
