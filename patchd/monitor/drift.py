"""Label-free drift of each subgroup against the reference, in numpy/scipy.

Signals, per subgroup: ``prediction`` (predicted-class mix, Jensen-Shannon distance),
``confidence`` (max-probability, Wasserstein distance normed by the reference's spread) and
``embedding`` (cosine distance of mean embeddings); over all traffic, ``group_mix`` (subgroup
shares, Jensen-Shannon). Every result is marked ``label_free``: these say the inputs or the model's
behaviour moved, never what the accuracy is.

The three distances are evidently's (0.7.x) definitions, reimplemented on the scipy primitives
evidently itself calls, so the core install needs neither evidently nor pandas:

- :func:`js_distance` is ``jensenshannon_stat_test`` on a categorical column
  (``get_binned_data(..., feel_zeroes=False)``: per-value counts over the union of the non-NaN
  values of both samples, divided by each sample's length; natural-log ``jensenshannon``).
- :func:`wasserstein_normed` is ``wasserstein_stat_test``: ``wasserstein_distance(ref, cur)``
  divided by ``max(std(ref), 0.001)`` (population std).
- :func:`mean_cosine_distance` is ``DistanceDriftMethod(dist="cosine")`` without bootstrap or PCA:
  the cosine distance of the two mean embeddings.

Drift is ``score >= threshold`` for the first two and ``score > threshold`` for the embedding, as
in evidently. ``tests/unit/test_monitor_drift.py`` checks the three against evidently to 1e-9 when
the ``patchd[evidently]`` extra is installed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.spatial.distance import cosine, jensenshannon
from scipy.stats import wasserstein_distance

from patchd.config import MonitorConfig
from patchd.monitor.groups import ALL
from patchd.monitor.reference import GroupProfile, Reference
from patchd.monitor.window import Traffic

log = logging.getLogger(__name__)

FEATURES = ("prediction", "confidence", "embedding", "group_mix")


@dataclass(frozen=True)
class DriftResult:
    group: str  # "*" for group_mix
    feature: str
    score: float
    drifted: bool
    method: str
    n_reference: int
    n_current: int
    label_free: bool = True


def _expand(mix: tuple[float, ...] | np.ndarray, n: int) -> np.ndarray:
    """A categorical sample with the given distribution (for tests that take samples)."""
    counts = np.round(np.asarray(mix, dtype=float) * n).astype(int)
    return np.repeat(np.arange(len(counts)), counts)


def js_distance(ref: np.ndarray, cur: np.ndarray) -> float:
    """Jensen-Shannon distance (natural log) of two categorical samples' value frequencies."""
    ref, cur = np.asarray(ref).ravel(), np.asarray(cur).ravel()
    ref_ok, cur_ok = ref[~_isnan(ref)], cur[~_isnan(cur)]
    keys, codes = np.unique(np.concatenate([ref_ok, cur_ok]), return_inverse=True)
    ref_counts = np.bincount(codes[: len(ref_ok)], minlength=len(keys))
    cur_counts = np.bincount(codes[len(ref_ok) :], minlength=len(keys))
    return float(jensenshannon(ref_counts / len(ref), cur_counts / len(cur)))


def wasserstein_normed(ref: np.ndarray, cur: np.ndarray) -> float:
    """1-D Wasserstein distance divided by the reference's std (floored at 0.001)."""
    norm = max(float(np.std(ref)), 0.001)
    return float(wasserstein_distance(ref, cur)) / norm


def mean_cosine_distance(ref: np.ndarray, cur: np.ndarray) -> float:
    """Cosine distance of the mean rows of two embedding matrices (one row per sample)."""
    ref_mean = np.atleast_2d(np.asarray(ref, dtype=np.float64)).mean(axis=0)
    cur_mean = np.atleast_2d(np.asarray(cur, dtype=np.float64)).mean(axis=0)
    return float(cosine(ref_mean, cur_mean))


