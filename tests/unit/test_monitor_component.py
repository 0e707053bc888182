"""MonitorComponent with real parts (SQLite store, event bus, registry, scheduler, FastAPI)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from patchd.api.auth import Principal, TokenStore
from patchd.domain import DomainEvent, EventBus, GroupDegraded, ModelPromoted, PatchRequested
from patchd.monitor.component import DRIFT_JOB_ID, JOB_ID, MonitorComponent
from patchd.monitor.reference import Learning
from patchd.services import Services
from patchd.store.db import Store
from tests.unit.monitor_helpers import monitor_config

TOKEN = "read-token-0123456789"
SITES = ["A", "B", "C"]


def insert(
    store: Store,
    rng: np.random.Generator,
    n: int,
    acc: dict[str, float],
    share_c: float,
    start: int,
) -> None:  # noqa: E501
    rows, now = [], time.time()
    for i in range(n):
        site = "C" if rng.random() < share_c else SITES[int(rng.integers(0, 2))]
        y = int(rng.integers(0, 2))
        pred = y if rng.random() < acc[site] else 1 - y
        rows.append(
            (
                "m",
                f"r{start + i}",
                now,
                pred,
                0.8,
                f"site={site}",
                "{}",
                "t",
                now,
                y,
                now + i * 1e-6,
            )
        )
    with store.write() as conn:
        conn.executemany(
            "INSERT INTO predictions (model, id, ts, pred, confidence, group_key, groups, source, "
            "ingested_at, label, labeled_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            rows,
        )


@pytest.fixture
def parts(tmp_path: Path) -> tuple[Services, MonitorComponent, list[DomainEvent]]:
    config = monitor_config(reference_window=2000, window=10_000)
    store = Store.open(tmp_path / "s.db")
    services = Services(
        config, store, EventBus(), CollectorRegistry(), BackgroundScheduler(), "redis://x"
    )
    seen: list[DomainEvent] = []
    services.bus.subscribe(DomainEvent, seen.append)
    comp = MonitorComponent(services)
    services.components["monitor"] = comp
    for collector in comp.collectors():
        services.metrics.register(collector)
    comp.start()
    yield services, comp, seen
    store.close()


def sample(services: Services, name: str, **labels: str) -> float | None:
    return services.metrics.get_sample_value(name, {"model": "m", **labels})


def test_series_are_initialised_for_the_configured_set_before_any_data(parts) -> None:  # noqa: ANN001
    services, _, _ = parts
    for group in ("site=A", "site=B", "site=C", "site=other"):
        for cls in ("a", "b", "*"):
            assert (
                sample(services, "patchd_group_accuracy_ratio", **{"class": cls, "group": group})
                == 0
            )
            assert sample(services, "patchd_group_samples", **{"class": cls, "group": group}) == 0
            assert (
                sample(
                    services, "patchd_alert_state", **{"class": cls, "group": group, "state": "ok"}
                )
                == 1
            )
        assert sample(services, "patchd_group_share_ratio", group=group) == 0
        assert sample(services, "patchd_drift_score", group=group, feature="confidence") == 0
    assert sample(services, "patchd_drift_score", group="*", feature="group_mix") == 0
    assert math.isnan(sample(services, "patchd_worst_group_accuracy_ratio"))


def test_jobs_are_scheduled_with_coalesce_and_one_instance(parts) -> None:  # noqa: ANN001
    services, comp, _ = parts
    for job_id in (JOB_ID, DRIFT_JOB_ID):
        job = services.scheduler.get_job(job_id)
        assert job is not None and job.coalesce and job.max_instances == 1
    comp.stop()
    assert services.scheduler.get_job(JOB_ID) is None


def test_degradation_publishes_events_records_one_patch_request_and_serves_the_table(parts) -> None:  # noqa: ANN001, E501
    services, comp, seen = parts
    rng = np.random.default_rng(3)
    insert(services.store, rng, 3000, {"A": 0.9, "B": 0.9, "C": 0.9}, 0.1, 0)
    snap = comp.tick()
    assert snap.reference == "window" and snap.n == 3000
    assert not [e for e in seen if isinstance(e, GroupDegraded)]
    insert(services.store, rng, 3000, {"A": 0.9, "B": 0.9, "C": 0.3}, 0.3, 3000)
    snap = comp.tick()
    degraded = [e for e in seen if isinstance(e, GroupDegraded)]
    assert degraded and {e.group for e in degraded} == {"site=C"}
    assert (
        len([e for e in seen if isinstance(e, PatchRequested)]) == 1
    )  # one open request per model
    cell = next(c for c in snap.cells if (c.stats.cls, c.stats.group) == ("*", "site=C"))
    assert (
        sample(services, "patchd_group_accuracy_ratio", **{"class": "*", "group": "site=C"})
        == cell.stats.accuracy
    )
    assert (
        sample(
            services, "patchd_alert_state", **{"class": "*", "group": "site=C", "state": "degraded"}
        )
        == 1
    )
    assert sample(services, "patchd_worst_group_accuracy_ratio") == snap.worst_group_accuracy

    app = FastAPI()
    app.state.tokens = TokenStore([(TOKEN, Principal("reader", frozenset({"read"})))])
    for router in comp.routers():
        app.include_router(router)
    client = TestClient(app)
    assert client.get("/v1/groups").status_code == 401
    doc = client.get("/v1/groups", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    row = next(c for c in doc["cells"] if (c["class"], c["group"]) == ("*", "site=C"))
    assert row["state"] == "degraded" and row["n"] == cell.stats.n
    assert row["ci_low"] <= row["accuracy"] <= row["ci_high"]
    assert len(doc["patch_requests"]) == 1 and doc["patch_requests"][0]["status"] == "open"
    assert "site=C" in doc["patch_requests"][0]["reason"]


def test_promotion_resets_the_reference_and_the_window(parts) -> None:  # noqa: ANN001
    services, comp, _ = parts
    rng = np.random.default_rng(4)
    insert(services.store, rng, 2500, {"A": 0.9, "B": 0.9, "C": 0.9}, 0.1, 0)
    assert comp.tick().reference == "window"
    promoted_at = time.time() + 1
    services.bus.publish(
        ModelPromoted(model="m", digest="ab" * 32, previous=None, approved_by="x", ts=promoted_at)
    )
    snap = comp.tick()
    assert (
        isinstance(comp.engine.reference, Learning)
        and comp.engine.reference.epoch_ts == promoted_at
    )
    assert snap.n == 0 and snap.reference.startswith("learning")
