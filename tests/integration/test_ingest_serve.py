"""Real `patchd serve`: HTTP and a JSONL file rotated mid-stream, restarts, exact counts."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from patchd.runs.redis_embedded import answers
from tests import capture_payloads as cp
from tests.conftest import free_port
from tests.procs import PATCHD, TOKEN, ServeProcess, start_serve, write_config

pytestmark = pytest.mark.integration


def event(i: int | str, **extra: Any) -> dict[str, Any]:
    return {"id": f"{i}", "pred": 1, "probs": [0.2, 0.8], "groups": {"site": "A"}, **extra}


def jsonl(ids: range, prefix: str) -> bytes:
    return b"".join(orjson.dumps(event(f"{prefix}{i}")) + b"\n" for i in ids)


def status(serve: ServeProcess) -> dict[str, Any]:
    with serve.client() as c:
        return c.get("/v1/status").json()  # type: ignore[no-any-return]


def metric(serve: ServeProcess, sample: str) -> float:
    text = httpx.get(serve.url + "/metrics").text
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def wait_for(serve: ServeProcess, predictions: int, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = status(serve)
        if st["store"]["predictions"] >= predictions or time.monotonic() > deadline:
            return st
        time.sleep(0.1)


def overrides(tmp_path: Path) -> dict[str, Any]:
    return {
        "model": {"name": "model"},
        "groups": {"attributes": ["site"]},
        "sources": {
            "allowed_roots": [str(tmp_path / "logs"), str(tmp_path / "images")],
            "tail": [{"glob": str(tmp_path / "logs" / "app.log*"), "poll_interval_s": 0.05}],
        },
    }


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)


@pytest.mark.slow
def test_http_and_rotated_jsonl_survive_restarts_with_exact_counts(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    log = tmp_path / "logs" / "app.log"
    serve = start_serve(tmp_path, overrides(tmp_path))
    config_path = serve.config_path
    try:
        with serve.client() as c:
            for b in range(3):  # HTTP: acknowledged = committed
                r = c.post("/v1/predictions", json=[event(f"h{b}-{i}") for i in range(500)])
                assert r.json()["accepted"] == 500
        append(log, jsonl(range(0, 300), "t"))
        wait_for(serve, 1800)
        append(log, jsonl(range(300, 400), "t"))
        os.rename(log, tmp_path / "logs" / "app.log.1")  # rotation mid-stream
        append(log, jsonl(range(400, 600), "t"))
        last = orjson.dumps(event("t600")) + b"\n"
        append(log, last[:15])  # a partial last line
        st = wait_for(serve, 2100)
        assert st["store"]["predictions"] == 2100
    finally:
        assert serve.stop() == 0  # warm shutdown exits 0
    assert "warm shutdown" in serve.log()

    serve = start_serve(tmp_path, {}, config_path=config_path)
    try:
        append(log, last[15:] + jsonl(range(601, 650), "t"))
        st = wait_for(serve, 2150)
        assert st["store"]["predictions"] == 2150
        # nothing was read twice: after the restart the tailer counted only the 50 new lines
        assert metric(serve, 'patchd_predictions_ingested_total{source="jsonl"}') == 50
        assert metric(serve, 'patchd_ingest_rejected_total{reason="duplicate",source="jsonl"}') == 0
        with serve.client() as c:  # a re-sent HTTP batch is de-duplicated
            r = c.post("/v1/predictions", json=[event(f"h0-{i}") for i in range(500)])
            assert (r.json()["accepted"], r.json()["duplicates"]) == (0, 500)
            acked = 0
            for b in range(5):
                r = c.post("/v1/predictions", json=[event(f"k{b}-{i}") for i in range(200)])
                acked += r.json()["accepted"]
    finally:
        serve.stop(signal.SIGKILL)  # a crash right after the acknowledgements

    serve = start_serve(tmp_path, {}, config_path=config_path)
    try:
        time.sleep(0.5)  # give the tailer a chance to (wrongly) re-read
        st = status(serve)
        assert st["store"]["predictions"] == 2150 + acked == 3150
        assert metric(serve, 'patchd_predictions_ingested_total{source="jsonl"}') == 0
    finally:
        serve.stop()


@pytest.mark.slow
def test_bad_input_gets_clear_errors_and_valid_records_survive(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "ok.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    cfg = overrides(tmp_path)
    cfg["api"] = {"max_body_bytes": 65536}
    serve = start_serve(tmp_path, cfg)
    png = base64.b64encode(cp.PNG).decode()  # inline inputs must decode as an image
    try:
        with serve.client() as c:
            r = c.post("/v1/predictions", content=b'[{"id": "x", "pred": 1},')
            assert r.status_code == 400 and r.json()["reason"] == "malformed_json"
            r = c.post(
                "/v1/predictions",
                content=b"[" + b",".join([orjson.dumps(event("big"))] * 2000) + b"]",
            )
            assert r.status_code == 413
            batch = [
                event("ok1"),
                {"id": "nopred"},
                {"id": "wrongtype", "pred": "seven"},
                event("other", model="not-this-model"),
                event("ok1"),  # duplicate id
                event("trav1", input={"uri": f"file://{tmp_path}/images/../../etc/passwd"}),
                event("trav2", input=str(tmp_path / "logs" / ".." / ".." / "secret.png")),
                event("img", input={"uri": f"file://{tmp_path}/images/ok.png"}),
                event("inline", input={"base64": png}),
                event("early"),
            ]
            r = c.post("/v1/labels", json=[{"id": "early", "label": 0}])  # label before prediction
            assert (r.json()["joined"], r.json()["pending"]) == (0, 1)
            r = c.post("/v1/predictions", json=batch).json()
            assert (r["accepted"], r["duplicates"]) == (4, 1)
            reasons = {e["index"]: e["reason"] for e in r["rejected"]}
            assert reasons == {
                1: "missing_field",
                2: "invalid_value",
                3: "unknown_model",
                5: "path_not_allowed",
                6: "path_not_allowed",
            }
            assert all(e["message"] for e in r["rejected"])
            r = c.post(
                "/v1/labels", content=b'{"id": "ok1", "label": 1}\n{"id": 5, "label": "x"}\n'
            )
            assert (r.json()["joined"], len(r.json()["rejected"])) == (1, 1)
            assert (
                c.post(
                    "/v1/predictions", json=[], headers={"Authorization": "Bearer nope"}
                ).status_code
                == 401
            )
        st = status(serve)
        assert st["store"] == {**st["store"], "predictions": 4, "labeled": 2, "pending_labels": 0}
        assert metric(serve, "patchd_labels_joined_total") == 2
        assert (
            metric(serve, 'patchd_ingest_rejected_total{reason="path_not_allowed",source="http"}')
            == 2
        )
        inputs = list((serve.state_dir / "artifacts" / "inputs").glob("*.png"))
        assert len(inputs) == 1
    finally:
        serve.stop()


@pytest.mark.slow
def test_backfill_cli_embedded_redis_cold_stop_and_config_errors(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    redis_port = free_port()  # nothing answers there: serve starts its own redis-server
    redis_cfg = {"url": f"redis://127.0.0.1:{redis_port}/0", "embedded": "auto"}
    serve = start_serve(tmp_path, {"model": {"name": "model"}, "redis": redis_cfg})
    try:
        assert answers("127.0.0.1", redis_port)
        assert status(serve)["redis_url"] == redis_cfg["url"]
        data = tmp_path / "backfill.jsonl"
        data.write_bytes(jsonl(range(120), "b") + b"{broken\n" + jsonl(range(5), "b"))
        env = {**os.environ, "PATCHD_TOKEN": TOKEN}
        out = subprocess.run(
            [PATCHD, "ingest", "-c", str(serve.config_path), str(data), "--batch", "50"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert "120 accepted, 5 duplicates, 1 rejected" in out.stdout
        assert "line 121: malformed_json" in out.stdout
        assert status(serve)["store"]["predictions"] == 120
        serve.proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        serve.proc.send_signal(signal.SIGTERM)  # the second signal: cold shutdown
        assert serve.proc.wait(30) == 0
        assert "cold shutdown" in serve.log()
        assert not answers("127.0.0.1", redis_port)  # the embedded redis stopped with serve
    finally:
        serve.stop()
    (tmp_path / "bad").mkdir()
    tail = {"allowed_roots": [str(tmp_path / "logs")], "tail": [{"glob": "/etc/*.conf"}]}
    bad = write_config(tmp_path / "bad", {"sources": tail})
    out = subprocess.run(
        [PATCHD, "serve", "-c", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1
    assert "outside sources.allowed_roots" in out.stderr and "Traceback" not in out.stderr
