"""Patch runs in serve: creating and enqueueing runs, and following them on RQ.

A run is a :class:`~patchd.runs.records.RunRecord` (written only here). Creating one (one open run
per model) exports the labeled production slice to ``<artifacts>/runs/<run_id>/slice.jsonl``,
resolves the incumbent weights (registry production version, else ``model.weights``) into the
recipe and enqueues the stage jobs (:mod:`patchd.runs.jobqueue`). An apscheduler tick polls the
jobs, runs RQ's abandoned-job cleanup (so a dead worker's job is retried within the heartbeat grace,
not after a worker's 10-minute maintenance), updates the record and publishes
``RunQueued`` / ``RunFinished``. Serve never imports torch: jobs are enqueued by dotted name.

A run that waits for region labels (:func:`patchd.runs.jobqueue.waits_for_labels`: the ``vae``
augmenter with ``patch.params.defuse.wait_for_labels`` true) is enqueued up to synthesize; when
synthesize finishes with failure regions it becomes ``awaiting_labels`` (still open, never taken
for lost: only the jobs it has are polled) until :meth:`RunsComponent.resume` enqueues train and
evaluate, recording who resumed it, or until ``patch.params.defuse.label_timeout_h`` passes and
the run fails. The pause, its deadline and who resumed it are in the run record (SQLite), so a
serve restart keeps them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram

from patchd.digests import sha256_file
from patchd.domain import RunFinished, RunQueued
from patchd.exceptions import ConflictError, NotFoundError, PatchdError, StageError
from patchd.plugins import catalog as plugin_catalog
from patchd.runs import jobqueue
from patchd.runs import regions as region_store
from patchd.runs.artifacts import SLICE, RunArtifacts
from patchd.runs.recipe import Recipe, apply_overrides, build_recipe
from patchd.runs.records import (
    AWAITING_LABELS,
    NO_IMPROVEMENT,
    OPEN_STATES,
    TERMINAL_STATES,
    RunRecord,
    insert_run,
    new_run_id,
    run_outcome,
    select_runs,
    update_run,
)
from patchd.services import Component, Services

if TYPE_CHECKING:
    from fastapi import APIRouter
    from prometheus_client.registry import Collector
    from redis import Redis

    from patchd.config import Config

log = logging.getLogger(__name__)

CLEANUP_EVERY_S = 5.0
STAGE_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, float("inf"))


def resolve_incumbent(config: Config) -> tuple[Path, str, str]:
    """(weights path, sha256, source) of the model the run fine-tunes; StageError when none."""
    from patchd.promotion.registry import open_registry

    version = open_registry(config).production(config.model.name)
    if version is not None:
        return Path(version.weights_path), version.sha256, "registry"
    weights = config.model.weights
    if weights is None:
        raise StageError(
            f"no incumbent model for {config.model.name!r}: the registry at "
            f"{config.registry_url or config.registry_root} has no production version and "
            "model.weights is not set; "
            "set model.weights to a safetensors file or import one into the registry"
        )
    path = Path(weights).resolve()
    if not path.is_file():
        raise StageError(f"model.weights {str(weights)!r} does not exist ({path}); fix the path")
    return path, sha256_file(path), "config"


def _location(config: Config) -> str:
    """The artifacts root a job is handed: the bucket URL, or the local directory."""
    return config.artifacts_url or str(config.artifacts_root)


# --- deciding a run's state from its jobs -----------------------------------------------------


@dataclass
class Progress:
    state: str
    stage: str | None
    error: str | None = None
    result: dict[str, Any] | None = None
    finished: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    missing: bool = False
    abandoned: bool = False


def assess(
    states: dict[str, jobqueue.JobState], stages: Sequence[str] = jobqueue.STAGES
) -> Progress:
    """The run's state given its stage jobs, in stage order (``stages``: those enqueued so far;
    a run paused for labels has no train job yet, which is not a lost job)."""
    prog = Progress(state="queued", stage=stages[0])
    for stage in stages:
        job = states.get(stage)
        if job is None or job.status == "missing":
            prog.missing = True
            prog.stage = stage
            return prog
        if job.status == jobqueue.DONE:
            prog.finished[stage] = job.seconds or 0.0
            prog.state, prog.result = "running", job.result
            continue
        if job.status in jobqueue.FAILED or job.status == jobqueue.CANCELED:
            return _failed(prog, stage, job)
        prog.stage = stage
        if job.status == "started":
            prog.state = "running"
            prog.result = {"stage": stage, "progress": job.progress, "message": job.message}
        return prog
    prog.state, prog.stage = "succeeded", stages[-1]
    return prog


def enqueued_stages(rec: RunRecord) -> tuple[str, ...]:
    """The stages the run has jobs for, in stage order."""
    return tuple(s for s in jobqueue.STAGES if s in rec.job_ids)


def with_labels(result: dict[str, Any] | None, old: dict[str, Any] | None) -> dict[str, Any] | None:
    """``result`` keeping the ``labels`` pause record of ``old`` (a later stage's result would
    otherwise replace it)."""
    labels = (old or {}).get("labels")
    if labels is None:
        return result
    return {**(result or {}), "labels": labels}


def _failed(prog: Progress, stage: str, job: jobqueue.JobState) -> Progress:
    prog.stage = stage
    if job.status == jobqueue.CANCELED:
        prog.state, prog.error = "cancelled", f"{stage}: job {job.job_id} was cancelled"
        return prog
    prog.state = "failed"
    error = job.error or f"job {job.job_id} {job.status}"
    if "AbandonedJobError" in error:
        prog.abandoned = True
        error = (
            f"the worker running job {job.job_id} died and its retries are exhausted "
            "(abandoned); check the worker logs and patch.retries"
        )
    prog.error = error if error.startswith(f"{stage}:") else f"{stage}: {error}"
    return prog


# --- the component ----------------------------------------------------------------------------


class RunsComponent(Component):
    name = "runs"
    per_model = True

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        self.config: Config = services.config
        self._redis: Redis | None = None
        self._create_lock = threading.Lock()
        self._state_lock = threading.Lock()  # poll vs cancel: one decides a run's end
        self._last_cleanup = 0.0
        self.runs_total = Counter(
            "patchd_runs_total", "Patch runs finished, by result", ["result"], registry=None
        )
        self.stage_seconds = Histogram(
            "patchd_run_stage_seconds",
            "Wall time of a patch stage",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=None,
        )
        for result in ("succeeded", NO_IMPROVEMENT, "failed", "cancelled", "abandoned"):
            self.runs_total.labels(result=result)
        self.fidelity = Gauge(
            "patchd_synthesis_fidelity_ratio",
            "Synthesis fidelity of the latest run's translations per class and direction "
            "(measure: flip_rate, tttr, class_kept, used = 1 when the policy kept them)",
            ["model", "cls", "direction", "measure"],
            registry=None,
        )
        self._fidelity_series: dict[str, set[tuple[str, ...]]] = {}

    # lifecycle
    def routers(self) -> Sequence[APIRouter]:
        from patchd.runs.api import build_router

        return (build_router(self),)

    def collectors(self) -> Iterable[Collector]:
        return (self.runs_total, self.stage_seconds, self.fidelity)

    def start(self) -> None:
        jobqueue.check_patch_config(self.config)
        self.services.leader.on_elected(self._fail_interrupted)
        self.services.scheduler.add_job(
            self.services.leader.guard(self.tick),
            "interval",
            seconds=self.config.patch.poll_interval_s,
            id="runs-poll",
            coalesce=True,
            max_instances=1,
            replace_existing=True,
            misfire_grace_time=None,
        )

    def _fail_interrupted(self) -> None:
        """Runs left ``requested`` by a serve that stopped before enqueueing them."""
        with self.services.store.read() as conn:
            stuck = select_runs(
                conn, f"WHERE state = ?{self._scope}", ("requested", *self._scope_args)
            )
        for rec in stuck:
            self._finish(
                rec, "failed", "serve stopped before the run was enqueued; request it again", None
            )

    def stop(self) -> None:
        if self._redis is not None:
            self._redis.close()

    @property
    def redis(self) -> Redis:
        if self._redis is None:
            self._redis = jobqueue.connect(self.config.redis.url)
        return self._redis

    @property
    def _scope(self) -> str:
        """The SQL condition that keeps a per-model component to its model's runs."""
        return " AND model = ?" if self.services.scoped_model else ""

    @property
    def _scope_args(self) -> tuple[str, ...]:
        scoped = self.services.scoped_model
        return (scoped,) if scoped else ()

    # reading
    @property
    def model_name(self) -> str:
        return self.config.model.name

    def get(self, run_id: str) -> RunRecord:
        with self.services.store.read() as conn:
            found = select_runs(conn, "WHERE id = ?", (run_id,))
        if not found:
            raise NotFoundError("run", run_id)
        return found[0]

    def list(self, model: str | None = None, limit: int = 50) -> list[RunRecord]:
        model = model or self.services.scoped_model  # several models: this one's runs
        where, args = ("WHERE model = ?", (model,)) if model else ("", ())
        with self.services.store.read() as conn:
            return select_runs(conn, f"{where} ORDER BY created_at DESC LIMIT ?", (*args, limit))

    def _save(self, rec: RunRecord) -> RunRecord:
        rec = replace(rec, updated_at=time.time())
        with self.services.store.write() as conn:
            self.services.leader.fence(conn, f"update run {rec.id}")
            update_run(conn, rec)
        return rec

    # creating
    def request_run(
        self, model: str, reason: str, recipe: dict[str, Any] | None = None
    ) -> RunRecord | None:
        """Create and enqueue a run; None when one is already open for ``model``."""
        if model != self.config.model.name:
            raise NotFoundError("model", model)
        self.services.leader.require("request a patch run")
        config = apply_overrides(self.config, recipe)
        jobqueue.check_patch_config(config)
        for kind in ("miner", "augmenter", "trainer"):
            plugin_catalog.resolve(kind, getattr(config.patch, kind))  # PluginError on a typo
        with self._create_lock, self.services.store.write() as conn:
            self.services.leader.fence(conn, f"create a run for {model}")
            marks = ",".join("?" * len(OPEN_STATES))
            if select_runs(conn, f"WHERE model = ? AND state IN ({marks})", (model, *OPEN_STATES)):
                log.info("run requested for %s (%s) but one is already open", model, reason)
                return None
            now = time.time()
            rec = RunRecord(
                new_run_id(model),
                model,
                "requested",
                None,
                reason[:500],
                {},
                {},
                {},
                None,
                None,
                now,
                now,
            )
            insert_run(conn, rec)
        log.info("run %s created for %s: %s", rec.id, model, reason)
        return self._prepare_and_enqueue(rec, config)

    def _prepare_and_enqueue(self, rec: RunRecord, config: Config) -> RunRecord:
        try:
            recipe = self._recipe(rec, config)
            rec = self._save(replace(rec, recipe=json.loads(recipe.to_json())))
            stages = jobqueue.first_stages(config)
            ids = jobqueue.enqueue_run(
                self.redis, config, rec.id, _location(config), recipe.to_json(), stages
            )
            if config.patch.augmenter == "vae" and stages == jobqueue.STAGES:
                log.warning(
                    "run %s: patch.params.defuse.wait_for_labels is false, so train starts "
                    "right after synthesize and unlabelled regions train with their source "
                    "class, which no person confirmed",
                    rec.id,
                )
        except PatchdError as err:
            return self._finish(rec, "failed", str(err), None)
        except Exception as err:  # redis down, disk full: the run fails with the reason
            log.exception("run %s could not be enqueued", rec.id)
            return self._finish(rec, "failed", f"cannot enqueue: {type(err).__name__}: {err}", None)
        rec = self._save(replace(rec, state="queued", stage=jobqueue.STAGES[0], job_ids=ids))
        self.services.bus.publish(RunQueued(run_id=rec.id, model=rec.model))
        return rec

    def _recipe(self, rec: RunRecord, config: Config) -> Recipe:
        from patchd.store.predictions import export_slice

        incumbent = resolve_incumbent(config)
        artifacts = RunArtifacts.from_config(config)
        path = config.artifacts_root / "runs" / rec.id / SLICE
        with self.services.store.read() as conn:
            rows = export_slice(conn, rec.model, path, config.patch.slice_limit)
        artifacts.publish_file(rec.id, SLICE)
        log.info("run %s: exported %d labeled events to %s", rec.id, rows, artifacts.location)
        return build_recipe(config, incumbent, path, int(rows), sha256_file(path))

    # following
    def tick(self) -> None:
        """Scheduler job: abandoned-job cleanup, then one poll of every open run."""
        try:
            if time.monotonic() - self._last_cleanup >= CLEANUP_EVERY_S:
                self._last_cleanup = time.monotonic()
                jobqueue.cleanup_abandoned(self.redis, jobqueue.queue_names(self.config))
            with self.services.store.read() as conn:
                open_runs = select_runs(
                    conn,
                    f"WHERE state IN (?,?,?){self._scope}",
                    ("queued", "running", AWAITING_LABELS, *self._scope_args),
                )
            for rec in open_runs:
                with self._state_lock:
                    current = self.get(rec.id)
                    if current.state == AWAITING_LABELS:
                        self.check_label_deadline(current)
                    elif current.open:
                        self.poll(current)
        except Exception:
            log.exception("runs tick failed; will retry on the next tick")

    def poll(self, rec: RunRecord) -> RunRecord:
        states = {s: jobqueue.job_state(self.redis, j) for s, j in rec.job_ids.items()}
        stages = enqueued_stages(rec)
        prog = assess(states, stages)
        prog.result = with_labels(prog.result, rec.result)
        times = dict(rec.stage_times)
        for stage, seconds in prog.finished.items():
            if stage not in times:
                times[stage] = round(seconds, 3)
                self.stage_seconds.labels(stage=stage).observe(seconds)
                if stage == "synthesize":
                    self._export_fidelity(rec.model, states[stage].result)
        rec = replace(rec, stage_times=times)
        if prog.missing:
            return self._reenqueue(rec)
        if prog.state == "succeeded" and stages[-1] != jobqueue.STAGES[-1]:
            return self._pause_for_labels(replace(rec, stage=prog.stage), prog.result)
        if prog.state in TERMINAL_STATES:
            result = "abandoned" if prog.abandoned else prog.state
            if prog.state == "succeeded" and run_outcome(prog.result) == NO_IMPROVEMENT:
                result = NO_IMPROVEMENT  # no candidate: the promotion component skips it
            return self._finish(
                replace(rec, stage=prog.stage), prog.state, prog.error, prog.result, result
            )
        if (prog.state, prog.stage, prog.result) != (
            rec.state,
            rec.stage,
            rec.result,
        ) or times != rec.stage_times:
            rec = self._save(replace(rec, state=prog.state, stage=prog.stage, result=prog.result))
        return rec

    def _export_fidelity(self, model: str, job_result: dict[str, Any] | None) -> None:
        """The synthesize stage's fidelity summary as gauges (replacing the model's last ones)."""
        stage_result = (job_result or {}).get("result") or {}
        fidelity = stage_result.get("fidelity") or {}
        directions = fidelity.get("directions") or []
        if not directions:
            return
        for labels in self._fidelity_series.pop(model, set()):  # the model's previous run
            self.fidelity.remove(*labels)
        series_of_model: set[tuple[str, ...]] = set()
        for d in directions:
            direction = f"{d['source']}->{d['target']}"
            series = {k: d.get(k) for k in ("flip_rate", "tttr", "class_kept")}
            series["used"] = 1.0 if d.get("kept") else 0.0
            for measure, value in series.items():
                if isinstance(value, int | float):
                    labels = (model, str(d["cls"]), direction, measure)
                    self.fidelity.labels(*labels).set(value)
                    series_of_model.add(labels)
        self._fidelity_series[model] = series_of_model

    def _reenqueue(self, rec: RunRecord) -> RunRecord:
        """Jobs vanished from Redis (flushed, restarted without persistence): enqueue again."""
        log.warning("run %s: some jobs are missing from Redis; enqueueing them again", rec.id)
        self.services.leader.require(f"re-enqueue run {rec.id}")
        recipe = Recipe(**rec.recipe)
        config = recipe.effective_config()
        ids = jobqueue.enqueue_run(
            self.redis,
            config,
            rec.id,
            _location(config),
            recipe.to_json(),
            enqueued_stages(rec),
        )
        return self._save(replace(rec, job_ids=ids))

    # waiting for a person's region labels
    def _pause_for_labels(self, rec: RunRecord, result: dict[str, Any] | None) -> RunRecord:
        """Synthesize is done: wait for labels when it found regions, else go on to train."""
        config = Recipe(**rec.recipe).effective_config()
        try:
            artifacts = RunArtifacts.from_config(config)
            if artifacts.blobs is not None:  # the regions and their grids, for the pages
                artifacts.fetch(rec.id, "synthesize")
            run = region_store.run_dir(config.artifacts_root, rec.id)
            count = len(region_store.load_regions(run))
        except PatchdError:
            count = 0
        now = time.time()
        if count == 0:
            log.info("run %s: synthesize found no failure regions; training now", rec.id)
            no_regions = {**(result or {}), "labels": {"regions": 0}}
            return self._enqueue_rest(replace(rec, result=no_regions), "patchd (no regions)", now)
        labels = {
            "regions": count,
            "since": round(now, 3),
            "deadline": round(now + jobqueue.label_timeout_s(config), 3),
        }
        rec = self._save(
            replace(rec, state=AWAITING_LABELS, result={**(result or {}), "labels": labels})
        )
        log.warning(
            "run %s awaits labels for %d failure regions: label them (patchd regions %s --label "
            "REGION=CLASS, or /ui/runs/%s/regions), then resume it (patchd regions %s --done)",
            rec.id,
            count,
            rec.id,
            rec.id,
            rec.id,
        )
        return rec

    def check_label_deadline(self, rec: RunRecord, now: float | None = None) -> RunRecord:
        """Fail a run left awaiting labels past its deadline (it is never trained with labels
        no person confirmed)."""
        labels = rec.labels or {}
        now = time.time() if now is None else now
        deadline = labels.get("deadline")
        if rec.state != AWAITING_LABELS or not isinstance(deadline, int | float) or now < deadline:
            return rec
        hours = (deadline - float(labels.get("since", deadline))) / 3600.0
        return self._finish(
            rec,
            "failed",
            f"synthesize: no one confirmed the labels of its {labels.get('regions')} failure "
            f"regions within {hours:g} h (patch.params.defuse.label_timeout_h), so the run was "
            "not trained with labels no person gave; label the regions of a new run and resume "
            "it (patchd regions RUN --done), or set patch.params.defuse.wait_for_labels: false",
            rec.result,
        )

    def resume(self, run_id: str, by: str) -> RunRecord:
        """A person is done labelling: close labelling and enqueue train and evaluate."""
        self.services.leader.require(f"resume run {run_id}")
        with self._state_lock:
            rec = self.get(run_id)
            if rec.state != AWAITING_LABELS:
                raise ConflictError(
                    f"run {run_id} is {rec.state}; only a run awaiting labels can be resumed"
                )
            config = Recipe(**rec.recipe).effective_config()
            RunArtifacts.from_config(config).fetch_regions(rec.id)  # labels given elsewhere
            region_store.close_labelling(region_store.run_dir(config.artifacts_root, rec.id), by)
            return self._enqueue_rest(rec, by, time.time())

    def _enqueue_rest(self, rec: RunRecord, by: str, now: float) -> RunRecord:
        recipe = Recipe(**rec.recipe)
        config = recipe.effective_config()
        rest = jobqueue.STAGES[len(enqueued_stages(rec)) :]
        RunArtifacts.from_config(config).publish_labels(rec.id)
        ids = jobqueue.enqueue_run(
            self.redis, config, rec.id, _location(config), recipe.to_json(), rest
        )
        labels = {**(rec.labels or {}), "by": by, "at": round(now, 3)}
        result = {**(rec.result or {}), "labels": labels}
        log.info("run %s resumed by %s: %s enqueued", rec.id, by, ", ".join(rest))
        return self._save(
            replace(
                rec,
                state="queued",
                stage=rest[0],
                job_ids={**rec.job_ids, **ids},
                result=result,
            )
        )

    def _finish(
        self,
        rec: RunRecord,
        state: str,
        error: str | None,
        result: dict[str, Any] | None,
        label: str | None = None,
    ) -> RunRecord:
        rec = self._save(replace(rec, state=state, error=error, result=result))
        self.runs_total.labels(result=label or state).inc()
        log.log(
            logging.INFO if state == "succeeded" else logging.WARNING,
            "run %s %s%s",
            rec.id,
            state,
            f": {error}" if error else "",
        )
        self.services.bus.publish(
            RunFinished(run_id=rec.id, model=rec.model, result=label or state)
        )
        return rec

    # cancelling
    def cancel(self, run_id: str) -> RunRecord:
        """Cancel queued jobs, stop the running one; the run becomes ``cancelled``."""
        self.services.leader.require(f"cancel run {run_id}")
        with self._state_lock:
            rec = self.get(run_id)
            if not rec.open:
                raise ConflictError(
                    f"run {run_id} is {rec.state}; only an open run can be cancelled"
                )
            actions = jobqueue.cancel_jobs(self.redis, list(rec.job_ids.values()))
            log.info("run %s cancelled: %s", run_id, actions or "no jobs to stop")
            return self._finish(rec, "cancelled", "cancelled by request", rec.result)
