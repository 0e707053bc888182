"""IngestPipeline (group commit, ack after commit, bounded queue) and the HTTP layer in-process."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from patchd.api.app import create_app
from patchd.api.auth import Principal, TokenStore
from patchd.api.metrics import metrics_router
from patchd.config import build_config
from patchd.exceptions import QueueFullError
from patchd.ingest.api import ingest_router
from patchd.ingest.metrics import IngestCollector
from patchd.ingest.pipeline import BatchResult, IngestPipeline, ShuttingDownError
from patchd.store.db import Store
from patchd.store.predictions import count_predictions

ADMIN = "admin-token-0123456789abcdef"
READER = "reader-token-0123456789abcdef"


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[IngestPipeline]:
    cfg = build_config(
        {
            "state_dir": str(tmp_path),
            "model": {"name": "m"},
            "api": {"ingest_queue_max": 100, "max_body_bytes": 4096},
        }
    )
    store = Store.open(cfg.store_path)
    p = IngestPipeline(cfg, store)
    p.start()
    yield p
    p.stop()
    store.close()


def stored(p: IngestPipeline) -> int:
    with p.store.read() as conn:
        return count_predictions(conn, "m")[0]


def test_submit_returns_after_commit_with_per_record_errors(pipeline: IngestPipeline) -> None:
    result = pipeline.submit_predictions(
        [{"id": "a", "pred": 0}, {"id": "b"}, {"id": "a", "pred": 1}, "x"], "test"
    )
    assert (result.accepted, result.duplicates) == (1, 1)
    assert [(e.index, e.reason) for e in result.rejected] == [
        (1, "missing_field"),
        (3, "wrong_type"),
    ]
    assert stored(pipeline) == 1  # visible to a fresh reader: it was committed before the answer
    labels = pipeline.submit_labels([{"id": "a", "label": 1}, {"id": "later", "label": 0}], "test")
    assert (labels.joined, labels.pending) == (1, 1)
    ingested, rejected, joined = pipeline.stats.snapshot()
    assert ingested == {"test": 1} and joined == 1
    assert rejected == {
        ("test", "missing_field"): 1,
        ("test", "wrong_type"): 1,
        ("test", "duplicate"): 1,
    }


def test_labeled_at_strictly_increases_per_commit(pipeline: IngestPipeline) -> None:
    """Readers page by labeled_at: a later commit must never carry an earlier stamp."""
    for i in range(5):
        pipeline.submit_predictions([{"id": f"p{i}", "pred": 0, "label": 1}], "test")
        pipeline.submit_labels([{"id": f"q{i}", "label": 1}], "test")  # pending
        pipeline.submit_predictions([{"id": f"q{i}", "pred": 0}], "test")  # joins
    with pipeline.store.read() as conn:
        rows = conn.execute("SELECT id, labeled_at FROM predictions ORDER BY labeled_at").fetchall()
    assert [r[0] for r in rows] == [x for i in range(5) for x in (f"p{i}", f"q{i}")]
    assert len({r[1] for r in rows}) == 10  # one distinct stamp per commit


def test_concurrent_submitters_lose_nothing(pipeline: IngestPipeline) -> None:
    def send(worker: int) -> None:
        for batch in range(10):
            records = [{"id": f"{worker}-{batch}-{i}", "pred": 1} for i in range(9)]
            pipeline.submit_predictions(records, "test")

    threads = [threading.Thread(target=send, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stored(pipeline) == 4 * 10 * 9
    assert pipeline.stats.commits <= 40  # group commit merged some batches or at most one each


def fill_queue(pipeline: IngestPipeline) -> list[Future[BatchResult]]:
    """With the writer blocked on the store lock, queue 1 + 90 events (bound: 100)."""
    first = pipeline.predictions_future([{"id": "x0", "pred": 0}], "test")
    deadline = time.monotonic() + 5
    while pipeline.queued and time.monotonic() < deadline:  # the writer took it, then blocked
        time.sleep(0.01)
    second = pipeline.predictions_future([{"id": f"y{i}", "pred": 0} for i in range(90)], "test")
    return [first, second]


def test_queue_full_and_shutdown(pipeline: IngestPipeline) -> None:
    with pipeline.store.write():
        futures = fill_queue(pipeline)
        with pytest.raises(QueueFullError) as info:
            pipeline.predictions_future([{"id": f"z{i}", "pred": 0} for i in range(20)], "test")
        assert info.value.retry_after >= 1
    assert [f.result(5).accepted for f in futures] == [1, 90]
    pipeline.stop_intake()
    with pytest.raises(ShuttingDownError):
        pipeline.submit_predictions([{"id": "late", "pred": 0}], "test")
    assert pipeline.stats.snapshot()[1][("test", "queue_full")] == 20


def app_for(pipeline: IngestPipeline) -> TestClient:
    tokens = TokenStore(
        [
            (ADMIN, Principal("admin", frozenset({"read", "ingest", "approve"}))),
            (READER, Principal("reader", frozenset({"read"}))),
        ]
    )
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(IngestCollector(pipeline))
    app = create_app(
        [ingest_router(pipeline), metrics_router(registry)],
        allowed_hosts=["testserver", "127.0.0.1"],
        max_body_bytes=4096,
        state={"tokens": tokens},
    )
    return TestClient(app, headers={"Authorization": f"Bearer {ADMIN}"})


def test_http_ingest_array_ndjson_and_errors(pipeline: IngestPipeline) -> None:
    client = app_for(pipeline)
    r = client.post("/v1/predictions", content=b'[{"id":"a","pred":1},{"id":"b","pred":9}]')
    assert r.status_code == 200
    assert r.json()["accepted"] == 1 and r.json()["rejected"][0]["reason"] == "invalid_value"
    r = client.post(
        "/v1/predictions",
        content=b'{"id":"c","pred":0}\n{oops\n{"id":"d","pred":0}\n',
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert r.json()["accepted"] == 2
    assert r.json()["rejected"] == [
        {"index": 1, "reason": "malformed_json", "message": r.json()["rejected"][0]["message"]}
    ]
    r = client.post("/v1/predictions", content=b'[{"id":"a","pred":1},')
    assert r.status_code == 400 and r.json()["reason"] == "malformed_json"
    r = client.post("/v1/labels", json=[{"id": "a", "label": 0}, {"id": "zz", "label": 1}])
    assert (r.json()["joined"], r.json()["pending"]) == (1, 1)
    assert stored(pipeline) == 3
    metrics = client.get("/metrics").text
    assert 'patchd_predictions_ingested_total{source="http"} 3.0' in metrics
    assert 'patchd_ingest_rejected_total{reason="malformed_json",source="http"} 2.0' in metrics
    assert "patchd_labels_joined_total 1.0" in metrics


def test_http_auth_host_and_body_limits(pipeline: IngestPipeline) -> None:
    client = app_for(pipeline)
    body = b'[{"id":"a","pred":1}]'
    assert (
        client.post("/v1/predictions", content=body, headers={"Authorization": ""}).status_code
        == 401
    )
    r = client.post("/v1/predictions", content=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = client.post("/v1/predictions", content=body, headers={"Authorization": f"Bearer {READER}"})
    assert r.status_code == 403 and "ingest" in r.json()["detail"]
    r = client.post("/v1/predictions", content=body, headers={"Host": "evil.example:80"})
    assert r.status_code == 400
    # the open probes pass the Host check for any Host (Prometheus and kubelet address a pod by
    # its IP); this app has no status router, so the probe itself answers 404, not 400
    assert client.get("/healthz", headers={"Host": "10.1.2.3:8321"}).status_code == 404
    assert client.get("/v1/status", headers={"Host": "10.1.2.3:8321"}).status_code == 400
    big = b"[" + b",".join([b'{"id":"x","pred":1}'] * 400) + b"]"
    r = client.post("/v1/predictions", content=big)
    assert r.status_code == 413 and r.json()["reason"] == "too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while streaming
        for _ in range(10):
            yield big[:1000]

    assert client.post("/v1/predictions", content=chunks()).status_code == 413
    assert stored(pipeline) == 0


def test_http_queue_full_is_429_with_retry_after(pipeline: IngestPipeline) -> None:
    client = app_for(pipeline)
    with pipeline.store.write():
        futures = fill_queue(pipeline)
        r = client.post("/v1/predictions", json=[{"id": f"z{i}", "pred": 0} for i in range(20)])
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert [f.result(5).accepted for f in futures] == [1, 90]
