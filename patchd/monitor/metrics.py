"""The monitor's Prometheus collector: reads the latest snapshot at scrape time.

Series (labels only from the configured bounded set; every one initialised at 0 before the first
tick): ``patchd_group_accuracy_ratio``, ``patchd_group_samples`` (class ``"*"`` pools a group's
classes), ``patchd_worst_group_accuracy_ratio`` (NaN while no cell has ``n_min`` events, so a
``< floor`` alert cannot fire on "unknown"), ``patchd_drift_score``, ``patchd_group_share_ratio``
and ``patchd_alert_state`` (1 for the row's current state, 0 for the others).

The label-free estimate is its own family, per (predicted class, subgroup) and per subgroup
(class ``"*"``): ``patchd_estimated_accuracy_ratio`` with ``..._lower_ratio`` and
``..._upper_ratio`` (NaN while unreliable or not calibrated: no confident number is exported),
``patchd_estimate_reliable`` (1/0) and ``patchd_estimated_degraded`` (1 in that state). Never
accuracy: the alert rules on ``patchd_group_accuracy_ratio`` do not read it.

Mined pseudo-groups (:mod:`patchd.monitor.mined`): ``patchd_mined_groups_active`` (1 while the
``mined`` attribute is in use) and ``patchd_mined_unknown_events_total{reason}``, the labeled
events left ``mined=unknown`` since the current directions were adopted (reset on a switch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from patchd.monitor.drift import FEATURES
from patchd.monitor.engine import MonitorSnapshot
from patchd.monitor.groups import ALL
from patchd.monitor.policy import OK, STATES
from patchd.monitor.window import SKIP_REASONS


class MonitorCollector(Collector):
    def __init__(
        self,
        model: str,
        classes: list[str],
        known_groups: Callable[[], list[str]],
        snapshot: Callable[[], MonitorSnapshot | None],
    ) -> None:
        self.model = model
        self.classes = classes
        self.known_groups = known_groups
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        yield from self._cells(snap)
        worst = GaugeMetricFamily(
            "patchd_worst_group_accuracy_ratio",
            "Lowest accuracy over (class, subgroup) cells with at least monitor.n_min events",
            labels=["model"],
        )
        value = (
            snap.worst_group_accuracy
            if snap and snap.worst_group_accuracy is not None
            else math.nan
        )
        worst.add_metric([self.model], value)
        yield worst
        yield self._drift(snap)
        yield self._shares(snap)
        yield from self._estimates(snap)
        yield from self._mined(snap)

    def _estimates(self, snap: MonitorSnapshot | None) -> Iterator[Metric]:
        labels = ["model", "class", "group"]
        fams = {
            name: GaugeMetricFamily(name, doc, labels=labels)
            for name, doc in (
                (
                    "patchd_estimated_accuracy_ratio",
                    "Label-free accuracy estimate per (predicted class, subgroup); class * pools "
                    "a subgroup; NaN while unreliable; never used as accuracy",
                ),
                ("patchd_estimated_accuracy_lower_ratio", "Lower end of the estimate's interval"),
                ("patchd_estimated_accuracy_upper_ratio", "Upper end of the estimate's interval"),
                ("patchd_estimate_reliable", "1 when the label-free estimate is reliable"),
                ("patchd_estimated_degraded", "1 while the row is in the estimated-degraded state"),
            )
        }
        rows = {(e.cls, e.group): e for e in snap.estimates} if snap else {}
        keys = [(ALL, g) for g in self.known_groups()]
        keys += [k for k in rows if k not in set(keys)]
        degraded = snap.estimated_degraded if snap else frozenset()
        for key in keys:
            e = rows.get(key)
            shown = e is not None and e.reliable
            value = (e.accuracy, e.ci_low, e.ci_high) if shown and e else (math.nan,) * 3
            ident = [self.model, *key]
            fams["patchd_estimated_accuracy_ratio"].add_metric(ident, value[0])
            fams["patchd_estimated_accuracy_lower_ratio"].add_metric(ident, value[1])
            fams["patchd_estimated_accuracy_upper_ratio"].add_metric(ident, value[2])
            fams["patchd_estimate_reliable"].add_metric(ident, 1.0 if shown else 0.0)
            fams["patchd_estimated_degraded"].add_metric(ident, 1.0 if key in degraded else 0.0)
        yield from fams.values()

    def _rows(self, snap: MonitorSnapshot | None) -> list[tuple[str, str, float, int, str]]:
        """(class, group, accuracy, n, state) for every configured cell, zeros before data."""
        seen = {}
        if snap is not None:
            for c in snap.cells:
                acc = c.stats.accuracy if c.stats.n else 0.0
                seen[(c.stats.cls, c.stats.group)] = (acc, c.stats.n, c.state)
        keys = [(k, g) for g in self.known_groups() for k in (*self.classes, ALL)]
        keys += [key for key in seen if key not in set(keys)]
        return [(k, g, *seen.get((k, g), (0.0, 0, OK))) for k, g in keys]

    def _cells(self, snap: MonitorSnapshot | None) -> Iterator[Metric]:
        labels = ["model", "class", "group"]
        acc = GaugeMetricFamily(
            "patchd_group_accuracy_ratio",
            "Accuracy of labeled events per (class, subgroup) in the window; class * pools classes",
            labels=labels,
        )
        n = GaugeMetricFamily(
            "patchd_group_samples",
            "Labeled events per (class, subgroup) in the window",
            labels=labels,
        )
        state = GaugeMetricFamily(
            "patchd_alert_state",
            "1 for the current alert state of a (class, subgroup) row (ok, warning, degraded)",
            labels=[*labels, "state"],
        )
        for cls, group, accuracy, count, current in self._rows(snap):
            acc.add_metric([self.model, cls, group], accuracy)
            n.add_metric([self.model, cls, group], count)
            for s in STATES:
                state.add_metric([self.model, cls, group, s], 1.0 if s == current else 0.0)
        yield from (acc, n, state)

    def _drift(self, snap: MonitorSnapshot | None) -> Metric:
        fam = GaugeMetricFamily(
            "patchd_drift_score",
            "Label-free drift score per subgroup and feature (prediction, confidence, embedding; "
            "group_mix over all traffic as group *)",
            labels=["model", "group", "feature"],
        )
        values = {(g, f): 0.0 for g in self.known_groups() for f in FEATURES[:3]}
        values[(ALL, "group_mix")] = 0.0
        for d in snap.drift if snap else ():
            values[(d.group, d.feature)] = d.score
        for (group, feature), score in values.items():
            fam.add_metric([self.model, group, feature], score)
        return fam

    def _shares(self, snap: MonitorSnapshot | None) -> Metric:
        fam = GaugeMetricFamily(
            "patchd_group_share_ratio",
            "Share of recent predictions (labeled or not) per subgroup",
            labels=["model", "group"],
        )
        shares = {g: 0.0 for g in self.known_groups()}
        shares.update(snap.shares if snap else {})
        for group, share in shares.items():
            fam.add_metric([self.model, group], share)
        return fam

    def _mined(self, snap: MonitorSnapshot | None) -> Iterator[Metric]:
        mined = snap.mined if snap is not None else None
        active = GaugeMetricFamily(
            "patchd_mined_groups_active",
            "1 while the monitor tracks the mined pseudo-groups (attribute 'mined')",
            labels=["model"],
        )
        active.add_metric([self.model], 1.0 if mined is not None and mined.active else 0.0)
        yield active
        unknown = CounterMetricFamily(
            "patchd_mined_unknown_events",
            "Labeled events left mined=unknown since the current directions were adopted",
            labels=["model", "reason"],
        )
        counts = dict(mined.skipped) if mined is not None else {}
        for reason in SKIP_REASONS:
            unknown.add_metric([self.model, reason], float(counts.get(reason, 0)))
        yield unknown
