"""``monitor.accuracy_floor`` is a floor, and reloaded thresholds re-judge the window's cells."""

from __future__ import annotations

import numpy as np
import pytest

from patchd.config import build_config
from patchd.daemon import plan_reload
from patchd.domain import GroupDegraded, GroupRecovered
from patchd.monitor.engine import ModelMonitor
from tests.unit.monitor_helpers import monitor_config, simulate
from tests.unit.test_monitor_policy import no_traffic

SHARES = np.array([0.45, 0.45, 0.10])


def _acc(value: float) -> np.ndarray:
    return np.full((2, 3), value)


def _feed(mon: ModelMonitor, rng: np.random.Generator, acc: np.ndarray, n: int, t: float) -> list:
    events: list = []
    for i in range(n // 250):
        ev = simulate(rng, 250, acc, SHARES, t0=t + 250 * i)
        mon.snapshot, more = mon.advance(ev, no_traffic(), now=t + 250 * (i + 1))  # as tick does
        events += more
    return events


def _monitor(floor: float) -> tuple[ModelMonitor, np.random.Generator]:
    mon = ModelMonitor(monitor_config(accuracy_floor=floor, reference_window=5000), "m")
    rng = np.random.default_rng(3)
    _feed(mon, rng, _acc(0.93), 5000, 0.0)  # the reference: every cell at about 93 %
    return mon, rng


def test_a_cell_significantly_below_the_floor_is_degraded() -> None:
    # floor 0.97, the model at 92.8 % (its own reference): below the floor by 4 points, which
    # a test against "reference - margin" never flags
    mon, rng = _monitor(0.97)
    events = _feed(mon, rng, _acc(0.928), 4000, 5000.0)
    degraded = [e for e in events if isinstance(e, GroupDegraded)]
    assert degraded and all(e.reason == "floor" for e in degraded)
    assert mon.policy.state(("*", "site=A")) == "degraded"
    assert all(c.threshold == pytest.approx(0.97) for c in mon.snapshot.cells)


def test_a_cell_at_or_above_the_floor_is_not_flagged() -> None:
    mon, rng = _monitor(0.90)
    assert not [
        e for e in _feed(mon, rng, _acc(0.93), 6000, 5000.0) if isinstance(e, GroupDegraded)
    ]
    assert {c.state for c in mon.snapshot.cells} == {"ok"}


def test_reloaded_floor_rejudges_the_window_without_new_events() -> None:
    mon, rng = _monitor(0.6)
    assert not [
        e for e in _feed(mon, rng, _acc(0.928), 4000, 5000.0) if isinstance(e, GroupDegraded)
    ]
    stricter = monitor_config(accuracy_floor=0.97, reference_window=5000)
    events = mon.reconfigure(stricter, now=9000.0)
    assert [e for e in events if isinstance(e, GroupDegraded)]
    assert mon.policy.state(("*", "site=A")) == "degraded"
    assert mon.snapshot is not None and mon.snapshot.cells[0].threshold == pytest.approx(0.97)
    back = mon.reconfigure(monitor_config(accuracy_floor=0.6, reference_window=5000), now=9001.0)
    assert [e for e in back if isinstance(e, GroupRecovered)]
    assert mon.policy.state(("*", "site=A")) == "ok"


def test_plan_reload_applies_thresholds_and_lists_the_rest() -> None:
    old = build_config({"monitor": {"accuracy_floor": 0.6, "window": 5000}})
    new = build_config({"monitor": {"accuracy_floor": 0.97, "window": 100}, "gate": {"n_min": 50}})
    merged, result = plan_reload(old, new)
    assert merged.monitor.accuracy_floor == 0.97 and merged.gate.n_min == 50
    assert merged.monitor.window == 5000  # the window size needs a restart
    assert result.applied == ("gate.n_min: 20 -> 50", "monitor.accuracy_floor: 0.6 -> 0.97")
    assert result.restart_needed == ("monitor.window",)
