"""The label-free part of ``patchd bench monitor``: per-group accuracy estimates beside CBPE.

A simulated shortcut-taking classifier (fixed seeds), 2 classes x 2 colours. Colour is the
subgroup every event carries; the model leans on colour (logit ``2 colour + 1.5 shape + noise``),
so the aligned cells sit at about 0.99 and the minority colour of each class at about 0.36, the
wrong ones confidently. Each event's embedding is a random linear image of (the class's shape
as the backbone sees it, colour, the noisy shape evidence the head uses) plus noise in 16
dimensions: the backbone knows the class, the head takes the shortcut; the confidence is the
softmax of the logit.

Reference: 20,000 labeled events with the minority colour at 2% of each class. Then 30,000
events of one of four scenarios, cut into chunks of :data:`CHUNK` events *of each group*:

- ``stationary``: the reference distribution;
- ``mix``: a label-preserving subgroup-mix shift: class 0's minority colour (green) goes from 2%
  to 50% of class 0's traffic; every (class, colour) cell keeps its accuracy, the green group's
  accuracy falls (its class mix changes);
- ``corruption``: green images lose contrast (the colour signal falls to a quarter, the shape
  evidence the head reads gets noisier): the green group's accuracy falls;
- ``concept``: half of the green images' labels change meaning (no label-free method can see it;
  the estimate must say it is unreliable once labels arrive).

Methods, each fitted on the same reference per group and run on the same chunks: patchd's
estimator (:mod:`patchd.monitor.estimate`, cell = predicted class x colour, features: confidence
and embedding), the same estimator on the confidence score alone, and NannyML's CBPE (bench extra;
skipped with a note when it is not installed). Measured per group row: MAE of the estimate
against the chunk's realized accuracy, coverage of the realized accuracy by the interval (CBPE:
its confidence band), chunks marked unreliable.

Delay (a separate stream, 12 colour-like groups, the affected one at 5% of traffic): events of the
affected group until the "estimated degraded" state after a 20-point corruption-like drop, with
the estimate over the newest ``drift_window`` predictions, against the labeled alert's delay plus
a label lag of 1,000 events of the group.
"""

from __future__ import annotations

import logging
import os
import statistics
import warnings
from dataclasses import dataclass

import numpy as np

from patchd.monitor import estimate as est

CHUNK = 500
CORRUPTION_NOISE = 1.5  # extra shape noise on green images: a drop of about 20 points
REFERENCE = 20_000
AFTER = 30_000
DIM = 16
CONFIDENCE = 0.99  # monitor.confidence's default
SCENARIOS = ("stationary", "mix", "corruption", "concept")
GROUP_NAMES = ["colour=red", "colour=green"]
CLASS_NAMES = ["0", "1"]


@dataclass(frozen=True)
class Events:
    y: np.ndarray  # the label as it arrives (after any concept shift)
    pred: np.ndarray
    conf: np.ndarray  # confidence of the predicted class
    p1: np.ndarray  # probability of class 1 (what CBPE reads)
    group: np.ndarray  # 0 red, 1 green
    emb: np.ndarray  # [n, DIM]


def simulate(rng: np.random.Generator, n: int, scenario: str, lens: np.ndarray) -> Events:
    y = rng.integers(0, 2, n)
    p_green = np.array([0.5 if scenario == "mix" else 0.02, 0.98])
    green = rng.random(n) < p_green[y]
    colour = np.where(green, 1.0, -1.0)
    shape = np.where(y == 1, 1.0, -1.0) + rng.normal(0, 1.0, n)
    if scenario == "corruption":  # green images lose contrast: fainter colour, noisier shape
        colour = np.where(green, 0.25, colour)
        shape = np.where(green, shape + rng.normal(0, CORRUPTION_NOISE, n), shape)
    logit = 2.0 * colour + 1.5 * shape + rng.normal(0, 0.5, n)
    pred = (logit > 0).astype(np.int64)
    p1 = 1.0 / (1.0 + np.exp(-logit))
    ink = np.where(y == 1, 1.0, -1.0) + rng.normal(0, 0.25, n)  # what the embedding knows
    emb = np.stack([ink, colour, shape], axis=1) @ lens + rng.normal(0, 0.3, (n, DIM))
    label = y.copy()
    if scenario == "concept":
        flip = green & (rng.random(n) < 0.5)
        label = np.where(flip, 1 - y, y)
    return Events(label, pred, np.maximum(p1, 1 - p1), p1, green.astype(np.int64), emb)


