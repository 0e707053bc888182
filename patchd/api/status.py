"""Status routes: ``GET /v1/status`` (scope ``read``), open ``/healthz`` and ``/readyz``.

``/healthz`` is 200 while the process runs its loop (liveness); ``/readyz`` is 200 only in the
``running`` state (the store is open, components started, intake accepting) and 503 otherwise.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from patchd.auth import require_scope
from patchd.exporter import patchd_version
from patchd.store.events import count_pending, count_predictions

if TYPE_CHECKING:
    from patchd.daemon import Daemon


def status_router(daemon: Daemon) -> APIRouter:
    router = APIRouter(tags=["status"])

    @router.get("/healthz")
    async def healthz() -> JSONResponse:
        alive = daemon.state.value not in ("stopped",)
        return JSONResponse(
            {"status": "ok" if alive else "stopped"}, status_code=200 if alive else 503
        )

    @router.get("/readyz")
    async def readyz() -> JSONResponse:
        ready = daemon.state.value == "running"
        return JSONResponse({"state": daemon.state.value}, status_code=200 if ready else 503)

    @router.get("/v1/status", dependencies=[Depends(require_scope("read"))])
    async def status() -> dict[str, Any]:
        return await run_in_threadpool(status_snapshot, daemon)

    return router


def status_snapshot(daemon: Daemon) -> dict[str, Any]:
    services = daemon.services
    config = services.config
    with services.store.read() as conn:
        stored, labeled = count_predictions(conn, config.model.name)
        pending = count_pending(conn)
    ingested, rejected, joined = services.ingest.stats.snapshot()
    return {
        "version": patchd_version(),
        "state": daemon.state.value,
        "uptime_s": round(time.monotonic() - daemon.started_monotonic, 3),
        "model": config.model.name,
        "store": {
            "path": str(services.store.path),
            "predictions": stored,
            "labeled": labeled,
            "pending_labels": pending,
        },
        "ingest": {
            "queued": services.ingest.queued,
            "ingested": ingested,
            "rejected": {f"{s}/{r}": n for (s, r), n in sorted(rejected.items())},
            "labels_joined": joined,
        },
        "sources": [t.status() for t in daemon.tailers],
        "redis_url": services.redis_url,
        "components": sorted(services.components),
    }
