"""The label-free accuracy estimate: holds under a subgroup-mix shift, says when it is unreliable,
and reaches the snapshot, /v1/groups and the metrics without ever counting as accuracy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from patchd.bench import labelfree as lf
from patchd.config import build_config
from patchd.domain import GroupDegraded, GroupEstimatedDegraded
from patchd.monitor import estimate as est
from patchd.monitor.api import snapshot_json
from patchd.monitor.engine import ModelMonitor
from patchd.monitor.metrics import MonitorCollector
from patchd.monitor.window import LabeledEvents, Traffic

GREEN = 1


def _stream(scenario: str, seed: int = 3) -> tuple[lf.Events, lf.Events]:
    rng = np.random.default_rng(seed)
    lens = rng.normal(0, 1, (3, lf.DIM))
    return lf.simulate(rng, 8000, "stationary", lens), lf.simulate(rng, 6000, scenario, lens)


def _green(e: lf.Events, labeled: bool = False) -> est.Batch:
    g = lf._take(e, e.group == GREEN)
    label = g.y if labeled else np.full(len(g.y), -1)
    return est.Batch(g.pred, g.conf, g.group, label, g.emb)


def _pooled(fit: est.Estimator, batch: est.Batch) -> est.Estimate:
    rows = fit.estimate(batch, lf.CLASS_NAMES, lf.GROUP_NAMES, 0.99)
    return next(r for r in rows if r.cls == "*")


def _fit(ref: lf.Events, use_embedding: bool = True) -> est.Estimator:
    return est.Estimator.fit(ref.pred, ref.y, ref.conf, ref.group, ref.emb, 2, use_embedding)


def _truth(e: lf.Events) -> float:
    m = e.group == GREEN
    return float((e.pred[m] == e.y[m]).mean())


def test_stationary_estimate_is_close_and_covered() -> None:
    ref, after = _stream("stationary")
    e = _pooled(_fit(ref), _green(after))
    assert e.reliable
    assert abs(e.accuracy - _truth(after)) <= 0.01
    assert e.ci_low <= _truth(after) <= e.ci_high


def test_mix_shift_estimate_holds_where_the_confidence_score_alone_breaks() -> None:
    """Class 0's minority colour goes from 2% to 50% of its traffic: the green group's accuracy
    falls ~0.2 while every (class, colour) cell keeps its accuracy. An estimate of the confidence
    score alone (per cell, like CBPE) stays high; the cell + embedding estimate follows."""
    ref, after = _stream("mix")
    truth = _truth(after)
    assert truth < 0.85  # the shift is real
    ours = _pooled(_fit(ref), _green(after))
    assert abs(ours.accuracy - truth) <= 0.05
    assert ours.ci_low <= truth <= ours.ci_high
    score_only = _pooled(_fit(ref, use_embedding=False), _green(after))
    assert abs(score_only.accuracy - truth) > 0.08  # what the estimate must not fall back to


def test_concept_shift_is_marked_unreliable_once_labels_arrive() -> None:
    ref, after = _stream("concept")
    fit = _fit(ref)
    blind = _pooled(fit, _green(after))
    assert blind.reliable  # no label-free method sees a concept shift...
    seen = _pooled(fit, _green(after, labeled=True))
    assert not seen.reliable  # ...but the labels that arrive contradict the interval
    assert "realized accuracy" in (seen.reason or "")


def test_unseen_cell_and_far_inputs_are_unreliable() -> None:
    ref, after = _stream("stationary")
    fit = _fit(ref)
    g = _green(after)
    unseen = est.Batch(g.pred, g.confidence, np.full(len(g.pred), 5), g.label, g.embedding)
    rows = fit.estimate(unseen, lf.CLASS_NAMES, lf.GROUP_NAMES, 0.99)
    assert rows and not any(r.reliable for r in rows)
    assert all(math.isnan(r.accuracy) for r in rows if r.cls != "*")
    far = est.Batch(g.pred, g.confidence, g.group, g.label, g.embedding + 25.0)
    e = _pooled(fit, far)
    assert not e.reliable and "beyond the reference" in (e.reason or "")


def test_estimated_degraded_needs_a_reliable_bound_below_the_level() -> None:
    def row(acc: float, hi: float, reliable: bool = True, n: int = 100) -> est.Estimate:
        return est.Estimate("*", "g", n, acc, acc - 0.02, hi, 0.9, reliable, None, 0, math.nan)

    assert est.estimated_degraded(row(0.7, 0.75), 0.1, 30, was=False)
    assert not est.estimated_degraded(row(0.75, 0.82), 0.1, 30, was=False)  # bound not below
    assert est.estimated_degraded(row(0.75, 0.82), 0.1, 30, was=True)  # hysteresis
    assert not est.estimated_degraded(row(0.7, 0.75, reliable=False), 0.1, 30, was=False)
    assert not est.estimated_degraded(row(0.7, 0.75, n=10), 0.1, 30, was=False)


# --- through the engine, the API and the metrics -------------------------------------------


def _config():  # noqa: ANN202
    return build_config(
        {
            "model": {"name": "m", "class_names": ["a", "b"]},
            "groups": {"attributes": ["g"], "values": {"g": ["x", "y"]}},
            "monitor": {"window": 5000, "reference_window": 2000, "n_min": 30},
        }
    )


def _labeled(rng: np.random.Generator, n: int, conf_shift: float = 0.0) -> LabeledEvents:
    """Correct with probability = confidence (a calibrated model); group 1 ("g=y")."""
    conf = np.clip(rng.uniform(0.6, 1.0, n) - conf_shift, 0.05, 1.0)
    y = rng.integers(0, 2, n)
    ok = rng.random(n) < conf
    ts = np.arange(n, dtype=np.float64)
    group = rng.integers(0, 2, n)
    return LabeledEvents(ts, ts, np.where(ok, y, 1 - y), y, conf, group)


def _traffic(ev: LabeledEvents) -> Traffic:
    return Traffic(ev.pred, ev.confidence, ev.group, None, None, np.full(len(ev), -1), None)


def test_engine_reports_estimates_and_raises_estimated_degraded_not_degraded() -> None:
    rng = np.random.default_rng(0)
    mon = ModelMonitor(_config(), "m")
    ref = _labeled(rng, 2000)
    mon.advance(ref, _traffic(ref), 1.0)
    assert mon.estimator is not None and mon.estimator.basis is None  # confidence + cell
    calm = _labeled(rng, 2000)
    snap, events = mon.advance(LabeledEvents.empty(), _traffic(calm), 2.0)
    pooled = {e.group: e for e in snap.estimates if e.cls == "*"}
    assert set(pooled) == {"g=x", "g=y"} and all(e.reliable for e in pooled.values())
    assert not any(isinstance(e, GroupEstimatedDegraded) for e in events)
    # unlabeled traffic whose confidences fell by 0.3: the estimate falls, no label arrived
    worse = _labeled(rng, 2000, conf_shift=0.3)
    snap, events = mon.advance(LabeledEvents.empty(), _traffic(worse), 3.0)
    est_events = [e for e in events if isinstance(e, GroupEstimatedDegraded)]
    assert {e.group for e in est_events if e.cls == "*"} == {"g=x", "g=y"}
    assert not any(isinstance(e, GroupDegraded) for e in events)  # never counted as accuracy
    assert ("*", "g=x") in snap.estimated_degraded

    doc = snapshot_json(snap, "m")
    row = next(c for c in doc["cells"] if c["class"] == "*" and c["group"] == "g=x")
    assert row["estimate_state"] == "estimated_degraded"
    assert row["estimated_accuracy"] == pytest.approx(pooled["g=x"].accuracy - 0.3, abs=0.06)
    assert row["state"] != "degraded"  # the labeled state is untouched
    assert doc["estimator"] == "confidence"
    assert any(e["class"] == "a" for e in doc["estimates"])

    coll = MonitorCollector("m", ["a", "b"], lambda: list(mon.groups.names), lambda: snap)
    fams = {f.name: f for f in coll.collect()}
    flagged = {
        s.labels["group"]: s.value
        for s in fams["patchd_estimated_degraded"].samples
        if s.labels["class"] == "*"
    }
    assert flagged == {"g=x": 1.0, "g=y": 1.0, "g=other": 0.0}  # configured rows start at 0
    ratio = {
        (s.labels["class"], s.labels["group"]): s.value
        for s in fams["patchd_estimated_accuracy_ratio"].samples
    }
    assert ratio[("*", "g=x")] == pytest.approx(row["estimated_accuracy"])

    from rich.console import Console

    from patchd.cli.monitor import groups_table

    console = Console(record=True, width=220)
    console.print(groups_table(doc))  # what `patchd status` draws
    text = console.export_text()
    assert "est. % (± CI)" in text and "est. degraded" in text
    assert f"{100 * row['estimated_accuracy']:.1f}" in text


def test_unreliable_estimate_is_not_exported_as_a_number() -> None:
    e = est.Estimate("*", "g=x", 100, 0.9, 0.85, 0.95, 0.9, False, "why", 0, math.nan)
    from patchd.monitor.api import estimate_json

    j = estimate_json(e, degraded=False)
    assert j["estimated_accuracy"] is None and j["state"] == "unreliable"
    assert j["unreliable_reason"] == "why"
