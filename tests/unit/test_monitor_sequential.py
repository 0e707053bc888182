"""The sequential test: exact recursion, false alarms under looks every tick, detection delay."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from patchd.monitor import sequential
from patchd.monitor.cells import window_stats
from patchd.monitor.engine import ModelMonitor
from patchd.monitor.window import Traffic
from tests.unit.monitor_helpers import monitor_config, simulate


def no_traffic() -> Traffic:
    z = np.zeros(0, np.int64)
    return Traffic(z, np.zeros(0), z, None, None)


def test_lindley_closed_form_equals_the_recursion() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(-0.1, 1.0, 500)
    s, expected = 0.7, []
    for v in x:
        s = max(0.0, s + v)
        expected.append(s)
    assert sequential.lindley(0.7, x) == pytest.approx(np.array(expected))


def test_threshold_grows_with_horizon_and_confidence() -> None:
    h = sequential.alarm_threshold(0.99, 1_000_000)
    assert h == pytest.approx(np.log(2 * 3 * 1e6 / 0.01))
    assert sequential.alarm_threshold(0.999, 1_000_000) > h > sequential.alarm_threshold(0.99, 1000)


ACC = np.array([[0.92, 0.90, 0.85], [0.88, 0.93, 0.80]])
SHARES = np.array([0.6, 0.35, 0.05])


def stationary_monitor(
    seed: int, reference: int = 20_000
) -> tuple[ModelMonitor, np.random.Generator]:
    rng = np.random.default_rng(seed)
    mon = ModelMonitor(monitor_config(reference_window=reference, window=50_000), "m")
    mon.advance(simulate(rng, reference, ACC, SHARES), no_traffic(), now=0)
    assert mon.reference is not None and mon.reference.source == "window"
    return mon, rng


def test_no_false_alarm_over_stationary_ticks_while_a_fixed_n_test_would_alarm() -> None:
    """200 ticks x 12 rows on a stationary stream: the CUSUM stays quiet, whereas a one-sided
    z-test at the same 99% confidence on each tick's window (fixed-n p-value, repeated looks)
    raises alarms: the repeated-looks problem the sequential test exists for."""
    mon, rng = stationary_monitor(1)
    alarms, naive = 0, 0
    z = norm.ppf(0.99)
    for i in range(200):
        _, events = mon.advance(
            simulate(rng, 1000, ACC, SHARES, t0=1e5 + i * 1000), no_traffic(), now=0
        )
        alarms += sum(type(e).__name__ == "GroupDegraded" for e in events)
        stats = window_stats(
            mon.window.events.take(slice(-2000, None)), ["a", "b"], mon.groups.names, 30, 0.99
        )
        for c in stats.cells:
            ref = mon.reference.cell(c.cls, c.group)
            if c.n >= 30 and ref is not None:
                se = np.sqrt(ref.accuracy * (1 - ref.accuracy) / c.n)
                naive += int((c.accuracy - ref.accuracy) / se < -z)
    assert len(mon.policy.rows) >= 9
    assert alarms == 0
    assert naive > 0


@pytest.mark.parametrize(("drop", "bound"), [(0.20, 450), (0.40, 150)])
def test_a_drop_in_the_minority_group_is_detected_within_a_bounded_number_of_its_events(
    drop: float, bound: int
) -> None:  # noqa: E501
    mon, rng = stationary_monitor(2)
    bad = ACC.copy()
    bad[:, 2] -= drop
    seen = 0
    for i in range(400):
        ev = simulate(rng, 200, bad, SHARES, t0=1e6 + i * 200)
        _, events = mon.advance(ev, no_traffic(), now=0)
        hit = [e for e in events if type(e).__name__ == "GroupDegraded"]
        if hit:
            assert {e.group for e in hit} == {"site=C"}
            first = min(
                st.since for (_, g), st in mon.policy.rows.items() if g == "site=C" and st.degraded
            )
            seen += int(((ev.group == 2) & (ev.labeled_at <= first)).sum())
            break
        seen += int((ev.group == 2).sum())
    else:
        pytest.fail("never detected")
    assert seen <= bound


# --- monitor.alarm: simulated --------------------------------------------------------------------


def _sim_inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    n = np.round(SHARES[None, :] * np.array([[0.5], [0.5]]) * 200_000)
    c = np.round(n * ACC)
    p0 = c / n
    charts = np.stack([p0 - m * 0.1 for m in sequential.CHART_MULTIPLIERS])
    return charts, p0, n, c


def test_simulated_threshold_is_the_quantile_it_claims() -> None:
    """Fresh stationary horizons at the reference's rates stay below h about ``confidence`` of
    the time (here 0.8 over 20 horizons of 20k events: 4 exceedances expected)."""
    charts, p0, n, c = _sim_inputs()
    horizon = 20_000
    h = sequential.simulated_threshold(charts, p0, n, c, horizon, 0.8, seed=3)
    assert sequential.simulated_threshold(charts, p0, n, c, horizon, 0.99, seed=3) > h
    rng = np.random.default_rng(11)
    flat = p0.reshape(-1)
    shares = (n / n.sum()).reshape(-1)
    weights = [sequential.llr_weights(flat, alt.reshape(-1)) for alt in charts]
    over = 0
    for _ in range(20):
        cell = rng.choice(flat.size, horizon, p=shares)
        ok = rng.random(horizon) < flat[cell]
        top = 0.0
        for w_ok, w_bad in weights:
            inc = np.where(ok, w_ok[cell], w_bad[cell])
            for rows in (cell, cell % p0.shape[1] + 100):
                for r in np.unique(rows):
                    top = max(top, float(sequential.lindley(0.0, inc[rows == r]).max()))
        over += top >= h
    assert 1 <= over <= 9


def test_simulated_alarm_uses_the_point_estimate_and_a_lower_threshold() -> None:
    guaranteed, _ = stationary_monitor(2)
    rng = np.random.default_rng(2)
    mon = ModelMonitor(
        monitor_config(reference_window=20_000, window=50_000, alarm="simulated"), "m"
    )
    mon.advance(simulate(rng, 20_000, ACC, SHARES), no_traffic(), now=0)
    th = mon._thresholds(mon.reference)  # computes the simulated h once
    assert mon.policy.alarm_h < guaranteed.policy.alarm_h
    cell = mon.reference.cell("a", "site=C")
    assert th.p0[0, 2] == pytest.approx(max(0.6, cell.accuracy))
    bad = ACC.copy()
    bad[:, 2] -= 0.4
    for i in range(100):
        _, events = mon.advance(
            simulate(rng, 500, bad, SHARES, t0=1e6 + i * 500), no_traffic(), now=0
        )
        if any(type(e).__name__ == "GroupDegraded" for e in events):
            assert {e.group for e in events if type(e).__name__ == "GroupDegraded"} == {"site=C"}
            break
    else:
        pytest.fail("never detected")