def _take(e: Events, m: np.ndarray) -> Events:
    return Events(e.y[m], e.pred[m], e.conf[m], e.p1[m], e.group[m], e.emb[m])


def _traffic(e: Events, labeled: bool) -> est.Batch:
    label = e.y if labeled else np.full(len(e.y), -1)
    return est.Batch(e.pred, e.conf, e.group, label, e.emb)


@dataclass(frozen=True)
class Row:
    scenario: str
    method: str
    group: str
    chunks: int
    true_before: float
    true_after: float
    estimate_after: float
    mae: float
    coverage: float
    unreliable: int  # chunks marked unreliable


def _score(scenario: str, method: str, group: str, truth, value, low, high, flag) -> Row:  # noqa: ANN001
    t, v = np.asarray(truth), np.asarray(value)
    lo, hi = np.asarray(low), np.asarray(high)
    return Row(
        scenario,
        method,
        group,
        len(t),
        float("nan"),
        float(t.mean()),
        float(v.mean()),
        float(np.abs(t - v).mean()),
        float(((t >= lo) & (t <= hi)).mean()),
        int(np.sum(flag)),
    )


def _chunks(e: Events, group: int) -> list[Events]:
    idx = np.flatnonzero(e.group == group)
    return [_take(e, idx[i : i + CHUNK]) for i in range(0, len(idx) - CHUNK + 1, CHUNK)]


def _ours(
    ref: Events, chunks: list[Events], use_embedding: bool, labeled: bool
) -> tuple[list[float], list[float], list[float], list[bool]]:
    fit = est.Estimator.fit(
        ref.pred, ref.y, ref.conf, ref.group, ref.emb, 2, use_embedding=use_embedding
    )
    v, lo, hi, flag = [], [], [], []
    for c in chunks:
        rows = fit.estimate(_traffic(c, labeled), CLASS_NAMES, GROUP_NAMES, CONFIDENCE)
        pooled = next(r for r in rows if r.cls == "*")
        v.append(pooled.accuracy)
        lo.append(pooled.ci_low)
        hi.append(pooled.ci_high)
        flag.append(not pooled.reliable)
    return v, lo, hi, flag


def _cbpe(ref: Events, chunks: list[Events]) -> tuple[list[float], list[float], list[float]] | None:
    try:
        os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")  # no phoning home
        import nannyml as nml  # bench extra
        import pandas as pd
    except ImportError:
        return None
    logging.getLogger("nannyml").setLevel(logging.ERROR)

    def frame(e: Events) -> pd.DataFrame:
        return pd.DataFrame({"p1": e.p1, "pred": e.pred, "y": e.y})

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cbpe = nml.CBPE(
            problem_type="classification_binary",
            y_pred_proba="p1",
            y_pred="pred",
            y_true="y",
            metrics=["accuracy"],
            chunk_size=CHUNK,
        )
        cbpe.fit(frame(ref))
        v, lo, hi = [], [], []
        for c in chunks:
            df = cbpe.estimate(frame(c)).filter(period="analysis").to_df()
            v.append(float(df[("accuracy", "value")].iloc[0]))
            lo.append(float(df[("accuracy", "lower_confidence_boundary")].fillna(0).iloc[0]))
            hi.append(float(df[("accuracy", "upper_confidence_boundary")].fillna(1).iloc[0]))
    return v, lo, hi


