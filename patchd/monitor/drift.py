"""The one evidently adapter: label-free drift of each subgroup against the reference.

Signals, per subgroup: ``prediction`` (predicted-class mix, Jensen-Shannon distance),
``confidence`` (max-probability, Wasserstein distance normed by the reference's spread) and
``embedding`` (cosine distance of mean embeddings, evidently's ``DistanceDriftMethod`` called
directly, never the t-SNE report path); over all traffic, ``group_mix`` (subgroup shares,
Jensen-Shannon). Every result is marked ``label_free``: these say the inputs or the model's
behaviour moved, never what the accuracy is.

evidently is imported inside the functions (it takes seconds to import and ``patchd serve`` must
start without it); its stat-test objects are called directly, which costs milliseconds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

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


def _categorical(ref: np.ndarray, cur: np.ndarray, threshold: float) -> tuple[float, bool, str]:
    import pandas as pd
    from evidently.legacy.calculations.stattests import jensenshannon_stat_test
    from evidently.legacy.core import ColumnType

    res = jensenshannon_stat_test(pd.Series(ref), pd.Series(cur), ColumnType.Categorical, threshold)
    return float(res.drift_score), bool(res.drifted), "jensenshannon"


def _numerical(ref: np.ndarray, cur: np.ndarray, threshold: float) -> tuple[float, bool, str]:
    import pandas as pd
    from evidently.legacy.calculations.stattests import wasserstein_stat_test
    from evidently.legacy.core import ColumnType

    if np.std(ref) == 0:  # normed Wasserstein is undefined; fall back to the raw mean shift
        score = float(abs(np.mean(cur) - np.mean(ref)))
        return score, score >= threshold, "mean_shift"
    res = wasserstein_stat_test(pd.Series(ref), pd.Series(cur), ColumnType.Numerical, threshold)
    return float(res.drift_score), bool(res.drifted), "wasserstein"


def _embedding(
    ref_mean: tuple[float, ...], cur: np.ndarray, threshold: float
) -> tuple[float, bool, str]:
    import pandas as pd
    from evidently.metrics.embeddings import DistanceDriftMethod

    ref_df = pd.DataFrame([list(ref_mean)])
    cur_df = pd.DataFrame(cur.astype(np.float64))
    score, drifted, _ = DistanceDriftMethod(dist="cosine", threshold=threshold)(cur_df, ref_df)
    return float(score), bool(drifted), "cosine_distance"


def group_drift(
    profile: GroupProfile, traffic: Traffic, code: int, n_classes: int, config: MonitorConfig
) -> list[DriftResult]:
    """Prediction, confidence and embedding drift of one subgroup (those with enough data)."""
    mask = traffic.group == code
    n_cur, out = int(mask.sum()), []
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
    except (ValueError, ImportError) as err:
        log.warning("model=%s: drift computation failed: %s", ref.model, err)
    return tuple(out)
