"""One model's monitor: window, reference, alert policy and drift.

:meth:`ModelMonitor.tick` is the accuracy pass (cheap, every ``monitor.interval_s``);
:meth:`ModelMonitor.compute_drift` + :meth:`ModelMonitor.apply_drift` are the label-free drift
pass (evidently; a separate, slower job, so importing or running evidently never delays an alarm).

A tick reads the events labeled since the last tick, advances every row's sequential test over
them (in label order), recomputes the window's cell statistics and the traffic shares, and
returns a frozen :class:`MonitorSnapshot` plus the domain events to publish. It never raises for
bad data; store errors propagate to the scheduler job, which logs them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from patchd.config import Config
from patchd.domain import DomainEvent, DriftDetected, GroupEstimatedDegraded
from patchd.monitor import estimate as estmod
from patchd.monitor import mined as minedmod
from patchd.monitor import reference as refmod
from patchd.monitor.cells import CellStats, WindowStats, class_count, group_shares, window_stats
from patchd.monitor.drift import DriftResult, all_drift
from patchd.monitor.groups import ALL, GroupSpace
from patchd.monitor.policy import AlertPolicy, Thresholds
from patchd.monitor.reference import Learning, Reference
from patchd.monitor.window import (
    Cursor,
    GroupIndex,
    LabeledEvents,
    Traffic,
    Window,
    fetch_labeled,
    fetch_reference,
    fetch_traffic,
    newest_cursor,
    newest_cursor_before,
)

if TYPE_CHECKING:
    from patchd.store.backend import Store

log = logging.getLogger(__name__)

FETCH_LIMIT = 200_000  # labeled events read per query (a tick loops until it has them all)


@dataclass(frozen=True)
class CellReport:
    stats: CellStats
    reference_accuracy: float | None  # the frozen reference's point estimate (None: no reference)
    threshold: float  # in-control accuracy p0 the sequential test compares against
    state: str  # ok | warning | degraded
    evidence: float  # the CUSUM statistic (alarm at MonitorSnapshot.alarm_threshold)


@dataclass(frozen=True)
class MonitorSnapshot:
    model: str
    ts: float
    n: int  # labeled events in the window (current model only)
    reference: str  # "learning (k/N)" | "window" | "evaluation"
    cells: tuple[CellReport, ...]
    worst_group_accuracy: float | None
    worst_cell: tuple[str, str] | None
    shares: dict[str, float]  # subgroup -> share of recent traffic (label-free)
    drift: tuple[DriftResult, ...]
    alarm_threshold: float
    tick_seconds: float = 0.0
    # label-free estimates per (predicted class, group) and per group ("*"); never accuracy
    estimates: tuple[estmod.Estimate, ...] = ()
    estimated_degraded: frozenset[tuple[str, str]] = frozenset()
    estimator: str = "none"  # "none" (no reference yet) | "confidence" | "confidence+embedding"
    mined: minedmod.MinedStatus | None = None  # the mined pseudo-groups in use (None: off)


@dataclass
class ModelMonitor:
    config: Config
    model: str
    groups: GroupIndex = field(init=False)
    window: Window = field(init=False)
    policy: AlertPolicy = field(init=False)
    cursor: Cursor | None = None
    # while a fresh monitor reads the window it starts from: the newest labeled event then
    catch_up: Cursor | None = None
    reference: Reference | Learning | None = None
    learned: LabeledEvents = field(default_factory=LabeledEvents.empty)
    drifting: set[tuple[str, str]] = field(default_factory=set)
    traffic: Traffic | None = None  # the newest predictions, as the last tick read them
    drift: tuple[DriftResult, ...] = ()
    snapshot: MonitorSnapshot | None = None
    estimator: estmod.Estimator | None = None  # calibrated on the reference's labeled events
    estimated: set[tuple[str, str]] = field(default_factory=set)  # rows "estimated degraded"
    mined_note: str = "off"  # why mined pseudo-groups are (not) in use, shown in the status

    def __post_init__(self) -> None:
        m = self.config.monitor
        self.groups = GroupIndex(GroupSpace.from_config(self.config.groups))
        self.window = Window(m.window, m.window_seconds)
        self.policy = AlertPolicy(self.model, m)

    @property
    def classes(self) -> list[str]:
        return list(self.config.model.class_names)

    @property
    def epoch(self) -> float:
        return self.reference.epoch_ts if self.reference is not None else float("-inf")

    def tick(
        self, store: Store, now: float | None = None
    ) -> tuple[MonitorSnapshot, list[DomainEvent]]:
        started = time.perf_counter()
        now = time.time() if now is None else now
        with store.read() as conn:
            if self.reference is None:
                self.reference = refmod.load(conn, self.model) or Learning(
                    self.model, float("-inf")
                )
                if not self._reference_fits():  # learned with(out) the mined attribute
                    self.reference = Learning(self.model, self.reference.epoch_ts)
                self._register_reference_groups()
            if self.cursor is None:
                self.cursor = newest_cursor_before(conn, self.model, self.config.monitor.window)
                self.catch_up = newest_cursor(conn, self.model)
            new = self._fetch_new(conn)
            traffic = fetch_traffic(
                conn, self.model, self.config.monitor.drift_window, self.groups, self.epoch
            )
            # calibrated once the starting window is read (a catching-up tick stays short)
            if (
                self.estimator is None
                and isinstance(self.reference, Reference)
                and self.catch_up is None
            ):
                self._fit_estimator(conn)
        snapshot, events = self.advance(new, traffic, now, store)
        self.snapshot = snapshot = _timed(snapshot, time.perf_counter() - started)
        return snapshot, events

    def _fit_estimator(self, conn) -> None:  # noqa: ANN001
        """Calibrate the label-free estimate on the current model's first labeled events."""
        need = self.config.monitor.reference_window
        events, embedding = fetch_reference(conn, self.model, self.epoch, need, self.groups)
        if len(events) >= min(need, estmod.MIN_REFERENCE * 10):
            self.estimator = estmod.Estimator.fit(
                events.pred,
                events.label,
                events.confidence,
                events.group,
                embedding,
                max(len(self.classes), class_count(events, self.classes)),
            )

    def _fetch_new(self, conn) -> LabeledEvents:  # noqa: ANN001
        cursor = self.cursor
        assert cursor is not None  # tick sets it before fetching
        batches = []
        # catching up: at most monitor.catch_up_events_per_tick, oldest first (see the config)
        left = self.config.monitor.catch_up_events_per_tick if self.catch_up is not None else None
        while True:
            limit = FETCH_LIMIT if left is None else min(FETCH_LIMIT, left)
            batch, cursor = fetch_labeled(conn, self.model, cursor, limit, self.groups)
            self.cursor = cursor
            batches.append(batch)
            if left is not None:
                left -= len(batch)
            if len(batch) < limit or left == 0:
                break
        end = self.catch_up
        if end is not None and (
            len(batches[-1]) < limit or (cursor.labeled_at, cursor.id) >= (end.labeled_at, end.id)
        ):
            self.catch_up = None  # the window it started from is read: no bound from now on
        out = LabeledEvents.empty()
        for b in batches:
            out = LabeledEvents.concat(out, b)
        return out

    def advance(
        self, new: LabeledEvents, traffic: Traffic, now: float, store: Store | None = None
    ) -> tuple[MonitorSnapshot, list[DomainEvent]]:
        """The store-free part of a tick (the bench and unit tests drive it directly)."""
        self.window.append(new, now)
        current = new.take(new.ts >= self.epoch) if len(new) else new
        if isinstance(self.reference, Learning | None):
            self._learn(current, traffic, store)
        ref = self.reference if isinstance(self.reference, Reference) else None
        th = self._thresholds(ref)
        transitions = self.policy.observe(current, th, self.classes, self.groups.names)
        stats = window_stats(
            self.window.since(self.epoch),
            self.classes,
            self.groups.names,
            self.config.monitor.n_min,
            self.config.monitor.confidence,
        )
        events = self.policy.events(transitions, stats, ref)
        self.traffic = traffic
        estimates = self._estimates(traffic)
        events += self._estimate_events(estimates)
        snap = self._snapshot(stats, th, ref, traffic, self.drift, now)
        kind = "none"
        if self.estimator is not None:
            kind = "confidence+embedding" if self.estimator.basis is not None else "confidence"
        return replace(
            snap,
            estimates=estimates,
            estimated_degraded=frozenset(self.estimated),
            estimator=kind,
            mined=self._mined_status(),
        ), events

    def use_mined(
        self, mined: minedmod.MinedGroups | None, note: str, store: Store | None = None
    ) -> None:
        """Adopt a new set of mined pseudo-groups (or none). The cells' definitions change, so
        every row's test restarts, the window is re-read from the store under the new groups
        and a reference whose cells do not fit them (learned with or without the ``mined``
        attribute) is re-learned from the labeled events that follow."""
        self.mined_note = note
        if mined is self.groups.mined:
            return
        self.groups = GroupIndex(GroupSpace.from_config(self.config.groups), mined=mined)
        m = self.config.monitor
        self.window = Window(m.window, m.window_seconds)
        self.cursor = None  # the next tick re-reads the newest window with the new groups
        self.traffic = None
        self.estimator = None  # re-calibrated with the new groups
        self.estimated.clear()
        self.policy.reset()  # every row's test restarts over the re-read window
        # mined cells of another direction set are other slices: re-learned as well
        if self.reference is not None and (mined is not None or not self._reference_fits()):
            self.set_reference(Learning(self.model, self.reference.epoch_ts), store)
        else:
            self._register_reference_groups()

    def _mined_status(self) -> minedmod.MinedStatus | None:
        mined = self.groups.mined
        if mined is None:
            return (
                None if self.mined_note == "off" else minedmod.MinedStatus.inactive(self.mined_note)
            )
        return minedmod.MinedStatus.of(mined, self.mined_note, self.groups.skipped)

    def _reference_fits(self) -> bool:
        """Whether the loaded reference's groups carry the mined attribute exactly when the
        monitor uses mined groups."""
        if not isinstance(self.reference, Reference):
            return True
        mark = f"{minedmod.ATTRIBUTE}="
        want = self.groups.mined is not None
        return all(
            any(part.startswith(mark) for part in c.group.split(",")) == want
            for c in self.reference.cells
        )

    def reconfigure(self, config: Config, now: float | None = None) -> list[DomainEvent]:
        """Adopt a reloaded configuration's monitor thresholds and re-judge every cell over the
        window's events under them (no restart); returns the events of the cells whose state
        changed. Window sizes and intervals are not changed here (they need a restart)."""
        now = time.time() if now is None else now
        self.config = config
        self.policy.reconfigure(config.monitor)
        ref = self.reference if isinstance(self.reference, Reference) else None
        th = self._thresholds(ref)
        window = self.window.since(self.epoch)
        transitions = self.policy.rejudge(window, th, self.classes, self.groups.names, now)
        m = config.monitor
        stats = window_stats(window, self.classes, self.groups.names, m.n_min, m.confidence)
        events = self.policy.events(transitions, stats, ref)
        if self.traffic is not None and self.snapshot is not None:
            snap, more = self.advance(LabeledEvents.empty(), self.traffic, now)
            self.snapshot, events = snap, events + more
        return events

    def _estimates(self, traffic: Traffic) -> tuple[estmod.Estimate, ...]:
        if self.estimator is None or len(traffic) == 0:
            return ()
        label = traffic.label if traffic.label is not None else np.full(len(traffic), -1)
        batch = estmod.Batch(
            traffic.pred, traffic.confidence, traffic.group, label, traffic.aligned_embedding()
        )
        return self.estimator.estimate(
            batch, self.classes, self.groups.names, self.config.monitor.confidence
        )

    def _estimate_events(self, estimates: tuple[estmod.Estimate, ...]) -> list[DomainEvent]:
        """Update the "estimated degraded" rows; an event for each row that enters the state."""
        m = self.config.monitor
        out: list[DomainEvent] = []
        now = set()
        for e in estimates:
            key = (e.cls, e.group)
            if estmod.estimated_degraded(e, m.margin, m.n_min, key in self.estimated):
                now.add(key)
                if key not in self.estimated:
                    out.append(
                        GroupEstimatedDegraded(
                            model=self.model,
                            cls=e.cls,
                            group=e.group,
                            estimate=e.accuracy,
                            ci_high=e.ci_high,
                            reference=e.reference_accuracy,
                            n=e.n,
                        )
                    )
        self.estimated = now
        return out

    def compute_drift(self) -> tuple[Reference | None, tuple[DriftResult, ...]]:
        """Drift of the last tick's traffic against the reference (slow; call outside locks)."""
        ref, traffic = self.reference, self.traffic
        if not isinstance(ref, Reference) or traffic is None:
            return None, ()
        return ref, all_drift(
            ref, traffic, self.groups.names, len(self.classes), self.config.monitor
        )

    def apply_drift(
        self, ref: Reference | None, drift: tuple[DriftResult, ...]
    ) -> list[DomainEvent]:
        """Adopt drift results (unless the reference changed meanwhile); the events to publish."""
        if ref is None or ref is not self.reference or self.traffic is None:
            return []
        self.drift = drift
        return self._drift_events(drift, self.traffic, ref)

    def _thresholds(self, ref: Reference | None) -> Thresholds:
        k = max(len(self.classes), class_count(self.window.events, self.classes))
        return self.policy.thresholds(ref, self.classes, self.groups.names, k)

    def _learn(self, current: LabeledEvents, traffic: Traffic, store: Store | None) -> None:
        need = self.config.monitor.reference_window
        self.learned = LabeledEvents.concat(self.learned, current)
        if len(self.learned) < need:
            return
        base = self.learned.take(slice(0, need))
        stats = window_stats(
            base,
            self.classes,
            self.groups.names,
            self.config.monitor.n_min,
            self.config.monitor.confidence,
        )
        profiles = refmod.profiles_from(traffic, self.groups.names, len(self.classes))
        epoch = self.reference.epoch_ts if self.reference is not None else float("-inf")
        self.set_reference(refmod.from_window(self.model, stats, epoch, profiles), store)
        if store is None:  # driven without a store (bench, tests): calibrate on these events
            self.estimator = estmod.Estimator.fit(
                base.pred, base.label, base.confidence, base.group, None, stats_classes(base, self)
            )

    def set_reference(self, state: Reference | Learning, store: Store | None) -> None:
        """Freeze a new reference (or start learning one); every row's test restarts. A reference
        whose cells do not fit the groups in use (with or without ``mined``) is learned instead."""
        self.reference = state
        if not self._reference_fits():
            self.reference = state = Learning(self.model, state.epoch_ts)
        self.learned = LabeledEvents.empty()
        self.estimator = None  # re-calibrated on the new reference's labeled events
        self.estimated.clear()
        self.policy.reset()
        self.drifting.clear()
        self.drift = ()
        self._register_reference_groups()
        if store is not None:
            with store.write() as conn:
                refmod.save(conn, state)
        log.info(
            "model=%s: reference %s (epoch %.3f)",
            self.model,
            state.source if isinstance(state, Reference) else "learning",
            state.epoch_ts,
        )

    def _register_reference_groups(self) -> None:
        if isinstance(self.reference, Reference):
            for name in {c.group for c in self.reference.cells} | {
                p.group for p in self.reference.profiles
            }:
                if name in self.groups.names or self.groups.space.canonical(name) == name:
                    self.groups.code(name)

    def _drift_events(
        self, drift: tuple[DriftResult, ...], traffic: Traffic, ref: Reference | None
    ) -> list[DomainEvent]:
        out: list[DomainEvent] = []
        now_drifting = {(d.group, d.feature) for d in drift if d.drifted}
        for d in drift:
            if d.drifted and (d.group, d.feature) not in self.drifting:
                out.append(
                    DriftDetected(
                        model=self.model,
                        group=d.group,
                        feature=d.feature,
                        score=d.score,
                        method=d.method,
                    )
                )
        self.drifting = now_drifting
        drop = self.config.monitor.warning_confidence_drop
        for code, group in enumerate(self.groups.names):
            current = _mean_confidence(traffic, code)
            warning = self.policy.set_warning(
                group, _warning_reason(group, drift, current, ref, drop)
            )
            if warning is not None:
                out.append(warning)
        return out

    def _snapshot(
        self,
        stats: WindowStats,
        th: Thresholds,
        ref: Reference | None,
        traffic: Traffic,
        drift: tuple[DriftResult, ...],
        now: float,
    ) -> MonitorSnapshot:
        rows = []
        for c in stats.cells:
            refcell = ref.cell(c.cls, c.group) if ref is not None else None
            st = self.policy.rows.get((c.cls, c.group))
            rows.append(
                CellReport(
                    stats=c,
                    reference_accuracy=refcell.accuracy if refcell is not None else None,
                    threshold=_p0(th, c, self.classes, self.groups.names),
                    state=self.policy.state((c.cls, c.group)),
                    evidence=st.evidence if st else 0.0,
                )
            )
        return MonitorSnapshot(
            model=self.model,
            ts=now,
            n=stats.n,
            reference=self._reference_label(),
            cells=tuple(rows),
            worst_group_accuracy=stats.worst_group_accuracy,
            worst_cell=stats.worst_cell,
            shares=group_shares(traffic.group, self.groups.names),
            drift=drift,
            alarm_threshold=self.policy.alarm_h,
        )

    def _reference_label(self) -> str:
        if isinstance(self.reference, Reference):
            return self.reference.source
        return f"learning ({len(self.learned)}/{self.config.monitor.reference_window})"


