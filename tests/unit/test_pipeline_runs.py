"""RunsComponent with a real store and a real Redis (no worker): create, one-open-run, cancel."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import CollectorRegistry
from rq import Queue

from patchd.config import build_config
from patchd.domain import DomainEvent, EventBus, RunFinished, RunQueued
from patchd.exceptions import ConflictError, NotFoundError, PluginError, ValidationError
from patchd.runs import jobqueue
from patchd.runs.component import RunsComponent
from patchd.services import Services
from patchd.store.backend import Store, open_store


@pytest.fixture
def make_runs(
    tmp_path: Path, clean_redis: str, backend_store_config: dict[str, object]
) -> Iterator[Any]:
    """Runs components on each store backend in turn (tests/conftest.py)."""
    made: list[tuple[Store, list[DomainEvent]]] = []

    def make(weights: bool = True, **extra: Any) -> tuple[RunsComponent, list[DomainEvent]]:
        w = tmp_path / "w.safetensors"
        w.write_bytes(b"not really weights")
        data = {
            "state_dir": str(tmp_path / "state"),
            "redis": {"url": clean_redis},
            "model": {"name": "digits", "weights": str(w) if weights else None},
            "store": backend_store_config,
            **extra,
        }
        config = build_config(data)
        store = open_store(config)
        bus, events = EventBus(), []
        bus.subscribe(DomainEvent, events.append)
        registry = CollectorRegistry()
        services = Services(config, store, bus, registry, BackgroundScheduler(), clean_redis)
        runs = RunsComponent(services)
        for c in runs.collectors():
            registry.register(c)
        made.append((store, events))
        return runs, events

    yield make
    for store, _ in made:
        store.close()


def test_request_creates_and_enqueues_one_open_run_per_model(make_runs: Any) -> None:
    runs, events = make_runs()
    rec = runs.request_run("digits", "test", {"budget": {"epochs": 1}})
    assert rec is not None and rec.state == "queued" and rec.stage == "collect"
    assert rec.job_ids == {s: f"{rec.id}-{s}" for s in jobqueue.STAGES}
    assert rec.recipe["config"]["patch"]["budget"]["epochs"] == 1
    assert rec.recipe["incumbent_source"] == "config" and len(rec.recipe["incumbent_sha256"]) == 64
    slice_path = Path(rec.recipe["slice_path"])
    assert slice_path == runs.config.artifacts_root / "runs" / rec.id / "slice.jsonl"
    assert slice_path.is_file() and rec.recipe["slice_rows"] == 0
    assert Queue("patchd", connection=runs.redis).job_ids == [f"{rec.id}-collect"]
    assert [type(e) for e in events] == [RunQueued]
    assert runs.request_run("digits", "again") is None
    assert runs.get(rec.id).state == "queued" and [r.id for r in runs.list()] == [rec.id]
    assert json.dumps(rec.to_dict())  # JSON-able API view
    assert "config" not in rec.to_dict()["recipe"]


def test_bad_requests_are_refused_before_a_run_exists(make_runs: Any) -> None:
    runs, _ = make_runs()
    with pytest.raises(NotFoundError):
        runs.request_run("other-model", "x")
    with pytest.raises(ValidationError, match="cannot override"):
        runs.request_run("digits", "x", {"model": {"factory": "evil:x"}})
    with pytest.raises(PluginError, match="unknown trainer 'ermm'"):
        runs.request_run("digits", "x", {"trainer": "ermm"})
    assert runs.list() == []


def test_no_incumbent_fails_the_run_clearly(make_runs: Any) -> None:
    runs, events = make_runs(weights=False)
    rec = runs.request_run("digits", "test")
    assert rec is not None and rec.state == "failed"
    assert "no incumbent model for 'digits'" in (rec.error or "")
    assert "model.weights" in (rec.error or "")
    assert isinstance(events[-1], RunFinished) and events[-1].result == "failed"
    assert runs.runs_total.labels(result="failed")._value.get() == 1
    assert runs.request_run("digits", "retry") is not None  # a failed run is not open


def test_cancel_marks_the_run_and_its_jobs(make_runs: Any) -> None:
    runs, events = make_runs()
    rec = runs.request_run("digits", "test")
    assert rec is not None
    done = runs.cancel(rec.id)
    assert done.state == "cancelled"
    statuses = {jobqueue.job_state(runs.redis, j).status for j in rec.job_ids.values()}
    assert statuses == {"canceled"}
    assert isinstance(events[-1], RunFinished) and events[-1].result == "cancelled"
    with pytest.raises(ConflictError):
        runs.cancel(rec.id)
    runs.tick()  # a terminal run is not polled again
    assert runs.get(rec.id).state == "cancelled"
    assert runs.runs_total.labels(result="cancelled")._value.get() == 1


def test_poll_reenqueues_jobs_lost_from_redis(make_runs: Any) -> None:
    runs, _ = make_runs()
    rec = runs.request_run("digits", "test")
    assert rec is not None
    runs.redis.flushall()
    runs.tick()
    assert Queue("patchd", connection=runs.redis).job_ids == [f"{rec.id}-collect"]
    assert runs.get(rec.id).state == "queued"


def test_synthesize_fidelity_is_exported_and_replaced_by_the_next_run(make_runs: Any) -> None:
    from prometheus_client import generate_latest

    runs, _ = make_runs()

    def result(flip: float, kept: bool) -> dict[str, Any]:
        direction = {"cls": 1, "source": 0, "target": 1, "flip_rate": flip, "tttr": 0.9}
        direction.update({"class_kept": 0.95, "class_kept_ceiling": 0.97, "kept": kept})
        return {"result": {"fidelity": {"measured": True, "directions": [direction]}}}

    runs._export_fidelity("digits", result(0.42, False))
    text = generate_latest(runs.services.metrics).decode()

    def series(measure: str) -> str:
        labels = f'cls="1",direction="0->1",measure="{measure}",model="digits"'
        return f"patchd_synthesis_fidelity_ratio{{{labels}}}"

    assert f"{series('flip_rate')} 0.42" in text and f"{series('used')} 0.0" in text
    runs._export_fidelity("digits", result(0.97, True))
    text = generate_latest(runs.services.metrics).decode()
    assert f"{series('flip_rate')} 0.97" in text and f"{series('used')} 1.0" in text
    assert "0.42" not in text
    runs._export_fidelity("digits", {"result": {"kind": "none"}})  # no pairs: series kept
    assert "0.97" in generate_latest(runs.services.metrics).decode()


# --- Defuse runs wait for a person's region labels after synthesize ---------------------------


def _finish_jobs(runs: RunsComponent, job_ids: list[str]) -> None:
    """Mark stage jobs finished in Redis as a worker would (their results are not needed)."""
    from rq.job import Job, JobStatus

    for jid in job_ids:
        Job.fetch(jid, connection=runs.redis).set_status(JobStatus.FINISHED)


def _write_regions(runs: RunsComponent, run_id: str, n: int) -> None:
    stage = runs.config.artifacts_root / "runs" / run_id / "synthesize"
    stage.mkdir(parents=True, exist_ok=True)
    regions = [
        {"region": i, "weight": 0.5, "source_label": 0, "source_name": "a", "preview": f"{i}.png"}
        for i in range(n)
    ]
    (stage / "regions.json").write_text(json.dumps({"schema": 2, "regions": regions}))


VAE = {"augmenter": "vae", "trainer": "defuse"}


def test_assess_takes_a_paused_run_as_done_up_to_synthesize_not_as_lost() -> None:
    from patchd.runs.component import assess

    done = {s: jobqueue.JobState(f"r-{s}", "finished") for s in jobqueue.STAGES[:3]}
    first = jobqueue.STAGES[:3]
    prog = assess(done, first)
    assert (prog.state, prog.stage, prog.missing) == ("succeeded", "synthesize", False)
    assert assess(done).missing  # against all five stages the missing train job reads as lost


def test_vae_run_pauses_after_synthesize_and_resumes_with_who(make_runs: Any) -> None:
    from patchd.runs import regions as region_store

    runs, events = make_runs()
    rec = runs.request_run("digits", "test", VAE)
    assert rec is not None and list(rec.job_ids) == ["collect", "mine", "synthesize"]
    _write_regions(runs, rec.id, 3)
    _finish_jobs(runs, list(rec.job_ids.values()))
    runs.tick()
    paused = runs.get(rec.id)
    assert paused.state == "awaiting_labels" and paused.open and paused.stage == "synthesize"
    assert paused.labels is not None and paused.labels["regions"] == 3
    assert paused.labels["deadline"] - paused.labels["since"] == pytest.approx(72 * 3600)
    assert paused.to_dict()["labels"]["regions"] == 3
    assert runs.request_run("digits", "another") is None  # still the model's open run
    runs.redis.flushall()  # a paused run has no jobs to lose: nothing is enqueued again
    runs.tick()
    assert runs.get(rec.id).state == "awaiting_labels"
    assert Queue("patchd", connection=runs.redis).job_ids == []

    run_dir = runs.config.artifacts_root / "runs" / rec.id
    region_store.set_labels(run_dir, {"1": "a"}, "ana", ["a", "b"])  # labelling is open
    resumed = runs.resume(rec.id, "Ana Lee (token alice)")
    assert resumed.state == "queued" and resumed.stage == "train"
    assert resumed.job_ids == {s: f"{rec.id}-{s}" for s in jobqueue.STAGES}
    assert Queue("patchd", connection=runs.redis).job_ids == [f"{rec.id}-train"]
    assert resumed.labels is not None and resumed.labels["by"] == "Ana Lee (token alice)"
    with pytest.raises(ConflictError, match="labelling was marked done"):
        region_store.set_labels(run_dir, {"2": "b"}, "ana", ["a", "b"])
    with pytest.raises(ConflictError, match="only a run awaiting labels"):
        runs.resume(rec.id, "again")
    runs.tick()  # polling the resumed run keeps who resumed it
    assert runs.get(rec.id).labels == resumed.labels
    assert not [e for e in events if isinstance(e, RunFinished)]


def test_vae_run_without_regions_goes_on_to_train(make_runs: Any) -> None:
    runs, _ = make_runs()
    rec = runs.request_run("digits", "test", VAE)
    assert rec is not None
    _write_regions(runs, rec.id, 0)
    _finish_jobs(runs, list(rec.job_ids.values()))
    runs.tick()
    now = runs.get(rec.id)
    assert now.state == "queued" and now.stage == "train" and "evaluate" in now.job_ids
    assert now.labels is not None and now.labels["regions"] == 0


def test_run_left_awaiting_labels_fails_at_its_deadline(make_runs: Any) -> None:
    runs, events = make_runs(patch={"params": {"defuse": {"label_timeout_h": 0.5}}})
    rec = runs.request_run("digits", "test", VAE)
    assert rec is not None
    _write_regions(runs, rec.id, 2)
    _finish_jobs(runs, list(rec.job_ids.values()))
    runs.tick()
    paused = runs.get(rec.id)
    assert paused.state == "awaiting_labels" and paused.labels is not None
    deadline = paused.labels["deadline"]
    assert deadline - paused.labels["since"] == pytest.approx(1800)
    assert runs.check_label_deadline(paused, now=deadline - 1).state == "awaiting_labels"
    runs.tick()  # the scheduler's tick checks the deadline: not yet
    assert runs.get(rec.id).state == "awaiting_labels"
    failed = runs.check_label_deadline(paused, now=deadline + 1)
    assert failed.state == "failed" and not failed.open
    assert failed.error is not None and "2 failure regions within 0.5 h" in failed.error
    assert "not trained with labels no person gave" in failed.error
    assert "label_timeout_h" in failed.error and "train" not in failed.job_ids
    assert isinstance(events[-1], RunFinished) and events[-1].result == "failed"
    with pytest.raises(ConflictError):
        runs.resume(rec.id, "late")


def test_tick_fails_a_run_whose_label_deadline_passed(make_runs: Any) -> None:
    """The deadline is in the run record, so a serve started after it passed fails the run."""
    from dataclasses import replace

    runs, _ = make_runs()
    rec = runs.request_run("digits", "test", VAE)
    assert rec is not None
    _write_regions(runs, rec.id, 1)
    _finish_jobs(runs, list(rec.job_ids.values()))
    runs.tick()
    paused = runs.get(rec.id)
    assert paused.labels is not None and paused.state == "awaiting_labels"
    past = {**paused.labels, "since": 1.0, "deadline": 3601.0}
    runs._save(replace(paused, result={**(paused.result or {}), "labels": past}))
    again = RunsComponent(runs.services)  # a new serve on the same store
    again.tick()
    failed = again.get(rec.id)
    assert failed.state == "failed" and "within 1 h" in (failed.error or "")


def test_wait_for_labels_false_enqueues_the_whole_chain(make_runs: Any) -> None:
    runs, _ = make_runs(patch={"params": {"defuse": {"wait_for_labels": False}}})
    rec = runs.request_run("digits", "test", VAE)
    assert rec is not None and list(rec.job_ids) == list(jobqueue.STAGES)
    from patchd.exceptions import ConfigError

    with pytest.raises(ConfigError, match="wait_for_labels must be true or false"):
        runs.request_run("digits", "x", {**VAE, "params": {"defuse": {"wait_for_labels": "no"}}})
