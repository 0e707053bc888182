"""Bernoulli CUSUM: a change detector that stays valid when it is looked at after every event.

For a cell with in-control accuracy ``p0`` and the degraded alternative ``p1 = p0 - margin``, each
labeled event adds its log-likelihood ratio ``x*log(p1/p0) + (1-x)*log((1-p1)/(1-p0))`` (x = 1 if
correct) and the statistic is ``S_t = max(0, S_{t-1} + llr_t)``; the cell alarms when ``S >= h``.

Why this is valid under repeated looks: ``S_t >= h`` means that for some start k the likelihood
ratio of the events k..t exceeds ``e^h``. Under any accuracy ``p >= p0`` each such ratio is a
non-negative supermartingale with mean <= 1, so by Ville's inequality it ever crosses ``e^h`` with
probability <= ``e^-h``; a union over the at most N start points bounds the false-alarm
probability within N events by ``N e^-h``. With ``h = log(R * N / (1 - confidence))`` every look at
every one of the R statistic families (cells, pooled rows) stays within ``1 - confidence`` over a
horizon of N labeled events, however often a tick looks.

Several drop sizes at once (a multi-chart CUSUM): each row runs one chart per alternative
``p0 - m * margin`` for m in :data:`CHART_MULTIPLIERS` and alarms when any chart crosses; the union
bound adds the number of charts to R. A small drop is caught by the ``1 x margin`` chart, a large
one sooner by the ``4 x margin`` chart.

The statistic is computed for a whole batch at once with the closed form of Lindley's recursion,
``S_t = C_t - min(0, min_{k<=t} C_k)`` with ``C_t = S_0 + sum_{i<=t} llr_i``.
"""

from __future__ import annotations

import math

import numpy as np

P_MIN, P_MAX = 1e-3, 1.0 - 1e-3
CHART_MULTIPLIERS = (1.0, 2.0, 4.0)  # alternatives p0 - m * margin


def alarm_threshold(
    confidence: float, horizon_events: int, families: int = 2, charts: int = len(CHART_MULTIPLIERS)
) -> float:
    """``h`` such that P(any false alarm within ``horizon_events`` events) <= 1 - confidence.

    ``families``: statistic families each event feeds (its cell and its group's pooled row).
    """
    return math.log(families * charts * horizon_events / (1.0 - confidence))


def release_threshold(confidence: float) -> float:
    """Threshold of the recovery statistic (one SPRT-level decision at ``confidence``)."""
    return math.log(1.0 / (1.0 - confidence))


