"""The labeled-detector comparison of ``patchd bench monitor``: one budget for every detector."""

from __future__ import annotations

import numpy as np
import pytest

from patchd.bench import detectors as d


def _calibration(n: int = 20_000) -> tuple[d.Labeled, d.Labeled]:
    rng = np.random.default_rng(d.CALIBRATION_SEED)
    s = d.base_stream(d.CALIBRATION_SEED)
    return d.draw(rng, s, 20_000), d.draw(rng, s, n)


def test_common_budget_threshold_is_quiet_on_its_stream_and_catches_a_drop() -> None:
    ref, stat = _calibration()
    n, c = d.reference_counts(ref)
    charts = d.patchd_charts(n, c, 0.10, 0.99)
    h = float(d.max_statistic(stat, charts).max()) + 1e-9
    assert d.first_alarm(stat, charts, h, list(range(d.ROWS))) is None
    assert d.first_alarm(stat, charts, h - 1e-3, list(range(d.ROWS))) is not None  # tight
    cs = d.case(100, 0.40, 20_000, 20_000)
    delay, false_alarms = d.cusum_delay(cs, charts, h)
    assert delay is not None and 0 < delay < 300
    assert false_alarms in (0, 1)


def test_group_events_until_counts_the_affected_group_only() -> None:
    ev = d.Labeled(np.zeros(5, np.int64), np.array([0, 3, 0, 0, 2]), np.ones(5))
    assert d.group_events_until(ev, 3) == 3
    assert d.group_events_until(ev, None) is None


def test_river_calibration_finds_a_quiet_parameter() -> None:
    pytest.importorskip("river")
    ref, stat = _calibration(5000)
    factory, bounds, up = d.river_peers()["river ADWIN"]
    x = d.calibrate_river(factory, bounds, up, ref, stat, steps=4)
    assert bounds[0] <= x <= bounds[1]
    assert d._river_alarms(factory, x, stat, ref, list(range(d.ROWS))) is None
