"""Hysteresis, cooldown and warnings of the alert policy, on simulated streams."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from patchd.domain import GroupDegraded, GroupRecovered, GroupWarning
from patchd.monitor.drift import DriftResult
from patchd.monitor.engine import ModelMonitor
from patchd.monitor.reference import GroupProfile
from patchd.monitor.window import Traffic
from tests.unit.monitor_helpers import monitor_config, simulate

GOOD = np.array([[0.9, 0.9, 0.9], [0.9, 0.9, 0.9]])
BAD_C = np.array([[0.9, 0.9, 0.4], [0.9, 0.9, 0.4]])
SHARES = np.array([0.45, 0.45, 0.10])


def no_traffic() -> Traffic:
    z = np.zeros(0, np.int64)
    return Traffic(z, np.zeros(0), z, None, None)


class Run:
    def __init__(self, cooldown_s: float = 0.0) -> None:
        self.rng = np.random.default_rng(5)
        self.mon = ModelMonitor(monitor_config(reference_window=5000, cooldown_s=cooldown_s), "m")
        self.t = 0.0
        self.feed(GOOD, 5000)

    def feed(self, acc: np.ndarray, n: int, tick: int = 250) -> list[object]:
        out: list[object] = []
        for _ in range(n // tick):
            ev = simulate(self.rng, tick, acc, SHARES, t0=self.t)
            self.t += tick
            out += self.mon.advance(ev, no_traffic(), now=self.t)[1]
        return out

    def state(self) -> str:
        return self.mon.policy.state(("*", "site=C"))


def test_degrade_then_recover_with_hysteresis() -> None:
    run = Run()
    events = run.feed(BAD_C, 3000)
    degraded = [e for e in events if isinstance(e, GroupDegraded)]
    assert degraded and {e.group for e in degraded} == {"site=C"}
    assert degraded[0].reason in ("reference", "floor")
    assert run.state() == "degraded"
    # a few good events are not enough to recover: the recovery test needs its own evidence
    assert not [e for e in run.feed(GOOD, 250) if isinstance(e, GroupRecovered)]
    assert run.state() == "degraded"
    recovered = [e for e in run.feed(GOOD, 5000) if isinstance(e, GroupRecovered)]
    assert recovered and run.state() == "ok"


def test_cooldown_suppresses_a_second_degradation_event() -> None:
    run = Run(cooldown_s=1e9)
    first = [e for e in run.feed(BAD_C, 3000) if isinstance(e, GroupDegraded)]
    run.feed(GOOD, 6000)
    assert run.state() == "ok"
    again = [e for e in run.feed(BAD_C, 3000) if isinstance(e, GroupDegraded)]
    assert first and not again
    assert run.state() == "degraded"  # shown, but no new event (and so no new trigger)

    quick = Run(cooldown_s=0)
    quick.feed(BAD_C, 3000)
    quick.feed(GOOD, 6000)
    assert [e for e in quick.feed(BAD_C, 3000) if isinstance(e, GroupDegraded)]


def test_warning_needs_drift_and_a_confidence_drop() -> None:
    run = Run()
    profile = GroupProfile("site=C", 500, 0.1, (0.5, 0.5), tuple([0.9] * 100))
    ref = run.mon.reference = replace(run.mon.reference, profiles=(profile,))
    drifted = (DriftResult("site=C", "prediction", 0.4, True, "jensenshannon", 500, 300),)
    code = run.mon.groups.names.index("site=C")

    def traffic(conf: float) -> Traffic:
        z = np.full(300, code, np.int64)
        return Traffic(np.zeros(300, np.int64), np.full(300, conf), z, None, None)

    run.mon.traffic = traffic(0.89)  # drift, but confidence did not fall
    assert not [e for e in run.mon.apply_drift(ref, drifted) if isinstance(e, GroupWarning)]
    run.mon.traffic = traffic(0.70)
    warned = [e for e in run.mon.apply_drift(ref, drifted) if isinstance(e, GroupWarning)]
    assert warned and warned[0].group == "site=C" and "prediction" in warned[0].reason
    assert run.state() == "warning"
    assert not run.mon.apply_drift(ref, drifted)  # no repeat while it stays in warning
    run.mon.apply_drift(ref, ())
    assert run.state() == "ok"
