"""HTTP routes of patch runs: ``GET /v1/runs``, ``GET /v1/runs/{id}``, ``POST /v1/runs``,
``POST /v1/runs/{id}/cancel``, ``POST /v1/runs/{id}/resume`` (a run awaiting region labels goes on
to train; who resumed it is recorded). Reads need the ``read`` scope, actions the ``approve`` scope.
"""

from __future__ import annotations

from typing import Any, Protocol

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, Field

from patchd.api.auth import Principal, require_scope
from patchd.exceptions import (
    ConfigError,
    ConflictError,
    NotFoundError,
    PluginError,
    ValidationError,
)
from patchd.runs.records import RunRecord


class RunsService(Protocol):
    """What the routes need of the runs component."""

    @property
    def model_name(self) -> str: ...

    def list(self, model: str | None = None, limit: int = 50) -> list[RunRecord]: ...

    def get(self, run_id: str) -> RunRecord: ...

    def request_run(
        self, model: str, reason: str, recipe: dict[str, Any] | None = None
    ) -> RunRecord | None: ...

    def cancel(self, run_id: str) -> RunRecord: ...

    def resume(self, run_id: str, by: str) -> RunRecord: ...


class RunRequest(BaseModel):
    model: str | None = None  # default: the configured model
    reason: str = Field("manual", max_length=500)
    recipe: dict[str, Any] | None = (
        None  # overrides: miner, augmenter, trainer, budget, params, seed
    )


def _http(err: Exception) -> HTTPException:
    if isinstance(err, NotFoundError):
        return HTTPException(404, str(err))
    if isinstance(err, ConflictError):
        return HTTPException(409, str(err))
    return HTTPException(400, str(err))


def build_router(runs: RunsService) -> APIRouter:
    router = APIRouter(prefix="/v1/runs", tags=["runs"])
    read = Depends(require_scope("read"))
    approve = require_scope("approve")

    @router.get("", dependencies=[read])
    def list_runs(
        model: str | None = None, limit: int = Query(50, ge=1, le=1000)
    ) -> dict[str, Any]:
        return {"runs": [r.to_dict() for r in runs.list(model, limit)]}

    @router.get("/{run_id}", dependencies=[read])
    def get_run(run_id: str) -> dict[str, Any]:
        try:
            return runs.get(run_id).to_dict()
        except NotFoundError as err:
            raise _http(err) from None

    @router.post("", status_code=201)
    def trigger(body: RunRequest, who: Principal = Depends(approve)) -> dict[str, Any]:
        model = body.model or runs.model_name
        reason = f"{body.reason} (by {who.name})"
        try:
            rec = runs.request_run(model, reason, body.recipe)
        except (NotFoundError, ValidationError, PluginError, ConfigError) as err:
            raise _http(err) from None
        if rec is None:
            open_ids = [r.id for r in runs.list(model, 10) if r.open]
            raise HTTPException(409, f"a run is already open for {model!r}: {open_ids}")
        return rec.to_dict()

    @router.post("/{run_id}/cancel")
    def cancel(run_id: str, who: Principal = Depends(approve)) -> dict[str, Any]:
        try:
            return runs.cancel(run_id).to_dict()
        except (NotFoundError, ConflictError) as err:
            raise _http(err) from None

    @router.post("/{run_id}/resume")
    def resume(run_id: str, who: Principal = Depends(approve)) -> dict[str, Any]:
        try:
            return runs.resume(run_id, who.name).to_dict()
        except (NotFoundError, ConflictError, ValidationError) as err:
            raise _http(err) from None

    return router
