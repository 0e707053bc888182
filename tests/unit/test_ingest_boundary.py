"""The validation boundary and the resource bounds, in-process (real store, real pipeline).

Each test is one bug of issue 19 that passed through before: a record no branch expected, a tail
chunk around it, inline inputs on disk before validation, a full disk, pending labels without a
cap, a label join that scanned the predictions table, a gzip body without a streaming cap.
"""

from __future__ import annotations

import base64
import errno
import gzip
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from patchd.api.app import create_app
from patchd.api.auth import Principal, TokenStore
from patchd.config import build_config
from patchd.exceptions import DiskFullError, ValidationError
from patchd.ingest.api import ingest_router
from patchd.ingest.inline import check_image
from patchd.ingest.pipeline import IngestPipeline
from patchd.ingest.records import EventParser, Label, validate_each
from patchd.ingest.tailer import Tailer
from patchd.plugins.sources.cloudevents import gunzip, parse_cloudevent
from patchd.store import predictions as sp
from patchd.store.db import Store

TOKEN = "ingest-token-0123456789abcdef"


def png(width: int = 2, height: int = 2) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[IngestPipeline]:
    (tmp_path / "logs").mkdir()
    cfg = build_config(
        {
            "state_dir": str(tmp_path / "state"),
            "model": {"name": "m"},
            "groups": {"attributes": ["site"]},
            "store": {"max_pending_labels": 5},
            "sources": {
                "allowed_roots": [str(tmp_path / "logs")],
                "tail": [{"glob": str(tmp_path / "logs" / "*.log")}],
                "max_image_pixels": 10_000,
                "max_events_per_request": 50,
            },
        }
    )
    store = Store.open(cfg.store_path)
    p = IngestPipeline(cfg, store)
    p.start()
    yield p
    p.stop()
    store.close()


def ids(p: IngestPipeline) -> set[str]:
    with p.store.read() as conn:
        return {r[0] for r in conn.execute("SELECT id FROM predictions")}


def inputs_on_disk(p: IngestPipeline) -> list[Path]:
    root = p.parser.inputs_dir
    return sorted(root.iterdir()) if root.exists() else []


def test_unhashable_group_value_on_the_fast_path_rejects_only_its_record(
    pipeline: IngestPipeline,
) -> None:
    pipeline.submit_predictions([{"id": "a", "pred": 0, "groups": {"site": "A"}}], "t")
    batch = [
        {"id": "b", "pred": 0, "groups": {"site": "A"}},
        {"id": "c", "pred": 0, "groups": {"site": ["x"]}},
        {"id": "d", "pred": 0, "groups": {"site": {"k": 1}}},
        {"id": "e", "pred": 0},
    ]
    result = pipeline.submit_predictions(batch, "t")
    assert [(e.index, e.reason) for e in result.rejected] == [(1, "wrong_type"), (2, "wrong_type")]
    assert ids(pipeline) == {"a", "b", "e"}


def test_an_unexpected_exception_is_a_rejection_not_a_crash(
    pipeline: IngestPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = pipeline.parser.planned

    def flaky(obj: Any, *args: Any) -> Any:
        if obj.get("id") == "boom":
            raise RecursionError("maximum recursion depth exceeded")
        return real(obj, *args)

    monkeypatch.setattr(pipeline.parser, "planned", flaky)
    result = pipeline.submit_predictions([{"id": "boom", "pred": 0}, {"id": "ok", "pred": 0}], "t")
    assert [(e.index, e.reason) for e in result.rejected] == [(0, "invalid_value")]
    assert "RecursionError" in result.rejected[0].message
    assert ids(pipeline) == {"ok"}


def test_tail_chunk_with_a_bad_line_keeps_every_good_line(
    pipeline: IngestPipeline, tmp_path: Path
) -> None:
    pipeline.submit_predictions([{"id": "seed", "pred": 0, "groups": {"site": "A"}}], "t")
    lines = [{"id": f"l{i}", "pred": 0, "groups": {"site": "A"}} for i in range(5)]
    lines.insert(2, {"id": "bad", "pred": 0, "groups": {"site": ["A"]}})
    (tmp_path / "logs" / "app.log").write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))
    cfg = pipeline.config
    tailer = Tailer(cfg.sources.tail[0], cfg, pipeline, pipeline.store)
    tailer._stored = tailer._load_offsets()
    tailer.poll_once()
    tailer._drain_inflight()
    assert ids(pipeline) == {"seed"} | {f"l{i}" for i in range(5)}
    assert pipeline.stats.snapshot()[1][("jsonl", "wrong_type")] == 1
    tailer.stop()


