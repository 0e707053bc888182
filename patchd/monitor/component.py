"""``MonitorComponent``: the monitor inside ``patchd serve``.

- an apscheduler interval job (``monitor.interval_s``, coalesce, max_instances=1, so a slow tick
  is skipped rather than piled up) runs :meth:`ModelMonitor.tick` and publishes its domain events
  (``GroupEstimatedDegraded``, the label-free state, opens a run only when ``trigger.on`` lists
  "estimated");
  a second job (``monitor.drift_interval_s``) runs the label-free drift pass (evidently);
- ``GroupDegraded`` (and ``GroupWarning`` when ``trigger.on`` lists "warning") go to
  :func:`patchd.monitor.trigger.request_patch`;
- ``ModelPromoted`` (and ``ModelRolledBack``: another model serves) resets the reference: to the
  new production version's evaluation when the registry has one, else re-learned from the new
  model's first labeled events;
- a scrape-time collector (:mod:`patchd.monitor.metrics`) and ``GET /v1/groups``;
- a reload (SIGHUP, ``POST /v1/config/reload``) hands it the new thresholds: every cell is
  re-judged over the window's events at once (:meth:`ModelMonitor.reconfigure`).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from patchd.domain import (
    DomainEvent,
    GroupDegraded,
    GroupEstimatedDegraded,
    GroupWarning,
    ModelPromoted,
    ModelRolledBack,
    RunFinished,
)
from patchd.monitor import reference as refmod
from patchd.monitor.engine import ModelMonitor, MonitorSnapshot
from patchd.monitor.mined import MinedGroups
from patchd.monitor.mined_source import resolve
from patchd.monitor.trigger import patch_requests, request_patch
from patchd.runs.artifacts import RunArtifacts
from patchd.services import Component, Services

if TYPE_CHECKING:
    from fastapi import APIRouter
    from prometheus_client.registry import Collector

    from patchd.config import Config


log = logging.getLogger(__name__)

JOB_ID = "monitor-tick"
CATCH_UP_DELAY_S = 0.2  # while a fresh monitor reads its starting window, the next tick comes soon
DRIFT_JOB_ID = "monitor-drift"


class MonitorComponent(Component):
    name = "monitor"
    per_model = True

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        self.model = services.config.model.name
        self.engine = ModelMonitor(services.config, self.model)
        self._promoted: ModelPromoted | ModelRolledBack | None = None
        self._mined_stale = True  # (re)resolve monitor.mined_groups on the next tick
        self._lock = threading.Lock()

    @property
    def snapshot(self) -> MonitorSnapshot | None:
        """The last tick's snapshot; None on a follower (only the leader ticks)."""
        return self.engine.snapshot if self.services.leader.is_leader else None

    def _new_term(self) -> None:
        """This replica became the leader: start from the store, as a fresh serve would (its
        state from an earlier term is stale)."""
        with self._lock:
            if self.engine.snapshot is not None:
                self.engine = ModelMonitor(self.services.config, self.model)
            self._mined_stale = True

    def routers(self) -> Sequence[APIRouter]:
        from patchd.monitor.api import groups_router

        return [groups_router(self.model, lambda: self.snapshot, self._requests)]

    def collectors(self) -> Iterable[Collector]:
        from patchd.monitor.metrics import MonitorCollector

        classes = list(self.services.config.model.class_names)
        return [
            MonitorCollector(
                self.model, classes, lambda: list(self.engine.groups.names), lambda: self.snapshot
            )
        ]

    def start(self) -> None:
        bus = self.services.bus
        bus.subscribe(GroupDegraded, self._on_degraded)
        if "warning" in self.services.config.trigger.on:
            bus.subscribe(GroupWarning, self._on_degraded)
        if "estimated" in self.services.config.trigger.on:
            bus.subscribe(GroupEstimatedDegraded, self._on_degraded)
        bus.subscribe(ModelPromoted, self._on_promoted)
        bus.subscribe(ModelRolledBack, self._on_promoted)
        bus.subscribe(RunFinished, self._on_run_finished)
        monitor = self.services.config.monitor
        leader = self.services.leader
        leader.on_elected(self._new_term)
        self._every(leader.guard(self.tick), JOB_ID, monitor.interval_s, dt.timedelta(0))
        self._every(
            leader.guard(self.drift_pass),
            DRIFT_JOB_ID,
            monitor.drift_interval_s,
            dt.timedelta(seconds=1),
        )

    def _every(self, func: Any, job_id: str, seconds: float, delay: dt.timedelta) -> None:
        self.services.scheduler.add_job(
            func,
            "interval",
            seconds=seconds,
            id=job_id,
            replace_existing=True,
            coalesce=True,
            max_instances=1,
            misfire_grace_time=None,
            next_run_time=dt.datetime.now(dt.UTC) + delay,
        )

    def stop(self) -> None:
        scheduler = self.services.scheduler
        for job_id in (JOB_ID, DRIFT_JOB_ID):
            if scheduler.get_job(job_id) is not None:
                scheduler.remove_job(job_id)

    def tick(self) -> MonitorSnapshot:
        """One monitor pass (the scheduler job; tests may call it directly)."""
        with self._lock:
            self._apply_mined()  # first: a promotion's evaluation reference must fit its groups
            self._apply_promotion()
            snap, events = self.engine.tick(self.services.store)
            catching_up = self.engine.catch_up is not None
        self._publish(events)
        if catching_up:
            self._tick_soon()
        log.debug(
            "model=%s: tick %.3fs, %d labeled events in window",
            self.model,
            snap.tick_seconds,
            snap.n,
        )
        return snap

    def _tick_soon(self) -> None:
        """Run the next tick in :data:`CATCH_UP_DELAY_S` rather than ``monitor.interval_s``."""
        job = self.services.scheduler.get_job(JOB_ID)
        if job is not None:
            soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=CATCH_UP_DELAY_S)
            job.modify(next_run_time=soon)

    def reconfigure(self, config: Config) -> None:
        """New monitor thresholds (a reload): every cell is re-judged over the window now."""
        with self._lock:
            events = self.engine.reconfigure(config)
        log.info(
            "model=%s: monitor thresholds reloaded (accuracy_floor %.3f, margin %.3f); "
            "%d cell state change(s)",
            self.model,
            config.monitor.accuracy_floor,
            config.monitor.margin,
            len(events),
        )
        self._publish(events)

    def drift_pass(self) -> None:
        """The label-free drift pass (the second scheduler job; tests may call it directly)."""
        ref, drift = self.engine.compute_drift()  # slow (evidently), outside the lock
        with self._lock:
            events = self.engine.apply_drift(ref, drift)
        self._publish(events)

    def _publish(self, events: list[DomainEvent]) -> None:
        for event in events:
            _log_event(event)
            self.services.bus.publish(event)

    def _on_degraded(self, event: GroupDegraded | GroupWarning | GroupEstimatedDegraded) -> None:
        if event.model != self.model:
            return
        if isinstance(event, GroupDegraded):
            kind = "degraded"
            detail = degraded_detail(event, self.services.config.monitor.accuracy_floor)
        elif isinstance(event, GroupEstimatedDegraded):
            kind = "estimated"
            detail = (
                f"label-free estimate {event.estimate:.3f} (upper {event.ci_high:.3f}) vs "
                f"reference {event.reference:.3f}, n={event.n}"
            )
        else:
            kind, detail = "warning", event.reason
        if kind not in self.services.config.trigger.on:
            return
        request_patch(
            self.services,
            event.model,
            f"group {kind}: class={event.cls} group={event.group} ({detail})",
        )

    def _on_promoted(self, event: ModelPromoted | ModelRolledBack) -> None:
        if event.model == self.model:
            self._promoted = event  # applied by the next tick, in the tick's thread
            self._mined_stale = True  # the old directions live in the old model's space

    def _on_run_finished(self, event: RunFinished) -> None:
        if event.model == self.model and event.result in ("succeeded", "no_improvement"):
            self._mined_stale = True  # a new run's directions may have arrived

    def _apply_mined(self) -> None:
        """Switch to the pseudo-groups ``monitor.mined_groups`` now selects (when they changed,
        the cells restart: :meth:`ModelMonitor.use_mined`)."""
        if not self._mined_stale:
            return
        self._mined_stale = False
        config = self.services.config
        with self.services.store.read() as conn:
            found = resolve(
                config.monitor.mined_groups,
                conn,
                RunArtifacts.from_config(config),
                self.model,
                list(config.model.class_names),
                _production_digest(self.services, self.model),
            )
        current = self.engine.groups.mined
        if found.mined is not None and current is not None and _same(found.mined, current):
            self.engine.mined_note = found.note
            return
        if found.mined is not None or current is not None:
            log.info("model=%s: mined pseudo-groups: %s", self.model, found.note)
        self.engine.use_mined(found.mined, found.note, self.services.store)

    def _apply_promotion(self) -> None:
        event, self._promoted = self._promoted, None
        if event is None:
            return
        evaluation = _production_evaluation(self.services, self.model)
        ref = None
        if evaluation:  # the evaluation's group names in the monitor's attribute order
            ordered = self.engine.groups.space.ordered
            ref = refmod.from_evaluation(self.model, evaluation, event.ts, ordered)
        self.engine.set_reference(ref or refmod.Learning(self.model, event.ts), self.services.store)
        log.info(
            "model=%s: %s to %s resets the monitor reference (%s)",
            self.model,
            type(event).__name__,
            event.digest[:12],
            "evaluation" if ref else "re-learning",
        )

    def _requests(self) -> list[dict[str, Any]]:
        with self.services.store.read() as conn:
            return [r for r in patch_requests(conn) if r["model"] == self.model]


