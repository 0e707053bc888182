"""The labeled part of ``patchd bench monitor`` with its peers: every detector at one budget.

Same simulated stream as :mod:`patchd.bench.monitor` (2 classes x 12 groups: 24 cells + 12 pooled
rows = 36 rows, the affected group at 5% of traffic). Each detector watches all 36 rows; every
event feeds its cell's row and its group's pooled row with ``correct`` (1/0).

**One false-alarm budget for all**: each detector's threshold is set, on a calibration stream of
its own seed (``CALIBRATION_SEED``, never a delay seed), to the most sensitive value with **0 false
alarms over the stationary events** (1M by default) after the reference. patchd is also run at
its production threshold (the analytic guarantee of :mod:`patchd.monitor.sequential`).

Detectors: patchd's CUSUM (:mod:`patchd.monitor.sequential`, the in-control rate the reference's
one-sided lower bound) at its production and at the common threshold; the same charts around the
reference's point estimate (bench-only, at the common threshold); a CUSUM told the true rates
before and after the change (the oracle); river's ADWIN, Page-Hinkley, DDM and HDDM-A (bench
extra, skipped when river is missing), each fed the error indicator of every row.

Delay: labeled events of the affected group after the change until the first alarm on one of its
rows (its two cells or its pooled row), ``reps`` seeds per drop.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from patchd.bench.stream import AFFECTED, N_GROUPS, Stream, base_stream
from patchd.monitor import sequential

K = 2
ROWS = K * N_GROUPS + N_GROUPS
CALIBRATION_SEED = 1234
PRE_CHANGE = 50_000  # events between the reference and the change
MAX_AFTER = 400_000  # events after the change before a run counts as not detected


@dataclass(frozen=True)
class Labeled:
    y: np.ndarray
    g: np.ndarray
    correct: np.ndarray  # float 1/0


def draw(rng: np.random.Generator, s: Stream, n: int) -> Labeled:
    g = rng.choice(N_GROUPS, n, p=s.shares)
    y = rng.integers(0, 2, n)
    return Labeled(y, g, (rng.random(n) < s.acc[y, g]).astype(np.float64))


def rows_of(ev: Labeled) -> tuple[np.ndarray, np.ndarray]:
    """(row of each event's cell, row of its pooled group)."""
    return ev.y * N_GROUPS + ev.g, K * N_GROUPS + ev.g


def reference_counts(ev: Labeled) -> tuple[np.ndarray, np.ndarray]:
    """(n, correct) per row over the reference events."""
    cell, pooled = rows_of(ev)
    n = np.bincount(cell, minlength=ROWS) + np.bincount(pooled, minlength=ROWS)
    c = np.bincount(cell, ev.correct, minlength=ROWS) + np.bincount(
        pooled, ev.correct, minlength=ROWS
    )
    return n.astype(np.float64), c


# --- CUSUM family (vectorised; per event the in-control rate of its own cell) -------------------


@dataclass(frozen=True)
class Charts:
    """Per cell (K*G) the in-control rate and the alternatives of each chart."""

    p0: np.ndarray  # [K*G]
    alts: np.ndarray  # [C, K*G]


def patchd_charts(n: np.ndarray, c: np.ndarray, margin: float, confidence: float) -> Charts:
    """What :mod:`patchd.monitor.policy` uses: the reference's one-sided lower bound, 1/2/4 x."""
    from patchd.stats import wilson_interval

    cells = K * N_GROUPS
    p0 = np.array(
        [wilson_interval(int(c[i]), int(n[i]), 2 * confidence - 1)[0] for i in range(cells)]
    )
    p0 = np.clip(p0, 2 * sequential.P_MIN, sequential.P_MAX)
    alts = np.stack([np.maximum(p0 - m * margin, sequential.P_MIN) for m in (1.0, 2.0, 4.0)])
    return Charts(p0, alts)


def point_charts(n: np.ndarray, c: np.ndarray, margin: float) -> Charts:
    """The same charts around the reference's point estimate (no lower bound): what the
    statistic gains when the reference's uncertainty is paid in the threshold instead."""
    p0 = np.clip(
        c[: K * N_GROUPS] / np.maximum(n[: K * N_GROUPS], 1), 2 * sequential.P_MIN, sequential.P_MAX
    )
    alts = np.stack([np.maximum(p0 - m * margin, sequential.P_MIN) for m in (1.0, 2.0, 4.0)])
    return Charts(p0, alts)


def oracle_charts(s: Stream, drop: float) -> Charts:
    p0 = s.acc.reshape(-1)
    return Charts(p0, np.maximum(p0 - drop, sequential.P_MIN)[None, :])


def max_statistic(ev: Labeled, charts: Charts, rows: np.ndarray | None = None) -> np.ndarray:
    """Each row's largest CUSUM value over the events (the threshold with 0 alarms is above it)."""
    cell, pooled = rows_of(ev)
    code = ev.y * N_GROUPS + ev.g
    out = np.zeros(ROWS)
    for alt in charts.alts:
        w_ok, w_bad = sequential.llr_weights(charts.p0[code], alt[code])
        inc = np.where(ev.correct > 0, w_ok, w_bad)
        for row in range(ROWS) if rows is None else rows:
            idx = (
                np.flatnonzero(cell == row) if row < K * N_GROUPS else np.flatnonzero(pooled == row)
            )
            if len(idx):
                out[row] = max(out[row], float(sequential.lindley(0.0, inc[idx]).max()))
    return out


def first_alarm(ev: Labeled, charts: Charts, h: float, rows: list[int]) -> int | None:
    """Index (into ``ev``) of the first event whose row's CUSUM reaches ``h``, or None."""
    cell, pooled = rows_of(ev)
    code = ev.y * N_GROUPS + ev.g
    best: int | None = None
    for alt in charts.alts:
        w_ok, w_bad = sequential.llr_weights(charts.p0[code], alt[code])
        inc = np.where(ev.correct > 0, w_ok, w_bad)
        for row in rows:
            idx = np.flatnonzero((cell == row) | (pooled == row))
            hit = sequential.first_crossing(sequential.lindley(0.0, inc[idx]), h)
            if hit >= 0 and (best is None or idx[hit] < best):
                best = int(idx[hit])
    return best


# --- river's detectors ---------------------------------------------------------------------------


def river_peers() -> dict[str, tuple[Callable[[float], object], tuple[float, float], bool]]:
    """name -> (factory of a detector at parameter x, search range of x, larger x = stricter)."""
    from river import drift  # bench extra

    return {
        "river ADWIN": (lambda x: drift.ADWIN(delta=x), (1e-12, 0.5), False),
        "river Page-Hinkley": (
            lambda x: drift.PageHinkley(threshold=x, mode="up"),
            (1.0, 500.0),
            True,
        ),
        "river DDM": (lambda x: drift.binary.DDM(drift_threshold=x), (2.0, 12.0), True),
        "river HDDM-A": (
            lambda x: drift.binary.HDDMA(drift_confidence=x, two_sided_test=False),
            (1e-12, 0.1),
            False,
        ),
    }


def _river_alarms(
    factory: Callable[[float], object], x: float, ev: Labeled, warm: Labeled, rows: list[int]
) -> int | None:
    """Index of the first alarm over ``ev`` on ``rows`` after warming up on ``warm``; or None."""
    dets = {r: factory(x) for r in rows}
    for part, record in ((warm, False), (ev, True)):
        cell, pooled = rows_of(part)
        err = 1.0 - part.correct
        for i in range(len(err)):
            for r in (int(cell[i]), int(pooled[i])):
                d = dets.get(r)
                if d is None:
                    continue
                d.update(err[i])  # type: ignore[attr-defined]
                if record and d.drift_detected:  # type: ignore[attr-defined]
                    return i
    return None


def calibrate_river(
    factory: Callable[[float], object],
    bounds: tuple[float, float],
    stricter_up: bool,
    warm: Labeled,
    stationary: Labeled,
    steps: int = 7,
) -> float:
    """The most sensitive parameter with no alarm over ``stationary`` (bisection, log scale)."""
    lo, hi = (math.log(b) for b in bounds)  # search in log space
    rows = list(range(ROWS))

    def quiet(v: float) -> bool:
        return _river_alarms(factory, math.exp(v), stationary, warm, rows) is None

    strict, loose = (hi, lo) if stricter_up else (lo, hi)  # strict end assumed quiet
    for _ in range(steps):
        mid = (strict + loose) / 2
        if quiet(mid):
            strict = mid
        else:
            loose = mid
    return math.exp(strict)


def median_or_none(xs: list[int]) -> float | None:
    return statistics.median(xs) if xs else None


AFFECTED_ROWS = [AFFECTED, N_GROUPS + AFFECTED, K * N_GROUPS + AFFECTED]


@dataclass(frozen=True)
class Case:
    """One seed and drop: the reference, the stationary stretch before the change, and after."""

    stream: Stream
    reference: Labeled
    before: Labeled
    after: Labeled


def case(seed: int, drop: float, reference_window: int, after: int) -> Case:
    rng = np.random.default_rng(seed)
    s = base_stream(seed)
    ref = draw(rng, s, reference_window)
    before = draw(rng, s, PRE_CHANGE)
    bad = Stream(s.acc.copy(), s.shares)
    bad.acc[:, AFFECTED] -= drop
    return Case(s, ref, before, draw(rng, bad, after))


def concat(a: Labeled, b: Labeled) -> Labeled:
    return Labeled(*(np.concatenate((getattr(a, f), getattr(b, f))) for f in ("y", "g", "correct")))


def take(ev: Labeled, index: slice | np.ndarray) -> Labeled:
    return Labeled(ev.y[index], ev.g[index], ev.correct[index])


def group_events_until(ev: Labeled, index: int | None) -> int | None:
    """Events of the affected group among ``ev[: index + 1]`` (None: no alarm)."""
    return None if index is None else int((ev.g[: index + 1] == AFFECTED).sum())


def cusum_delay(c: Case, charts: Charts, h: float) -> tuple[int | None, int]:
    """(delay in affected-group events, 1 if it alarmed before the change else 0)."""
    fa = first_alarm(c.before, charts, h, AFFECTED_ROWS)
    if fa is None:  # the statistic runs on through the change
        hit = first_alarm(concat(c.before, c.after), charts, h, AFFECTED_ROWS)
        hit = None if hit is None else hit - len(c.before.y)
        return group_events_until(c.after, hit if hit is None or hit >= 0 else 0), 0
    return group_events_until(c.after, first_alarm(c.after, charts, h, AFFECTED_ROWS)), 1


def river_delay(factory: Callable[[float], object], x: float, c: Case) -> tuple[int | None, int]:
    warm = concat(c.reference, c.before)
    fa = _river_alarms(factory, x, c.before, c.reference, AFFECTED_ROWS)
    hit = _river_alarms(factory, x, c.after, warm, AFFECTED_ROWS)
    return group_events_until(c.after, hit), int(fa is not None)


DROPS = (0.10, 0.20, 0.40)


def _summary(runs: list[tuple[int | None, int]]) -> dict[str, object]:
    delays = [d for d, _ in runs if d is not None]
    return {
        "detected": len(delays),
        "median": statistics.median(delays) if delays else None,
        "p90": float(np.percentile(delays, 90)) if delays else None,
        "false_alarms_before_change": sum(f for _, f in runs),
    }


def peer_table(
    reps: int,
    stationary: int,
    reference_window: int,
    margin: float,
    confidence: float,
    horizon: int,
) -> dict[str, object]:
    """Every detector's delay per drop at the common budget (and patchd at its own threshold)."""
    rng = np.random.default_rng(CALIBRATION_SEED)
    s = base_stream(CALIBRATION_SEED)
    ref, stat = draw(rng, s, reference_window), draw(rng, s, stationary)
    n, c = reference_counts(ref)
    h_common = float(max_statistic(stat, patchd_charts(n, c, margin, confidence)).max()) + 1e-9
    h_prod = sequential.alarm_threshold(confidence, horizon)
    h_point = float(max_statistic(stat, point_charts(n, c, margin)).max()) + 1e-9
    params: dict[str, float] = {
        "patchd (common budget)": h_common,
        "patchd": h_prod,
        "point-estimate CUSUM (common budget)": h_point,
    }
    peers: dict[str, tuple[Callable[[float], object], float]] = {}
    try:
        for name, (factory, bounds, up) in river_peers().items():
            x = calibrate_river(factory, bounds, up, ref, stat)
            peers[name], params[name] = (factory, x), x
    except ImportError:
        pass
    table: dict[str, dict[str, object]] = {}
    for drop in DROPS:
        orc = oracle_charts(s, drop)
        h_or = float(max_statistic(stat, orc).max()) + 1e-9
        params[f"oracle CUSUM {drop:.2f}"] = h_or
        runs: dict[str, list[tuple[int | None, int]]] = {}
        for r in range(reps):
            cs = case(100 + r, drop, reference_window, 40_000)
            n2, c2 = reference_counts(cs.reference)
            charts = patchd_charts(n2, c2, margin, confidence)
            runs.setdefault("patchd", []).append(cusum_delay(cs, charts, h_prod))
            runs.setdefault("patchd (common budget)", []).append(cusum_delay(cs, charts, h_common))
            runs.setdefault("point-estimate CUSUM (common budget)", []).append(
                cusum_delay(cs, point_charts(n2, c2, margin), h_point)
            )
            runs.setdefault("oracle CUSUM", []).append(
                cusum_delay(cs, oracle_charts(cs.stream, drop), h_or)
            )
            for name, (factory, x) in peers.items():
                runs.setdefault(name, []).append(river_delay(factory, x, cs))
        table[f"{drop:.2f}"] = {name: _summary(v) for name, v in runs.items()}
    return {
        "reps": reps,
        "stationary": stationary,
        "calibration_seed": CALIBRATION_SEED,
        "parameters": params,
        "delay": table,
    }
