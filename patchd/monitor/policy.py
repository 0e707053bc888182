"""The alert policy: which cells are degraded, warned or fine, with hysteresis and cooldown.

- **Degraded**: a Bernoulli CUSUM per row (every class x group cell and each group's pooled row,
  whose events use their own cell's parameters) with two families of charts, and the row
  alarms when any chart crosses (a multi-chart CUSUM):

  - *reference*: H0 "accuracy >= p_ref" against H1 "accuracy = p_ref - m * margin" for m in
    1, 2, 4, where ``p_ref`` is the reference's lower bound, one-sided at
    ``monitor.confidence`` so an uncertain reference cannot cause alarms (``accuracy_floor``
    where the cell has no reference);
  - *floor*: H0 "accuracy >= accuracy_floor" against H1 "accuracy = accuracy_floor - m * step"
    for the same m, ``step = min(margin, (1 - accuracy_floor) / 2)`` (at least 0.005): a cell
    significantly below the floor is flagged whatever its reference, with the same guarantee.

  The threshold keeps the false-alarm probability of *all* rows and charts within
  ``1 - confidence`` over ``monitor.horizon_events`` labeled events, under a look every tick
  (:mod:`patchd.monitor.sequential`). The cell's shown ``threshold`` is
  ``max(accuracy_floor, p_ref)``.
- **Simulated** (``monitor.alarm: simulated``): ``p_ref`` is the reference's point estimate and
  ``h`` comes from :func:`patchd.monitor.sequential.simulated_threshold` (the ``confidence``
  quantile of the largest statistic over ``horizon_events`` in-control events, simulated from
  the reference's own rates drawn from their posterior), computed once per reference: the same
  budget as the analytic bound, far less slack.
- **Recovered** (hysteresis): once degraded, an upward CUSUM tests "accuracy = p1" against
  "accuracy = p_up" (``p1``: the larger first alternative of the two families; ``p_up``: the
  larger of ``p1_ref + recover_margin`` and ``accuracy_floor + step``); it must cross its own
  threshold before the row is ok again.
- **Reload** (:meth:`AlertPolicy.rejudge`): new thresholds are applied by replaying the window's
  events through fresh statistics; the rows whose state changes publish their events.
- **Cooldown**: a row that degrades again within ``cooldown_s`` of its last published
  :class:`~patchd.domain.GroupDegraded` is shown degraded but publishes nothing (no new trigger).
- **Warning**: label-free; a group whose predictions, confidences or embeddings drift *and* whose
  mean confidence fell by ``warning_confidence_drop`` is in warning (never counted as accuracy).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from patchd.config import MonitorConfig
from patchd.domain import DomainEvent, GroupDegraded, GroupRecovered, GroupWarning
from patchd.monitor import sequential
from patchd.monitor.cells import CellStats, WindowStats, class_name
from patchd.monitor.groups import ALL
from patchd.monitor.reference import Reference
from patchd.monitor.window import LabeledEvents

log = logging.getLogger(__name__)

_MULT = sequential.CHART_MULTIPLIERS

OK, WARNING, DEGRADED = "ok", "warning", "degraded"
STATES = (OK, WARNING, DEGRADED)
RowKey = tuple[str, str]  # (class name or "*", group)
N_CHARTS = 2 * len(sequential.CHART_MULTIPLIERS)  # the reference family, then the floor family
MIN_FLOOR_STEP = 0.005


@dataclass
class RowState:
    degraded: bool = False
    s: np.ndarray = field(default_factory=lambda: np.zeros(N_CHARTS))
    u: float = 0.0  # recovery CUSUM (while degraded)
    since: float = 0.0  # when the row entered its current state
    last_published: float = float("-inf")  # last GroupDegraded published for this row
    warning: str | None = None  # reason, when the label-free signals warn

    @property
    def evidence(self) -> float:
        """The statistic heading for its threshold (recovery while degraded)."""
        return self.u if self.degraded else float(self.s.max())

    @property
    def state(self) -> str:
        return DEGRADED if self.degraded else WARNING if self.warning else OK


@dataclass(frozen=True)
class Transition:
    row: RowKey
    degraded: bool  # True: became degraded; False: recovered
    ts: float  # labeled_at of the event that decided it


@dataclass(frozen=True)
class Thresholds:
    p0: np.ndarray  # [K, G] the level a cell is held to: max(accuracy_floor, p_ref)
    p1: np.ndarray  # [K, G] null of the recovery test (the larger first alternative)
    charts: np.ndarray  # [C, K, G] the alternatives of the degradation charts
    p_up: np.ndarray  # [K, G] recovery alternative
    nulls: np.ndarray  # [C, K, G] the null (in-control accuracy) of each chart


def floor_step(config: MonitorConfig) -> float:
    """Drop per chart multiplier below the floor: small enough to catch a high floor's breach."""
    return max(MIN_FLOOR_STEP, min(max(config.margin, 0.01), (1.0 - config.accuracy_floor) / 2))


