"""The evidently adapter on small frames (direct stat-test and drift-method calls)."""

from __future__ import annotations

import numpy as np

from patchd.monitor.drift import all_drift, group_drift
from patchd.monitor.reference import GroupProfile, Reference
from patchd.monitor.window import Traffic
from tests.unit.monitor_helpers import monitor_config

CFG = monitor_config(drift_min_samples=50, drift_threshold=0.1).monitor


def traffic(
    rng: np.random.Generator, n: int, p1: float, conf_mean: float, emb_shift: float
) -> Traffic:
    group = np.zeros(n, np.int64)
    emb = rng.normal(0, 1, (n, 8)).astype(np.float32) + np.float32(emb_shift)
    emb[:, 0] += 3
    pred = (rng.random(n) < p1).astype(np.int64)
    conf = np.clip(rng.normal(conf_mean, 0.05, n), 0, 1)
    return Traffic(pred, conf, group, emb, group)


def profile(rng: np.random.Generator) -> GroupProfile:
    ref = traffic(rng, 2000, 0.5, 0.85, 0.0)
    mean = tuple(float(x) for x in ref.embedding.mean(axis=0))
    return GroupProfile(
        "site=A", 2000, 1.0, (0.5, 0.5), tuple(float(c) for c in ref.confidence), mean
    )


def by_feature(results: list) -> dict[str, object]:
    return {r.feature: r for r in results}


def test_same_distribution_does_not_drift() -> None:
    rng = np.random.default_rng(0)
    res = by_feature(group_drift(profile(rng), traffic(rng, 1000, 0.5, 0.85, 0.0), 0, 2, CFG))
    assert set(res) == {"prediction", "confidence", "embedding"}
    assert not any(r.drifted for r in res.values())
    assert all(r.label_free for r in res.values())


def test_shifted_predictions_confidences_and_embeddings_drift() -> None:
    rng = np.random.default_rng(1)
    res = by_feature(group_drift(profile(rng), traffic(rng, 1000, 0.9, 0.6, -2.0), 0, 2, CFG))
    assert res["prediction"].drifted and res["prediction"].method == "jensenshannon"
    assert res["confidence"].drifted and res["confidence"].method == "wasserstein"
    assert res["embedding"].drifted and res["embedding"].method == "cosine_distance"


def test_too_few_events_are_not_tested() -> None:
    rng = np.random.default_rng(2)
    assert group_drift(profile(rng), traffic(rng, 20, 0.9, 0.6, -2.0), 0, 2, CFG) == []


def test_group_mix_drift_over_all_traffic() -> None:
    rng = np.random.default_rng(3)
    profiles = (
        GroupProfile("site=A", 900, 0.9, (0.5, 0.5), ()),
        GroupProfile("site=B", 100, 0.1, (0.5, 0.5), ()),
    )
    ref = Reference("m", "window", 0.0, 0.0, (), profiles)
    z = np.zeros(1000, np.int64)
    same = Traffic(z, np.full(1000, np.nan), (rng.random(1000) < 0.1).astype(np.int64), None, None)
    shifted = Traffic(
        z, np.full(1000, np.nan), (rng.random(1000) < 0.5).astype(np.int64), None, None
    )
    names = ["site=A", "site=B"]
    mix = [r for r in all_drift(ref, same, names, 2, CFG) if r.feature == "group_mix"]
    assert mix and not mix[0].drifted and mix[0].group == "*"
    mix = [r for r in all_drift(ref, shifted, names, 2, CFG) if r.feature == "group_mix"]
    assert mix[0].drifted