def scenario_rows(scenario: str, seed: int = 7) -> list[Row]:
    rng = np.random.default_rng(seed)
    lens = rng.normal(0, 1, (3, DIM))
    ref = simulate(rng, REFERENCE, "stationary", lens)
    after = simulate(rng, AFTER, scenario, lens)
    out: list[Row] = []
    for gi, gname in enumerate(GROUP_NAMES):
        chunks = _chunks(after, gi)
        truth = [float((c.pred == c.y).mean()) for c in chunks]
        before = float((ref.pred[ref.group == gi] == ref.y[ref.group == gi]).mean())
        ref_g = _take(ref, ref.group == gi)
        methods: list[tuple[str, tuple]] = [
            ("patchd (cell + embedding)", _ours(ref_g, chunks, True, labeled=False)),
            ("patchd, labels arrived", _ours(ref_g, chunks, True, labeled=True)),
            ("confidence only (cell)", _ours(ref_g, chunks, False, labeled=False)),
        ]
        cb = _cbpe(ref_g, chunks)
        if cb is not None:
            methods.append(("NannyML CBPE", (*cb, [False] * len(chunks))))
        for name, (v, lo, hi, flag) in methods:
            row = _score(scenario, name, gname, truth, v, lo, hi, flag)
            out.append(Row(**{**row.__dict__, "true_before": before}))
    return out


def all_rows(seed: int = 7) -> list[dict[str, object]]:
    return [r.__dict__ for s in SCENARIOS for r in scenario_rows(s, seed)]


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


SHARE = 0.05  # the affected group's share of traffic in the delay stream
TICK = 500  # events per tick
LABEL_LAG = 1000  # events of the group between a prediction and its label


def _mixed(rng: np.random.Generator, n: int, scenario: str, lens: np.ndarray) -> Events:
    """``n`` events with green (the affected group) at :data:`SHARE` of traffic."""
    red = _take(s := simulate(rng, 2 * n, "stationary", lens), s.group == 0)
    green_pool = simulate(rng, int(4 * n * SHARE) + 100, scenario, lens)
    green = _take(green_pool, green_pool.group == 1)
    pick = rng.random(n) < SHARE
    pick[np.flatnonzero(pick)[len(green.y) :]] = False
    n_red = int((~pick).sum())
    out = []
    for f in _F:
        r, g = getattr(red, f), getattr(green, f)
        col = np.empty((n, *r.shape[1:]), r.dtype)
        col[pick], col[~pick] = g[: int(pick.sum())], r[:n_red]
        out.append(col)
    return Events(*out)


def estimated_delay(
    seed: int, window: int = 5000, margin: float = 0.10, n_min: int = 30
) -> tuple[int | None, int, float, int | None]:
    """(green events after the change until "estimated degraded" or None, false alarms on the
    unchanged red group over the whole run and on green before the change, green's true drop,
    green events after the change until its estimate is first marked unreliable or None).

    The estimate is over the newest ``window`` predictions (``monitor.drift_window``), re-run
    every :data:`TICK` events, as serve's tick does."""
    rng = np.random.default_rng(seed)
    lens = rng.normal(0, 1, (3, DIM))
    ref = _mixed(rng, REFERENCE * 2, "stationary", lens)
    fit = est.Estimator.fit(ref.pred, ref.y, ref.conf, ref.group, ref.emb, 2)
    before = _mixed(rng, 20_000, "stationary", lens)
    after = _mixed(rng, 40_000, "corruption", lens)
    stream = Events(*(np.concatenate((getattr(before, f), getattr(after, f))) for f in _F))
    change = len(before.y)
    state = {0: False, 1: False}
    false_alarms, delay, flagged = 0, None, None
    for end in range(window, len(stream.y) + 1, TICK):
        chunk = _take(stream, slice(end - window, end))  # type: ignore[arg-type]
        rows = fit.estimate(_traffic(chunk, False), CLASS_NAMES, GROUP_NAMES, CONFIDENCE)
        for e in rows:
            if e.cls != "*":
                continue
            gi = GROUP_NAMES.index(e.group)
            if gi == 1 and end > change and not e.reliable and flagged is None:
                flagged = int((stream.group[change:end] == 1).sum())
            was, state[gi] = state[gi], est.estimated_degraded(e, margin, n_min, state[gi])
            if state[gi] and not was:
                if gi == 0 or end <= change:
                    false_alarms += 1
                elif delay is None:
                    delay = int((stream.group[change:end] == 1).sum())
    g = after.group == 1
    drop = float((ref.pred[ref.group == 1] == ref.y[ref.group == 1]).mean()) - float(
        (after.pred[g] == after.y[g]).mean()
    )
    return delay, false_alarms, drop, flagged


_F = ("y", "pred", "conf", "p1", "group", "emb")
