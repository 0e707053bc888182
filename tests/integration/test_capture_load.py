"""Must-show: a FastAPI model server with the patchd middleware under load from a second process.

Timeline (wall clock; ~40 s of load and ~60 s in all on an idle 2-core machine):
  0-12 s  patchd up          the model server logs every prediction
  12 s    patchd stopping    SIGTERM: warm shutdown (flush, close)
  +8 s    patchd down        no patchd process at all
  then    patchd restarting  until its /readyz answers (~5 s idle; the process start is
                             CPU-bound and competes with the model server for the 2 cores)
  +8 s    patchd up again, then the load stops

What is asserted, exactly:
- every request the load generator made got 200 (the model server never failed or blocked);
- throughput while patchd was down is at least 0.6x the throughput while it was up, and the
  p99 latency at most 2x + 20 ms: loose bounds because other processes share the 2 cores (three
  runs at load average ~10 measured 0.75x, 1.02x and 0.72x). A client that waited on the dead
  patchd (timeouts, retries inside the request) would fail them; the per-call cost itself is
  measured by ``patchd bench client``, not here. Every window is printed
  (the restart window is reported, not bounded: it measures serve's start-up CPU, not the client);
- nothing is lost: the events logged while patchd was away were queued in the client
  (``max_queue`` 200k >> events during the outage) and retried with backoff; after the run the
  store holds exactly one row per request id the load generator sent, and the client reports 0
  dropped. (With a queue smaller than the outage, the excess is dropped and counted instead:
  ``tests/unit/test_capture_client.py::test_down_patchd_drops_when_full_then_delivers_the_backlog``.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.procs import TOKEN, start_serve

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
STOP_AT = 12.0
STOPPED_FOR = 8.0
AFTER_RESTART = 8.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_model_server(patchd_url: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = {**os.environ, "PATCHD_URL": patchd_url, "PATCHD_TOKEN": TOKEN}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "tests.capture_apps:app",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            cwd=ROOT,
            env=env,
            stdout=fh,
            stderr=fh,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/stats", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"model server did not start: {log.read_text()}")


def _window(records: list[list[Any]], start: float, end: float) -> dict[str, float]:
    inside = sorted(r[1] for r in records if start <= r[0] < end)
    span = end - start
    return {
        "requests": len(inside),
        "rps": len(inside) / span if span > 0 else 0.0,
        "p50_ms": inside[len(inside) // 2] * 1000,
        "p99_ms": inside[int(len(inside) * 0.99)] * 1000,
    }


def test_model_server_keeps_serving_and_loses_nothing(tmp_path: Path, redis_url: str) -> None:
    overrides = {
        "redis": {"url": redis_url, "embedded": "never"},
        "model": {"name": "m"},
        "groups": {"attributes": ["site"]},
    }
    serve = start_serve(tmp_path, overrides)
    model, model_url = _start_model_server(serve.url, tmp_path / "model.log")
    out, stop_file = tmp_path / "load.json", tmp_path / "stop-load"
    try:
        t0 = time.time()
        gen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.capture_apps",
                "loadgen",
                model_url,
                str(stop_file),
                "4",
                str(out),
            ],
            cwd=ROOT,
        )
        time.sleep(STOP_AT)
        down_at = time.time()
        assert serve.stop() == 0
        stopped_at = time.time()
        time.sleep(STOPPED_FOR)  # patchd fully down: no process at all
        restart_at = time.time()
        serve = start_serve(tmp_path, {}, config_path=serve.config_path)
        up_at = time.time()
        time.sleep(AFTER_RESTART)
        end = time.time()
        stop_file.touch()
        assert gen.wait(timeout=60) == 0
        flushed = httpx.post(model_url + "/flush", timeout=90).json()
    finally:
        model.send_signal(signal.SIGTERM)
        model.wait(timeout=30)
        serve.stop()
    records = json.loads(out.read_text())
    up = _window(records, t0 + 1.0, down_at)
    stopping = _window(records, down_at, stopped_at)
    down = _window(records, stopped_at, restart_at)
    restarting = _window(records, restart_at, up_at)
    after = _window(records, up_at, end)
    print(
        f"\nmodel server (t in s from load start):\n  up 1-{down_at - t0:.1f}: {up}"
        f"\n  patchd stopping {down_at - t0:.1f}-{stopped_at - t0:.1f}: {stopping}"
        f"\n  patchd down {stopped_at - t0:.1f}-{restart_at - t0:.1f}: {down}"
        f"\n  patchd restarting {restart_at - t0:.1f}-{up_at - t0:.1f}: {restarting}"
        f"\n  after restart {up_at - t0:.1f}-{end - t0:.1f}: {after}\n  client {flushed}"
    )

    assert {r[2] for r in records} == {200}, "the model server failed requests"
    assert down["requests"] > 100 and up["requests"] > 100
    assert down["rps"] >= 0.6 * up["rps"]
    assert down["p99_ms"] <= 2 * up["p99_ms"] + 20
    assert flushed["flushed"] and flushed["dropped_full"] == 0 and flushed["dropped_failed"] == 0

    db = sqlite3.connect(f"file:{serve.state_dir / 'patchd.db'}?mode=ro", uri=True)
    stored = {row[0] for row in db.execute("SELECT id FROM predictions WHERE model = 'm'")}
    sites = dict(db.execute("SELECT group_key, COUNT(*) FROM predictions GROUP BY group_key"))
    db.close()
    sent = {r[3] for r in records}
    assert stored == sent, f"missing {len(sent - stored)}, unexpected {len(stored - sent)}"
    assert sum(sites.values()) == len(records) and set(sites) == {"site=A", "site=B"}