def _p0(th: Thresholds, c: CellStats, classes: list[str], groups: list[str]) -> float:
    gi = groups.index(c.group)
    if c.cls == ALL:
        return float(th.p0[:, gi].min())
    ki = classes.index(c.cls) if c.cls in classes else int(c.cls)
    return float(th.p0[ki, gi])


def _mean_confidence(traffic: Traffic, code: int) -> float:
    conf = traffic.confidence[traffic.group == code]
    conf = conf[~np.isnan(conf)]
    return float(conf.mean()) if len(conf) else float("nan")


def _warning_reason(
    group: str, drift: tuple[DriftResult, ...], current: float, ref: Reference | None, drop: float
) -> str | None:
    """Drift of the group's label-free signals together with a confidence drop, else None."""
    if ref is None:
        return None
    drifted = sorted(d.feature for d in drift if d.group == group and d.drifted)
    profile = ref.profile(group)
    if not drifted or profile is None or np.isnan(current):
        return None
    fall = profile.mean_confidence - current
    if fall < drop:
        return None
    return f"{'+'.join(drifted)} drift and mean confidence down {fall:.2f}"


def stats_classes(ev: LabeledEvents, mon: ModelMonitor) -> int:
    return max(len(mon.classes), class_count(ev, mon.classes))


def _timed(s: MonitorSnapshot, seconds: float) -> MonitorSnapshot:
    return replace(s, tick_seconds=seconds)