def _isnan(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in "fc":
        return np.isnan(values)
    return np.zeros(values.shape, dtype=bool)


def _categorical(ref: np.ndarray, cur: np.ndarray, threshold: float) -> tuple[float, bool, str]:
    score = js_distance(ref, cur)
    return score, score >= threshold, "jensenshannon"


def _numerical(ref: np.ndarray, cur: np.ndarray, threshold: float) -> tuple[float, bool, str]:
    if np.std(ref) == 0:  # normed Wasserstein is undefined; fall back to the raw mean shift
        score = float(abs(np.mean(cur) - np.mean(ref)))
        return score, score >= threshold, "mean_shift"
    score = wasserstein_normed(ref, cur)
    return score, score >= threshold, "wasserstein"


def _embedding(
    ref_mean: tuple[float, ...], cur: np.ndarray, threshold: float
) -> tuple[float, bool, str]:
    score = mean_cosine_distance(np.asarray(ref_mean), cur)
    return score, score > threshold, "cosine_distance"


def group_drift(
    profile: GroupProfile, traffic: Traffic, code: int, n_classes: int, config: MonitorConfig
) -> list[DriftResult]:
    """Prediction, confidence and embedding drift of one subgroup (those with enough data)."""
    mask = traffic.group == code
    n_cur = int(mask.sum())
    out: list[DriftResult] = []
    if n_cur < config.drift_min_samples or profile.n < config.drift_min_samples:
        return out
    thr, g = config.drift_threshold, profile.group
    ref_pred = _expand(profile.pred_mix, min(profile.n, 5000))
    out.append(
        DriftResult(
            g, "prediction", *_categorical(ref_pred, traffic.pred[mask], thr), profile.n, n_cur
        )
    )
    conf = traffic.confidence[mask]
    conf = conf[~np.isnan(conf)]
    if (
        len(conf) >= config.drift_min_samples
        and len(profile.confidence) >= config.drift_min_samples
    ):
        ref_conf = np.asarray(profile.confidence)
        out.append(
            DriftResult(g, "confidence", *_numerical(ref_conf, conf, thr), len(ref_conf), len(conf))
        )
    if profile.embedding_mean is not None and traffic.embedding is not None:
        rows = traffic.embedding[traffic.embedding_group == code]
        if len(rows) >= config.drift_min_samples and rows.shape[1] == len(profile.embedding_mean):
            out.append(
                DriftResult(
                    g,
                    "embedding",
                    *_embedding(profile.embedding_mean, rows, thr),
                    profile.n,
                    len(rows),
                )
            )
    return out


def mix_drift(
    ref: Reference, traffic: Traffic, group_names: list[str], config: MonitorConfig
) -> DriftResult | None:
    """Drift of the subgroup shares of all traffic (group ``"*"``)."""
    if len(traffic) < config.drift_min_samples or not ref.profiles:
        return None
    n_ref = sum(p.n for p in ref.profiles)
    shares = np.zeros(len(group_names))
    for p in ref.profiles:
        shares[group_names.index(p.group)] = p.share
    ref_sample = _expand(shares, min(n_ref, 20000))
    score, drifted, method = _categorical(ref_sample, traffic.group, config.drift_threshold)
    return DriftResult(ALL, "group_mix", score, drifted, method, n_ref, len(traffic))


def all_drift(
    ref: Reference, traffic: Traffic, group_names: list[str], n_classes: int, config: MonitorConfig
) -> tuple[DriftResult, ...]:
    """Every drift signal the reference and the traffic allow; failures are logged, not raised."""
    out: list[DriftResult] = []
    try:
        for code, name in enumerate(group_names):
            profile = ref.profile(name)
            if profile is not None:
                out.extend(group_drift(profile, traffic, code, n_classes, config))
        mix = mix_drift(ref, traffic, group_names, config)
        if mix is not None:
            out.append(mix)
    except ValueError as err:
        log.warning("model=%s: drift computation failed: %s", ref.model, err)
    return tuple(out)