def test_tail_never_moves_past_lines_it_could_not_queue(
    pipeline: IngestPipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "logs" / "app.log"
    log.write_bytes(b"".join(orjson.dumps({"id": f"t{i}", "pred": 0}) + b"\n" for i in range(4)))
    cfg = pipeline.config
    tailer = Tailer(cfg.sources.tail[0], cfg, pipeline, pipeline.store)
    tailer._stored = tailer._load_offsets()
    real = pipeline.predictions_future

    def full_disk(*args: Any, **kwargs: Any) -> Any:
        raise DiskFullError("test", retry_after=0.01)

    monkeypatch.setattr(pipeline, "predictions_future", full_disk)
    tailer.poll_once()
    assert next(iter(tailer.files.values())).offset == 0  # not past the chunk
    monkeypatch.setattr(pipeline, "predictions_future", real)
    tailer.poll_once()
    tailer._drain_inflight()
    assert ids(pipeline) == {f"t{i}" for i in range(4)}
    tailer.stop()


def test_inline_inputs_are_decoded_and_written_only_for_accepted_records(
    pipeline: IngestPipeline,
) -> None:
    fake = b"\x89PNG\r\n\x1a\n" + os.urandom(64)
    result = pipeline.submit_predictions(
        [
            {"id": "fake", "pred": 0, "input": {"base64": b64(fake)}},
            {"id": "huge", "pred": 0, "input": {"base64": b64(png(200, 100))}},  # > 10k pixels
            {"id": "badpred", "pred": 9, "input": {"base64": b64(png(3, 3))}},
            {"id": "good", "pred": 0, "input": {"base64": b64(png(2, 2))}},
        ],
        "t",
    )
    reasons = [(e.index, e.reason) for e in result.rejected]
    assert reasons == [(0, "invalid_value"), (1, "too_large"), (2, "invalid_value")]
    on_disk = inputs_on_disk(pipeline)
    assert len(on_disk) == 1 and on_disk[0].read_bytes() == png(2, 2)


def test_a_full_disk_refuses_the_batch_cleanly_and_a_retry_loses_nothing(
    pipeline: IngestPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    def enospc(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("patchd.ingest.inline.write_atomic", enospc)
    batch = [{"id": "x", "pred": 0}, {"id": "y", "pred": 0, "input": {"base64": b64(png())}}]
    app = create_app(
        [ingest_router(pipeline)],
        allowed_hosts=["testserver"],
        max_body_bytes=1 << 20,
        state={"tokens": TokenStore([(TOKEN, Principal("t", frozenset({"ingest"})))])},
    )
    with TestClient(app) as client:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        r = client.post("/v1/predictions", json=batch, headers=headers)
        assert r.status_code == 503 and r.headers["retry-after"] == "30", r.text
        assert "disk full" in r.json()["error"]
        assert ids(pipeline) == set()  # nothing half-written
        monkeypatch.undo()
        r = client.post("/v1/predictions", json=batch, headers=headers)
        assert r.status_code == 200 and r.json()["accepted"] == 2
        r = client.post(
            "/v1/predictions", json=[{"id": i, "pred": 0} for i in range(51)], headers=headers
        )
        assert r.status_code == 413 and r.json()["reason"] == "too_many_events"


def test_pending_labels_are_capped(pipeline: IngestPipeline) -> None:
    first = pipeline.submit_labels([{"id": f"p{i}", "label": 1} for i in range(4)], "t")
    assert first.pending == 4
    second = pipeline.submit_labels([{"id": f"q{i}", "label": 1} for i in range(3)], "t")
    assert second.pending == 1
    assert [e.reason for e in second.rejected] == ["pending_full", "pending_full"]
    assert pipeline.stats.snapshot()[1][("t", "pending_full")] == 2
    joined = pipeline.submit_predictions([{"id": "p0", "pred": 0}], "t")
    assert joined.joined == 1
    assert pipeline.submit_labels([{"id": "r0", "label": 1}], "t").pending == 1  # room again


@pytest.mark.parametrize(("pending", "batch"), [(2, 5), (10, 3)])
def test_label_join_uses_primary_key_lookups_only(tmp_path: Path, pending: int, batch: int) -> None:
    """Neither table is scanned (the few-pending path reads pending_labels, < batch rows)."""
    cfg = build_config({"state_dir": str(tmp_path), "model": {"name": "m"}})
    store = Store.open(cfg.store_path)
    traced: list[str] = []
    with store.write() as conn:
        conn.set_trace_callback(traced.append)
        early = [Label("m", f"early{i}", 1, 1.0) for i in range(pending)]  # before predictions
        sp.insert_labels(conn, early, 1.0)
        parser = EventParser(cfg)
        preds = [parser.prediction({"id": f"early{i}", "pred": 0}, "t") for i in range(batch)]
        traced.clear()
        written = sp.insert_predictions(conn, preds, 2.0)
        statements = [s for s in traced if "pending_labels" in s]
        plans = [
            " ".join(str(r[-1]) for r in conn.execute("EXPLAIN QUERY PLAN " + s.split(";")[0]))
            for s in statements
            if s.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE")) and "LIMIT" not in s
        ]  # the probe (SELECT ... LIMIT <batch>) reads at most one batch of rows
        conn.set_trace_callback(None)
    store.close()
    assert written.joined == min(pending, batch)
    assert plans and not [p for p in plans if "SCAN predictions" in p], plans
    if pending >= batch:
        assert not [p for p in plans if "SCAN pending_labels" in p], plans


def test_gunzip_streams_with_a_cap() -> None:
    bomb = gzip.compress(b"0" * (8 << 20))
    assert len(bomb) < 20_000
    with pytest.raises(ValidationError) as info:
        gunzip(bomb, 1 << 20)
    assert info.value.reason == "too_large"
    assert gunzip(gzip.compress(b"x" * 1000), 1000) == b"x" * 1000


def test_structured_cloudevent_with_bad_base64_or_deep_json_is_a_validation_error() -> None:
    headers = {"content-type": "application/cloudevents+json"}
    for body in (
        orjson.dumps({"id": "1", "type": "t", "data_base64": "%%%"}),
        orjson.dumps({"id": "1", "type": "t", "data_base64": 5}),
        b"[" * 10_000 + b"]" * 10_000,
        b'{"id": "1", "type": "t", "data": ' + b"9" * 5000 + b"}",
    ):
        with pytest.raises(ValidationError):
            parse_cloudevent(headers, body)


def test_check_image_decodes_and_limits_pixels() -> None:
    assert check_image(png(), 100) == "png"
    for bad in (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"\xff\xd8\xff" + b"junk", b"GIF89a"):
        with pytest.raises(ValidationError):
            check_image(bad, 100)
    with pytest.raises(ValidationError) as info:
        check_image(png(20, 20), 100)
    assert info.value.reason == "too_large"


def test_inline_bytes_per_request_and_on_disk_are_bounded(pipeline: IngestPipeline) -> None:
    images = [png(2 + i, 2) for i in range(6)]
    records = [
        {"id": f"i{i}", "pred": 0, "input": {"base64": b64(im)}} for i, im in enumerate(images)
    ]
    planned: list[Any] = []
    budget = sum(len(im) for im in images[:4])
    checked = validate_each(
        records, pipeline.parser.planned, ("t", 1.0, planned), planned=planned,
        max_inline_bytes=budget,
    )  # fmt: skip
    assert [r.id for r in checked.rows] == ["i0", "i1", "i2", "i3"]
    assert [(e.index, e.reason) for e in checked.errors] == [(4, "too_large"), (5, "too_large")]
    assert len(checked.inline) == 4
    pipeline.parser.input_store.max_bytes = len(images[0]) - 1  # the directory cap
    result = pipeline.submit_predictions(records[:1] + [{"id": "plain", "pred": 0}], "t")
    assert [e.reason for e in result.rejected] == ["inputs_full"]
    assert ids(pipeline) == {"plain"} and inputs_on_disk(pipeline) == []


def test_host_allow_list_matches_the_whole_bracketed_host() -> None:
    app = create_app([], allowed_hosts=["[::1]", "localhost"], max_body_bytes=1024)

    @app.get("/v1/x")
    def x() -> dict[str, bool]:
        return {"ok": True}

    with TestClient(app) as client:
        for host, status in (
            ("[::1]", 200), ("[::1]:8321", 200), ("localhost:8321", 200),
            ("[::1]evil", 400), ("[::1]:80x", 400), ("[::1].evil.com", 400), ("[::1", 400),
        ):  # fmt: skip
            assert client.get("/v1/x", headers={"host": host}).status_code == status, host


def test_an_over_long_tail_line_is_one_rejection_naming_the_limit(
    pipeline: IngestPipeline, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from patchd.ingest.tailer import MAX_LINE_BYTES

    good = [orjson.dumps({"id": f"g{i}", "pred": 0}) + b"\n" for i in range(2)]
    long_line = b'{"id": "x", "pad": "' + b"a" * (5 * MAX_LINE_BYTES) + b'"}\n'
    (tmp_path / "logs" / "app.log").write_bytes(good[0] + long_line + good[1])
    cfg = pipeline.config
    tailer = Tailer(cfg.sources.tail[0], cfg, pipeline, pipeline.store)
    tailer._stored = tailer._load_offsets()
    for _ in range(8):
        tailer.poll_once()
    tailer._drain_inflight()
    assert ids(pipeline) == {"g0", "g1"}
    assert pipeline.stats.snapshot()[1][("jsonl", "too_large")] == 1
    warnings = [r.getMessage() for r in caplog.records if "bytes at offset" in r.getMessage()]
    assert len(warnings) == 1 and f"over {MAX_LINE_BYTES} bytes" in warnings[0]
    tailer.stop()
