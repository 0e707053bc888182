"""Several models in one serve: the ``models:`` list, its shared defaults and overrides, the
routing of events by ``model``, and per-model scheduler jobs that fail apart."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import CollectorRegistry, Counter

from patchd.api.metrics import ModelLabelCollector
from patchd.config import Config, build_config, load_config
from patchd.daemon import plan_reload
from patchd.domain import EventBus, RunFinished
from patchd.exceptions import ConfigError, ValidationError
from patchd.ingest.routing import GROUPS_KV_KEY, ModelRouter, groups_kv_key
from patchd.services import ModelBus, ModelScheduler, job_errors_counter

TWO: dict[str, Any] = {
    "monitor": {"n_min": 7},
    "groups": {"attributes": ["site"]},
    "model": {"factory": "pkg.mod:shared"},
    "models": [
        {"name": "cats", "class_names": ["a", "b"], "monitor": {"window": 100}},
        {"name": "dogs", "class_names": ["x", "y", "z"], "patch": {"trainer": "gdro"}},
    ],
}


def test_entries_override_the_shared_sections() -> None:
    config = build_config(TWO)
    assert config.model_names == ("cats", "dogs") and config.several_models
    cats, dogs = config.for_model("cats"), config.for_model("dogs")
    assert cats.model.class_names == ["a", "b"] and dogs.model.class_names == ["x", "y", "z"]
    assert cats.monitor.window == 100 and dogs.monitor.window == 5000  # override / default
    assert cats.monitor.n_min == dogs.monitor.n_min == 7  # the shared section, deep-merged
    assert cats.model.factory == dogs.model.factory == "pkg.mod:shared"
    assert dogs.patch.trainer == "gdro" and cats.patch.trainer == "erm"
    assert cats.groups.attributes == ["site"]
    assert cats.models == [] and cats.per_model() == (cats,)  # a plain one-model view


def test_one_model_config_is_unchanged() -> None:
    config = build_config({"model": {"name": "skin", "class_names": ["a", "b"]}})
    assert config.models == [] and config.model_names == ("skin",)
    assert config.per_model() == (config,) and config.for_model(None) is config
    assert config.for_model("skin") is config
    assert not config.several_models


def test_view_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "patchd.yaml"
    path.write_text("models:\n  - {name: a, weights: w/a.safetensors}\n  - {name: b}\n")
    config = load_config(path, {})
    assert config.for_model("a").model.weights == (tmp_path / "w/a.safetensors").resolve()
    assert config.for_model("b").config_file == path.resolve()


def test_a_dumped_config_validates_again() -> None:
    config = build_config(TWO)
    assert Config.model_validate(config.model_dump()) == config


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        ([{"name": "a"}, {"name": "a"}], "'a' appear more than once"),
        ([{"name": "a", "store": {}}], "models[0] (a): unknown key(s) 'store'"),
        ([{"name": "a", "model": {"name": "b"}}], "unknown key(s) 'model'"),
        ([{"class_names": ["a", "b"]}], "models[0] needs a name"),
        ([{"name": "a", "monitor": {"window": 3}}], "models[0].monitor.window"),
        ([{"name": "a", "monitor": 3}], "models[0] (a).monitor must be a mapping"),
        ([{"name": "bad name"}], "models[0].model.name"),
        ("a", "models must be a list"),
        (["a"], "models[0] must be a mapping"),
    ],
)
def test_bad_model_lists_are_named(models: object, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config({"models": models})
    assert expected in str(err.value)


def test_for_model_names_the_models() -> None:
    config = build_config(TWO)
    with pytest.raises(ConfigError, match="unknown model 'nope'.*cats, dogs"):
        config.for_model("nope")
    with pytest.raises(ConfigError, match=r"several models are configured \(cats, dogs\)"):
        config.for_model(None)


def test_reload_applies_a_models_thresholds_to_that_model() -> None:
    old = build_config(TWO)
    changed = {**TWO, "models": [{**TWO["models"][0], "monitor": {"window": 100, "margin": 0.3}}]}
    changed["models"].append(TWO["models"][1])
    merged, result = plan_reload(old, build_config(changed))
    assert result.applied == ("models.0.monitor.margin: 0.1 -> 0.3",)
    assert merged.for_model("cats").monitor.margin == 0.3
    assert merged.for_model("dogs").monitor.margin == 0.1


def router(config: Config) -> ModelRouter:
    return ModelRouter(config, lambda key: {})


def test_events_route_by_model() -> None:
    r = router(build_config(TWO))
    cats = r.planned({"id": "1", "model": "cats", "pred": 1}, "t", 1.0, [])
    dogs = r.planned({"id": "1", "model": "dogs", "pred": "z"}, "t", 1.0, [])
    assert (cats.model, cats.pred) == ("cats", 1) and (dogs.model, dogs.pred) == ("dogs", 2)
    assert r.label({"id": "1", "model": "dogs", "label": "y"}).label == 1
    with pytest.raises(ValidationError) as err:  # class 2 exists for dogs only
        r.planned({"id": "1", "model": "cats", "pred": 2}, "t", 1.0, [])
    assert err.value.reason == "invalid_value"


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        ({"id": "1", "model": "nope", "pred": 0}, "unknown_model"),
        ({"id": "1", "pred": 0}, "missing_field"),
        ({"id": "1", "model": 3, "pred": 0}, "wrong_type"),
        ([1], "wrong_type"),
    ],
)
def test_unroutable_events_are_rejected(event: object, reason: str) -> None:
    with pytest.raises(ValidationError) as err:
        router(build_config(TWO)).planned(event, "t", 1.0, [])
    assert err.value.reason == reason
    if reason != "wrong_type":
        assert "cats, dogs" in str(err.value)


def test_one_model_accepts_events_without_model() -> None:
    config = build_config({"model": {"name": "skin"}})
    r = router(config)
    assert r.planned({"id": "1", "pred": 0}, "t", 1.0, []).model == "skin"
    with pytest.raises(ValidationError) as err:
        r.planned({"id": "1", "model": "other", "pred": 0}, "t", 1.0, [])
    assert err.value.reason == "unknown_model"
    assert groups_kv_key(config, "skin") == GROUPS_KV_KEY  # the stored key is kept
    assert groups_kv_key(build_config(TWO), "cats") == f"{GROUPS_KV_KEY}:cats"


def test_a_failing_job_is_counted_and_the_other_models_jobs_run() -> None:
    scheduler = BackgroundScheduler(timezone="UTC")
    errors = job_errors_counter()
    cats = ModelScheduler(scheduler, "cats", errors, suffix=True)
    dogs = ModelScheduler(scheduler, "dogs", errors, suffix=True)
    ran = threading.Event()

    def broken() -> None:
        raise RuntimeError("dogs' tick is broken")

    dogs.add_job(broken, "interval", seconds=0.05, id="monitor-tick")
    cats.add_job(ran.set, "interval", seconds=0.05, id="monitor-tick")
    assert {j.id for j in scheduler.get_jobs()} == {"monitor-tick:cats", "monitor-tick:dogs"}
    scheduler.start()
    try:
        assert ran.wait(5)
        deadline = time.monotonic() + 5
        while errors.labels(model="dogs", job="monitor-tick")._value.get() < 2:
            assert time.monotonic() < deadline, "the broken job did not run twice"
            time.sleep(0.02)
        ran.clear()
        assert ran.wait(5)  # cats still ticks
        assert dogs.get_job("monitor-tick") is not None
        dogs.remove_job("monitor-tick")
        assert scheduler.get_job("monitor-tick:dogs") is None
    finally:
        scheduler.shutdown(wait=False)


def test_model_bus_hands_each_model_its_events() -> None:
    bus = EventBus()
    seen: dict[str, list[str]] = {"cats": [], "dogs": []}
    for model in seen:
        ModelBus(bus, model).subscribe(RunFinished, lambda e, m=model: seen[m].append(e.run_id))
    bus.publish(RunFinished(run_id="r1", model="cats", result="failed"))
    bus.publish(RunFinished(run_id="r2", model="dogs", result="failed"))
    assert seen == {"cats": ["r1"], "dogs": ["r2"]}


def test_model_label_collector_merges_families() -> None:
    per_model = {}
    for model in ("cats", "dogs"):
        runs = Counter("patchd_runs", "Runs", ["result"], registry=None)
        runs.labels(result="failed").inc(2 if model == "dogs" else 0)
        per_model[model] = [runs]
    registry = CollectorRegistry()
    registry.register(ModelLabelCollector(per_model))
    assert (
        registry.get_sample_value("patchd_runs_total", {"model": "dogs", "result": "failed"}) == 2
    )
    assert (
        registry.get_sample_value("patchd_runs_total", {"model": "cats", "result": "failed"}) == 0
    )


def test_a_shared_sections_error_is_reported_once() -> None:
    with pytest.raises(ConfigError) as err:
        build_config({"store": {"batch_size": 0}, "models": [{"name": "a"}, {"name": "b"}]})
    lines = str(err.value).splitlines()[1:]
    assert lines == ["store.batch_size: Input should be greater than or equal to 1 (got 0)"]
