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
from patchd.store.db import Store


@pytest.fixture
def make_runs(tmp_path: Path, clean_redis: str) -> Iterator[Any]:
    made: list[tuple[Store, list[DomainEvent]]] = []

    def make(weights: bool = True, **extra: Any) -> tuple[RunsComponent, list[DomainEvent]]:
        w = tmp_path / "w.safetensors"
        w.write_bytes(b"not really weights")
        data = {
            "state_dir": str(tmp_path / "state"),
            "redis": {"url": clean_redis},
            "model": {"name": "digits", "weights": str(w) if weights else None},
            **extra,
        }
        config = build_config(data)
        store = Store.open(config.store_path)
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
