"""The drift signals on small frames, and their agreement with evidently's definitions.

The agreement tests need the ``patchd[evidently]`` extra (in ``dev``) and are skipped without it.
"""

from __future__ import annotations

import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from patchd.monitor import drift
from patchd.monitor.drift import (
    all_drift,
    group_drift,
    js_distance,
    mean_cosine_distance,
    wasserstein_normed,
)
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


# --- the numpy/scipy distances on hand-computed cases ---------------------------------------


def test_js_distance_known_values() -> None:
    a = np.array([0, 0, 1, 1])
    assert js_distance(a, a[::-1]) == 0.0
    assert js_distance(np.zeros(5, np.int64), np.ones(7, np.int64)) == pytest.approx(
        math.sqrt(math.log(2))
    )
    # p = (1, 0), q = (1/2, 1/2): m = (3/4, 1/4)
    p_m = math.log(4 / 3)
    q_m = 0.5 * math.log(2 / 3) + 0.5 * math.log(2)
    expect = math.sqrt((p_m + q_m) / 2)
    assert js_distance(np.zeros(4, np.int64), a) == pytest.approx(expect, abs=1e-12)
    # symmetric, and blind to how the categories are coded
    assert js_distance(a, np.zeros(4, np.int64)) == pytest.approx(expect, abs=1e-12)
    assert js_distance(np.full(4, 7), a + 7) == pytest.approx(expect, abs=1e-12)


def test_js_distance_ignores_nan_values_but_counts_them_in_the_length() -> None:
    # evidently: value_counts() drops NaN, the percentages divide by len(series)
    ref = np.array([0.0, 1.0, np.nan, np.nan])
    cur = np.array([0.0, 1.0])
    assert js_distance(ref, cur) == pytest.approx(0.0, abs=1e-12)


def test_wasserstein_normed_is_the_shift_in_reference_stds() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(0.8, 0.05, 2000)
    assert wasserstein_normed(ref, ref + 0.02) == pytest.approx(0.02 / np.std(ref), rel=1e-9)
    assert wasserstein_normed(ref, ref) == 0.0
    # the reference's std is floored at 0.001
    tiny = np.array([0.5, 0.5 + 1e-6])
    assert wasserstein_normed(tiny, tiny + 0.01) == pytest.approx(0.01 / 0.001, rel=1e-6)


def test_mean_cosine_distance_compares_mean_rows() -> None:
    x = np.array([[1.0, 0.0], [3.0, 0.0]])
    assert mean_cosine_distance(x, x * 5) == pytest.approx(0.0, abs=1e-12)
    assert mean_cosine_distance(x, -x) == pytest.approx(2.0)
    assert mean_cosine_distance(np.array([2.0, 0.0]), np.array([[0.0, 1.0], [0.0, 3.0]])) == 1.0
    f32 = np.array([[1, 2], [3, 4]], np.float32)
    assert mean_cosine_distance(f32, f32.astype(np.float64)) == pytest.approx(0.0, abs=1e-12)


def test_thresholds_follow_evidently() -> None:
    # distance tests drift at score >= threshold; the embedding distance at score > threshold
    a, b = np.zeros(4, np.int64), np.array([0, 0, 1, 1])
    score = js_distance(a, b)
    assert drift._categorical(a, b, score)[1]
    assert not drift._categorical(a, b, score + 1e-12)[1]
    ref, cur = np.array([0.0, 1.0]), np.array([[1.0, 1.0]])
    score = mean_cosine_distance(ref, cur)
    assert not drift._embedding((0.0, 1.0), cur, score)[1]
    assert drift._embedding((0.0, 1.0), cur, score - 1e-12)[1]


def test_constant_reference_confidence_falls_back_to_mean_shift() -> None:
    score, drifted, method = drift._numerical(np.full(100, 0.5), np.full(100, 0.75), 0.1)
    assert method == "mean_shift" and drifted and score == pytest.approx(0.25)