def _same(a: MinedGroups, b: MinedGroups) -> bool:
    return (a.source, a.run_id, a.incumbent_sha256) == (b.source, b.run_id, b.incumbent_sha256)


def _production_digest(services: Services, model: str) -> str | None:
    """The registry's production digest (None: no promoted version, or an unreadable registry)."""
    try:
        from patchd.promotion.registry import open_registry

        pointer = open_registry(services.config).pointer(model)
    except Exception as err:  # a broken registry must not stop the monitor
        log.warning("model=%s: cannot read the registry for the mined groups: %s", model, err)
        return None
    return pointer.sha256 if pointer is not None else None


def _production_evaluation(services: Services, model: str) -> dict[str, Any] | None:
    """The promoted version's evaluation cells (candidate side of a paired evaluation), if any."""
    try:
        from patchd.promotion.registry import open_registry

        registry = open_registry(services.config)
        pointer = registry.pointer(model)
        manifest = registry.manifest(model, pointer.sha256) if pointer is not None else None
    except Exception as err:  # a broken registry must not stop the monitor
        log.warning("model=%s: cannot read the registry for the new reference: %s", model, err)
        return None
    evaluation = manifest.evaluation if manifest is not None else None
    if not isinstance(evaluation, dict):
        return None
    candidate = evaluation.get("candidate")
    return candidate if isinstance(candidate, dict) and "cells" in candidate else evaluation


def degraded_detail(event: GroupDegraded, floor: float) -> str:
    """What a degraded cell was compared against: ``monitor.accuracy_floor`` or its reference.

    A ``floor`` event without a reference cell carries the floor as its ``reference``; it is not
    called a reference then.
    """
    if event.reason != "floor":
        return f"accuracy {event.accuracy:.3f} vs reference {event.reference:.3f}, n={event.n}"
    has_reference = abs(event.reference - floor) > 1e-12
    ref = f", reference {event.reference:.3f}" if has_reference else ", no reference for this cell"
    return f"accuracy {event.accuracy:.3f} below the accuracy floor {floor:.3f}{ref}, n={event.n}"


def _log_event(event: DomainEvent) -> None:
    fields = {k: v for k, v in vars(event).items() if k != "ts"}
    log.info("%s %s", type(event).__name__, " ".join(f"{k}={v}" for k, v in fields.items()))