def llr_weights(p0: np.ndarray, p1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-event log-likelihood ratio of H1 (p1) to H0 (p0) for a correct / wrong event."""
    p0 = np.clip(p0, P_MIN, P_MAX)
    p1 = np.clip(p1, P_MIN, P_MAX)
    return np.log(p1 / p0), np.log((1.0 - p1) / (1.0 - p0))


def lindley(start: float, increments: np.ndarray) -> np.ndarray:
    """The CUSUM path ``S_t = max(0, S_{t-1} + x_t)`` from ``S_0 = start`` (vectorised)."""
    c = start + np.cumsum(increments)
    return c - np.minimum(0.0, np.minimum.accumulate(c))


def first_crossing(path: np.ndarray, threshold: float) -> int:
    """Index of the first value >= threshold, or -1."""
    hits = np.flatnonzero(path >= threshold)
    return int(hits[0]) if len(hits) else -1


def run_until_alarm(start: float, increments: np.ndarray, threshold: float) -> tuple[float, int]:
    """Advance a CUSUM over ``increments``; return (statistic, index of the alarm or -1).

    On an alarm the statistic returned is its value at the alarm; later increments are not used.
    """
    if len(increments) == 0:
        return start, -1
    path = lindley(start, increments)
    hit = first_crossing(path, threshold)
    return (float(path[hit]), hit) if hit >= 0 else (float(path[-1]), -1)


def run_charts_until_alarm(
    start: np.ndarray, increments: np.ndarray, threshold: float
) -> tuple[np.ndarray, int]:
    """Advance several CUSUM charts (rows of ``increments``); alarm at the first crossing of any.

    Returns the charts' statistics (at the alarm, or after the last increment) and the alarm index
    or -1.
    """
    if increments.shape[1] == 0:
        return start, -1
    paths = np.stack([lindley(s, inc) for s, inc in zip(start, increments, strict=True)])
    hits = [first_crossing(p, threshold) for p in paths]
    hit = min((h for h in hits if h >= 0), default=-1)
    return (paths[:, hit] if hit >= 0 else paths[:, -1]), hit


# --- the simulated threshold (``monitor.alarm: simulated``) ------------------------------------

SIM_REPLICATES = 32  # independent simulated stretches (each with its own draw of the rates)
SIM_MAX_EVENTS = 2_000_000  # events simulated in all; a longer horizon is extrapolated
SIM_SEED = 0
EULER = 0.5772156649015329


def simulated_threshold(
    charts: np.ndarray,
    p0: np.ndarray,
    ref_n: np.ndarray,
    ref_c: np.ndarray,
    horizon_events: int,
    confidence: float,
    replicates: int = SIM_REPLICATES,
    seed: int = SIM_SEED,
    nulls: np.ndarray | None = None,
) -> float:
    """``h`` such that no row alarms within ``horizon_events`` in-control events, with
    probability ``confidence``, under the reference's own rates and their uncertainty.

    Charts ``[C, K, G]`` test every cell (events in their cell's row and their group's pooled
    row) against ``p0 [K, G]`` (or each chart against its own null, ``nulls [C, K, G]``;
    ``p0`` is then the true rate of cells without reference counts). Each of ``replicates``
    stretches of ``m`` events (a whole horizon, or :data:`SIM_MAX_EVENTS` / ``replicates`` when
    the horizon is longer) draws every cell's true accuracy from the posterior of its reference
    counts,
    ``Beta(correct + 1, n - correct + 1)`` (the reference rate with its own uncertainty), draws
    traffic from the reference's cell shares, and records the largest statistic of any row and
    chart. The maximum of a CUSUM over a long stretch is Gumbel (Poisson clumping of its rare
    excursions): its location and scale come from the stretches' maxima (moments), and the
    horizon's quantile is
    ``location + scale * log(horizon / m) - scale * log(-log(confidence))``.

    Limits (measured): the estimate is itself random. On the bench's reference (50k events, 24
    cells) ``h`` ranged from 18.4 to 26.0 over eight simulation seeds (sd 2.7), so the seed the
    monitor uses decides part of the slack. The moments of 32 maxima see the reference's
    uncertainty only through the draws they happen to make. Where a cell's reference is small
    (hundreds of events), a posterior draw a few standard deviations below the estimate makes
    that cell's chart drift upwards and the horizon's maximum heavy-tailed, and a Gumbel fit then
    understates the quantile: on a 20k-event reference with 500-event cells, ``h`` was 17.0,
    while 20 of 300 simulated 1M-event horizons, each with one posterior draw, reached 17.0
    (7%, where 1% is claimed). ``monitor.alarm: guaranteed`` (the reference's lower bound) has
    no such limit.
    """
    k, g = p0.shape
    total = float(ref_n.sum())
    if total <= 0:
        raise ValueError("simulated_threshold needs reference counts")
    shares = (ref_n / total).reshape(-1)
    m = min(horizon_events, SIM_MAX_EVENTS // replicates)
    rng = np.random.default_rng(seed)
    flat_p0, flat_n, flat_c = p0.reshape(-1), ref_n.reshape(-1), ref_c.reshape(-1)
    chart_nulls = np.broadcast_to(p0, charts.shape) if nulls is None else nulls
    weights = [
        llr_weights(null.reshape(-1), alt.reshape(-1))
        for null, alt in zip(chart_nulls, charts, strict=True)
    ]
    maxima = []
    for _ in range(replicates):
        p_true = np.where(flat_n > 0, rng.beta(flat_c + 1.0, flat_n - flat_c + 1.0), flat_p0)
        cell = rng.choice(k * g, m, p=shares)
        correct = rng.random(m) < p_true[cell]
        rows = (*_segments(cell, k * g), *_segments(cell % g, g))
        best = 0.0
        for w_ok, w_bad in weights:
            inc = np.where(correct, w_ok[cell], w_bad[cell])
            for index in rows:
                if len(index):
                    best = max(best, float(lindley(0.0, inc[index]).max()))
        maxima.append(best)
    x = np.asarray(maxima)
    scale = max(float(x.std(ddof=1)) * math.sqrt(6.0) / math.pi, 1e-6)
    location = float(x.mean()) - EULER * scale
    stretches = max(1.0, horizon_events / m)
    return location + scale * (math.log(stretches) - math.log(-math.log(confidence)))


def _segments(code: np.ndarray, n_codes: int) -> list[np.ndarray]:
    """Event indices of each code, in event order."""
    order = np.argsort(code, kind="stable")
    bounds = np.searchsorted(code[order], np.arange(n_codes + 1))
    return [order[bounds[i] : bounds[i + 1]] for i in range(n_codes)]