@dataclass
class AlertPolicy:
    model: str
    config: MonitorConfig
    rows: dict[RowKey, RowState] = field(default_factory=dict)
    _simulated: tuple[tuple[int, int, int], float] | None = None  # (reference key, h)

    @property
    def alarm_h(self) -> float:
        if self._simulated is not None:
            return self._simulated[1]
        c = self.config
        return sequential.alarm_threshold(c.confidence, c.horizon_events, charts=N_CHARTS)

    @property
    def release_h(self) -> float:
        return sequential.release_threshold(self.config.confidence)

    def reset(self) -> None:
        self.rows.clear()
        self._simulated = None

    def reconfigure(self, config: MonitorConfig) -> None:
        """New thresholds (a reload); :meth:`rejudge` then applies them to the window."""
        self.config = config
        self._simulated = None

    def rejudge(
        self,
        ev: LabeledEvents,
        th: Thresholds,
        classes: list[str],
        groups: list[str],
        now: float,
    ) -> list[Transition]:
        """Replay ``ev`` (the window) through fresh statistics under ``th``; the rows whose state
        differs from before, as transitions at ``now``. Cooldowns and warnings are kept."""
        before = {key: st.degraded for key, st in self.rows.items()}
        kept = {key: (st.last_published, st.warning) for key, st in self.rows.items()}
        self.rows = {}
        for key, (last, warning) in kept.items():
            st = self.row(key)
            st.last_published, st.warning = last, warning
        self.observe(ev, th, classes, groups)
        return [
            Transition(key, st.degraded, now)
            for key, st in self.rows.items()
            if st.degraded != before.get(key, False)
        ]

    def row(self, key: RowKey) -> RowState:
        found = self.rows.get(key)
        if found is None:
            found = self.rows[key] = RowState()
        return found

    def thresholds(
        self, ref: Reference | None, classes: list[str], groups: list[str], k: int
    ) -> Thresholds:
        c = self.config
        simulated = c.alarm == "simulated"
        p_ref = np.full((k, len(groups)), c.accuracy_floor, dtype=np.float64)
        ref_n, ref_c = np.zeros_like(p_ref), np.zeros_like(p_ref)
        if ref is not None:
            for ki in range(k):
                for gi, group in enumerate(groups):
                    cell = ref.cell(class_name(ki, classes), group)
                    if cell is not None and cell.n:
                        p_ref[ki, gi] = (
                            cell.accuracy if simulated else cell.lower_bound(c.confidence)
                        )
                        ref_n[ki, gi], ref_c[ki, gi] = cell.n, cell.correct
        lo, hi = 2 * sequential.P_MIN, sequential.P_MAX
        p_ref = np.clip(p_ref, lo, hi)
        floor = np.full_like(p_ref, float(np.clip(c.accuracy_floor, lo, hi)))
        margin, step = max(c.margin, 0.01), floor_step(c)
        ref_charts = [np.maximum(p_ref - m * margin, sequential.P_MIN) for m in _MULT]
        floor_charts = [np.maximum(floor - m * step, sequential.P_MIN) for m in _MULT]
        charts = np.stack(ref_charts + floor_charts)
        nulls = np.stack([p_ref] * len(_MULT) + [floor] * len(_MULT))
        p0 = np.maximum(p_ref, floor)
        if simulated and ref is not None and ref_n.sum() > 0:
            key = (id(ref), k, len(groups))
            if self._simulated is None or self._simulated[0] != key:
                h = sequential.simulated_threshold(
                    charts, p0, ref_n, ref_c, c.horizon_events, c.confidence, nulls=nulls
                )
                self._simulated = (key, h)
                log.info("model=%s: simulated alarm threshold h=%.2f", self.model, h)
        p1 = np.maximum(ref_charts[0], floor_charts[0])
        recover = max(c.recover_margin, 0.01)
        p_up = np.maximum(ref_charts[0] + recover, floor + step)
        p_up = np.minimum(np.maximum(p_up, p1 + 0.01), sequential.P_MAX)
        return Thresholds(p0, p1, charts, p_up, nulls)

    def observe(
        self, ev: LabeledEvents, th: Thresholds, classes: list[str], groups: list[str]
    ) -> list[Transition]:
        """Advance every row's statistics over new events (label order); return the transitions."""
        if len(ev) == 0:
            return []
        correct = ev.pred == ev.label
        down = np.stack(
            [
                self._llr(correct, ev, null, alt)
                for null, alt in zip(th.nulls, th.charts, strict=True)
            ]
        )
        up = self._llr(correct, ev, th.p1, th.p_up)
        out: list[Transition] = []
        k = th.p0.shape[0]
        code = ev.label * len(groups) + ev.group
        for key, index in _row_indices(code, ev.group, k, len(groups), classes, groups):
            out.extend(self._advance(key, down[:, index], up[index], ev.labeled_at[index]))
        return out

    @staticmethod
    def _llr(correct: np.ndarray, ev: LabeledEvents, h0: np.ndarray, h1: np.ndarray) -> np.ndarray:
        w_ok, w_bad = sequential.llr_weights(h0[ev.label, ev.group], h1[ev.label, ev.group])
        return np.where(correct, w_ok, w_bad)

    def _advance(
        self, key: RowKey, down: np.ndarray, up: np.ndarray, ts: np.ndarray
    ) -> list[Transition]:
        st, out, i = self.row(key), [], 0
        while i < len(up):
            if not st.degraded:
                st.s, hit = sequential.run_charts_until_alarm(st.s, down[:, i:], self.alarm_h)
            else:
                st.u, hit = sequential.run_until_alarm(st.u, up[i:], self.release_h)
            if hit < 0:
                break
            i += hit + 1
            st.degraded, st.u, st.since = not st.degraded, 0.0, float(ts[i - 1])
            st.s = np.zeros_like(st.s)
            out.append(Transition(key, st.degraded, float(ts[i - 1])))
        return out

    def events(
        self, transitions: list[Transition], stats: WindowStats, ref: Reference | None
    ) -> list[DomainEvent]:
        """Domain events for the transitions, with the cooldown applied."""
        by_key = {(c.cls, c.group): c for c in stats.cells}
        out: list[DomainEvent] = []
        for t in transitions:
            cell = by_key.get(t.row)
            st = self.row(t.row)
            if not t.degraded:
                out.append(
                    GroupRecovered(
                        model=self.model,
                        cls=t.row[0],
                        group=t.row[1],
                        accuracy=_acc(cell),
                        n=cell.n if cell else 0,
                    )
                )
            elif t.ts - st.last_published < self.config.cooldown_s:
                log.info(
                    "model=%s cell=%s|%s degraded again within cooldown_s=%.0f: not published",
                    self.model,
                    t.row[0],
                    t.row[1],
                    self.config.cooldown_s,
                )
            else:
                st.last_published = t.ts
                out.append(self._degraded(t.row, cell, ref))
        return out

    def _degraded(
        self, key: RowKey, cell: CellStats | None, ref: Reference | None
    ) -> GroupDegraded:
        acc = _acc(cell)
        refcell = ref.cell(*key) if ref is not None else None
        reference = (
            refcell.accuracy if refcell is not None and refcell.n else self.config.accuracy_floor
        )
        floor = acc < self.config.accuracy_floor or refcell is None
        return GroupDegraded(
            model=self.model,
            cls=key[0],
            group=key[1],
            accuracy=acc,
            reference=reference,
            n=cell.n if cell else 0,
            reason="floor" if floor else "reference",
        )

    def set_warning(self, group: str, reason: str | None) -> GroupWarning | None:
        """Update a group's label-free warning; the event when it starts warning."""
        st = self.row((ALL, group))
        was, st.warning = st.warning, reason
        if reason and not was:
            return GroupWarning(model=self.model, cls=ALL, group=group, reason=reason)
        return None

    def state(self, key: RowKey) -> str:
        st = self.rows.get(key)
        return st.state if st else OK


def _acc(cell: CellStats | None) -> float:
    return cell.accuracy if cell is not None and cell.n else float("nan")


def _row_indices(
    code: np.ndarray, group: np.ndarray, k: int, g: int, classes: list[str], groups: list[str]
):  # noqa: ANN202
    """(row key, event indices) for every cell and pooled row that has events."""
    for gi in np.unique(group):
        in_group = np.flatnonzero(group == gi)
        for ki in np.unique(code[in_group] // g):
            yield (
                (class_name(int(ki), classes), groups[gi]),
                in_group[code[in_group] == ki * g + gi],
            )
        yield (ALL, groups[gi]), in_group