def test_drift_pass_imports_neither_evidently_nor_pandas() -> None:
    code = (
        "import sys, numpy as np\n"
        "from patchd.monitor import drift\n"
        "r = np.random.default_rng(0)\n"
        "drift._categorical(r.integers(0, 3, 100), r.integers(0, 3, 100), 0.1)\n"
        "drift._numerical(r.random(100), r.random(100), 0.1)\n"
        "drift._embedding((1.0, 2.0), r.random((10, 2)), 0.1)\n"
        "bad = [m for m in ('evidently', 'pandas', 'sklearn', 'torch') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# --- agreement with evidently (the definitions the numpy code replaces) ----------------------

SEEDS = range(8)


@pytest.fixture(scope="module")
def ev() -> SimpleNamespace:
    try:
        import pandas as pd
        from evidently.legacy.calculations.stattests import (
            jensenshannon_stat_test,
            wasserstein_stat_test,
        )
        from evidently.legacy.core import ColumnType
        from evidently.metrics.embeddings import DistanceDriftMethod
    except ImportError as err:
        pytest.skip(f"evidently not importable (install patchd[evidently]): {err}")
    return SimpleNamespace(
        pd=pd,
        js=jensenshannon_stat_test,
        ws=wasserstein_stat_test,
        ColumnType=ColumnType,
        DistanceDriftMethod=DistanceDriftMethod,
    )


def _categorical_pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 40))
    p, q = rng.dirichlet(np.full(k, 0.5)), rng.dirichlet(np.full(k, 0.5))
    ref = rng.choice(k, int(rng.integers(50, 5000)), p=p)
    cur = rng.choice(k, int(rng.integers(50, 3000)), p=q)
    if seed % 2:  # a class the reference never saw, one the current lacks
        cur[: 1 + seed] = k + 3
        ref = ref[ref != 0]
    return ref, cur


@pytest.mark.parametrize("seed", SEEDS)
def test_js_distance_agrees_with_evidently(ev: SimpleNamespace, seed: int) -> None:
    ref, cur = _categorical_pair(seed)
    for thr in (0.01, 0.1, 0.3):
        res = ev.js(ev.pd.Series(ref), ev.pd.Series(cur), ev.ColumnType.Categorical, thr)
        score, drifted, _ = drift._categorical(ref, cur, thr)
        assert abs(score - float(res.drift_score)) <= 1e-9
        assert drifted == bool(res.drifted)


def test_js_distance_agrees_with_evidently_on_group_mix_samples(ev: SimpleNamespace) -> None:
    rng = np.random.default_rng(11)
    for n_groups in (2, 3, 12):
        ref = drift._expand(rng.dirichlet(np.ones(n_groups)), 20000)
        cur = rng.integers(0, n_groups, 1000)
        res = ev.js(ev.pd.Series(ref), ev.pd.Series(cur), ev.ColumnType.Categorical, 0.1)
        assert abs(js_distance(ref, cur) - float(res.drift_score)) <= 1e-9


@pytest.mark.parametrize("seed", SEEDS)
def test_wasserstein_normed_agrees_with_evidently(ev: SimpleNamespace, seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n_ref, n_cur = int(rng.integers(50, 5000)), int(rng.integers(50, 3000))
    spread = (0.05, 0.2, 1e-4, 3.0)[seed % 4]  # 1e-4: the 0.001 floor on the norm applies
    ref = np.clip(rng.normal(0.8, spread, n_ref), 0, None)
    cur = np.clip(
        rng.normal(0.8 - rng.random() * 0.3, spread * (0.5 + rng.random()), n_cur), 0, None
    )
    if seed % 3 == 0:  # ties, as confidences rounded by a client would have
        ref, cur = np.round(ref, 2), np.round(cur, 2)
    for thr in (0.05, 0.1, 1.0):
        res = ev.ws(ev.pd.Series(ref), ev.pd.Series(cur), ev.ColumnType.Numerical, thr)
        score, drifted, method = drift._numerical(ref, cur, thr)
        assert method == "wasserstein"
        assert abs(score - float(res.drift_score)) <= 1e-9 * max(1.0, abs(float(res.drift_score)))
        assert drifted == bool(res.drifted)


@pytest.mark.parametrize("seed", SEEDS)
def test_mean_cosine_distance_agrees_with_evidently(ev: SimpleNamespace, seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    dim = int(rng.choice([2, 8, 64, 512]))
    ref = rng.normal(0, 1, (int(rng.integers(50, 2000)), dim)) + rng.normal(0, 1, dim)
    cur = (rng.normal(0, 1, (int(rng.integers(50, 2000)), dim)) + rng.normal(0, 1, dim)).astype(
        np.float32
    )
    ref_mean = tuple(float(x) for x in ref.mean(axis=0))
    for thr in (0.01, 0.2, 1.0):
        method = ev.DistanceDriftMethod(dist="cosine", threshold=thr)
        ev_score, ev_drifted, _ = method(
            ev.pd.DataFrame(cur.astype(np.float64)), ev.pd.DataFrame([list(ref_mean)])
        )
        score, drifted, _ = drift._embedding(ref_mean, cur, thr)
        assert abs(score - float(ev_score)) <= 1e-9
        assert drifted == bool(ev_drifted)
        # and on the raw reference rows, as DistanceDriftMethod would see a full reference frame
        ev_raw, _, _ = method(ev.pd.DataFrame(cur.astype(np.float64)), ev.pd.DataFrame(ref))
        assert abs(mean_cosine_distance(ref, cur) - float(ev_raw)) <= 1e-9
