"""Failure clusters: a Dirichlet-process Gaussian mixture over the wrongly predicted examples.

As in Defuse (Slack et al.), a truncated stick-breaking DP mixture (sklearn
``BayesianGaussianMixture(weight_concentration_prior_type="dirichlet_process")``) decides how many
failure regions there are; components that keep less than ``min_weight`` of the examples are
dropped. The preprocessed embeddings are first reduced by PCA (diagonal covariances in a few
dimensions are stable with a few dozen points; full covariances in 512-d are not).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

MIN_EXAMPLES = 6  # fewer wrong examples: one cluster, no mixture


@dataclass(frozen=True)
class ClusterFit:
    labels: np.ndarray  # cluster index per wrong example (0..k-1, by decreasing size)
    weights: tuple[float, ...]  # share of the wrong examples per cluster


def dp_clusters(
    z: np.ndarray,
    seed: int = 0,
    max_components: int = 10,
    min_weight: float = 0.05,
    max_dims: int = 8,
) -> ClusterFit:
    """Cluster the rows of ``z`` with a DP-GMM; tiny clusters are merged into their nearest."""
    n = len(z)
    if n == 0:
        return ClusterFit(np.zeros(0, np.int64), ())
    if n < MIN_EXAMPLES:
        return ClusterFit(np.zeros(n, np.int64), (1.0,))
    from sklearn.decomposition import PCA
    from sklearn.mixture import BayesianGaussianMixture

    dims = max(1, min(max_dims, z.shape[1], n - 1))
    reduced = PCA(n_components=dims, random_state=seed).fit_transform(z)
    gmm = BayesianGaussianMixture(
        n_components=min(max_components, n),
        weight_concentration_prior_type="dirichlet_process",
        covariance_type="diag",
        max_iter=500,
        reg_covar=1e-4,
        random_state=seed,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on tiny sets
        gmm.fit(reduced)
    keep = np.flatnonzero(gmm.weights_ >= min_weight)
    if len(keep) == 0:
        keep = np.array([int(np.argmax(gmm.weights_))])
    resp = gmm.predict_proba(reduced)[:, keep]
    return _relabel(keep[np.argmax(resp, axis=1)])


def _relabel(raw: np.ndarray) -> ClusterFit:
    """Renumber clusters 0..k-1 by decreasing size."""
    ids, counts = np.unique(raw, return_counts=True)
    order = ids[np.argsort(-counts, kind="stable")]
    mapping = {int(old): new for new, old in enumerate(order)}
    labels = np.array([mapping[int(v)] for v in raw], dtype=np.int64)
    sizes = np.bincount(labels, minlength=len(order))
    return ClusterFit(labels, tuple(float(s) / len(labels) for s in sizes))
