"""Status routes: ``GET /v1/status`` (scope ``read``), open ``/healthz`` and ``/readyz``.

``/healthz`` is 200 while the process runs its loop (liveness); ``/readyz`` is 200 only in the
``running`` state (the store is open, components started, intake accepting) and 503 otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from patchd.api.auth import require_scope


def status_router(state: Callable[[], str], snapshot: Callable[[], dict[str, Any]]) -> APIRouter:
    """The routes over the daemon's run state (``state()``) and status document (``snapshot()``)."""
    router = APIRouter(tags=["status"])

    @router.get("/healthz")
    async def healthz() -> JSONResponse:
        alive = state() not in ("stopped",)
        return JSONResponse(
            {"status": "ok" if alive else "stopped"}, status_code=200 if alive else 503
        )

    @router.get("/readyz")
    async def readyz() -> JSONResponse:
        ready = state() == "running"
        return JSONResponse({"state": state()}, status_code=200 if ready else 503)

    @router.get("/v1/status", dependencies=[Depends(require_scope("read"))])
    async def status() -> dict[str, Any]:
        return await run_in_threadpool(snapshot)

    return router
