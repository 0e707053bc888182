"""Processes for the capture load test: a FastAPI model server with the patchd middleware, and a
load generator (closed loop, keep-alive connections, one thread per connection).

    python -m uvicorn tests.capture_apps:app --port P      # env PATCHD_URL, PATCHD_TOKEN
    python -m tests.capture_apps loadgen URL STOP_FILE THREADS OUT.json  # until STOP_FILE
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import threading
import time
from dataclasses import asdict
from typing import Any
from urllib.parse import urlsplit


def build_app() -> Any:
    from fastapi import FastAPI

    from patchd.plugins.serving.asgi import PatchdMiddleware
    from patchd.plugins.serving.client import PatchdLogger

    logger = PatchdLogger(
        os.environ["PATCHD_URL"],
        token=os.environ.get("PATCHD_TOKEN"),
        max_queue=int(os.environ.get("PATCHD_MAX_QUEUE", "200000")),
        max_backoff_s=0.5,
    )
    api = FastAPI()

    @api.post("/predict")
    async def predict(payload: dict[str, Any]) -> dict[str, Any]:
        p = (hash(payload.get("x", 0)) % 100) / 100.0
        return {"pred": int(p > 0.5), "probs": [1.0 - p, p]}

    @api.get("/stats")
    async def stats() -> dict[str, Any]:
        return asdict(logger.stats())

    @api.post("/flush")
    def flush() -> dict[str, Any]:
        return {"flushed": logger.flush(60), **asdict(logger.stats())}

    api.add_middleware(PatchdMiddleware, logger=logger, paths=("/predict",))
    return api


def loadgen(url: str, stop_file: str, threads: int, out: str) -> None:
    """Closed-loop load until ``stop_file`` exists (checked every 0.1 s; at most 300 s);
    writes per-request (start wall time, latency s, status, id)."""
    parts = urlsplit(url)
    results: list[list[tuple[float, float, int, str]]] = [[] for _ in range(threads)]
    stop = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + 300
        while not os.path.exists(stop_file) and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()

    def worker(k: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        n = 0
        while not stop.is_set():
            rid = f"L{k}-{n}"
            body = json.dumps({"x": n}).encode()
            headers = {
                "Content-Type": "application/json",
                "x-request-id": rid,
                "x-patchd-group-site": "AB"[n % 2],
            }
            t0 = time.time()
            try:
                conn.request("POST", "/predict", body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
                status = 0
            results[k].append((t0, time.time() - t0, status, rid))
            n += 1

    threading.Thread(target=watch, daemon=True).start()
    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    with open(out, "w") as fh:
        json.dump([r for rs in results for r in rs], fh)


if __name__ == "__main__" and sys.argv[1:2] == ["loadgen"]:
    loadgen(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
elif os.environ.get("PATCHD_URL"):  # imported by uvicorn as tests.capture_apps:app
    app = build_app()
