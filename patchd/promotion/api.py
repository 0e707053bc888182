"""HTTP routes of candidates, approvals and rollback.

Reads (``read`` scope): ``GET /v1/candidates``, ``/v1/candidates/{id}``,
``/v1/candidates/{id}/report`` (HTML; ``?format=json`` for the JSON report),
``GET /v1/production`` (the pointer of every model).
Actions (``approve`` scope): ``POST /v1/candidates/{id}/approve`` with ``{"digest": ...}``,
``/v1/candidates/{id}/reject``, ``POST /v1/rollback``, and ``POST /v1/candidates`` to (re-)gate a
finished run by id. A decision's optional ``by`` names the person; the audit log and the
candidate record then say ``"<by> (token <token name>)"``. Errors: 404 unknown candidate, 409
wrong state / stale digest / expired.
Handlers are plain ``def``: they block on the decision lock and fsync, in the thread pool.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, Query
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field

from patchd.api.auth import Principal, require_scope
from patchd.promotion.audit import PERSON_PATTERN, actor_name
from patchd.promotion.record import Candidate
from patchd.promotion.registry import Registry
from patchd.promotion.report.candidate import CandidateReport


class CandidatesService(Protocol):
    """What the routes need of the candidates component."""

    registry: Registry

    def list(
        self, model: str | None = None, state: str | None = None, limit: int = 100
    ) -> list[Candidate]: ...

    def get(self, candidate_id: str) -> Candidate: ...

    def report(self, candidate_id: str) -> CandidateReport: ...

    def evaluate_run(self, run_id: str, model: str) -> Candidate: ...

    def approve(
        self, candidate_id: str, digest: str, actor: str, comment: str = ""
    ) -> Candidate: ...

    def reject(self, candidate_id: str, actor: str, reason: str = "") -> Candidate: ...

    def rollback(self, model: str, actor: str, digest: str | None = None) -> str: ...


# the person deciding (``patchd approve --by``); recorded with the token's name
Person = Annotated[str, Field(pattern=PERSON_PATTERN)]


class ApproveBody(BaseModel):
    digest: str = Field(..., min_length=1, max_length=128)
    comment: str = Field("", max_length=1000)
    by: Person | None = None


class RejectBody(BaseModel):
    reason: str = Field("", max_length=1000)
    by: Person | None = None


class RollbackBody(BaseModel):
    model: str | None = None  # default: the configured model
    digest: str | None = Field(None, max_length=128)  # must be the current production when given
    by: Person | None = None


class EvaluateBody(BaseModel):
    run_id: str = Field(..., min_length=1, max_length=128)
    model: str | None = None


def build_router(component: CandidatesService, default_model: str) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["candidates"])
    read = Depends(require_scope("read"))
    approve = require_scope("approve")

    @router.get("/candidates", dependencies=[read])
    def list_candidates(
        model: str | None = None, state: str | None = None, limit: int = Query(100, ge=1, le=1000)
    ) -> dict[str, Any]:
        return {"candidates": [c.to_dict() for c in component.list(model, state, limit)]}

    @router.get("/candidates/{candidate_id}", dependencies=[read])
    def get_candidate(candidate_id: str) -> dict[str, Any]:
        return component.get(candidate_id).to_dict()

    @router.get("/candidates/{candidate_id}/report", dependencies=[read])
    def report(candidate_id: str, format: str = Query("html", pattern="^(html|json)$")) -> Response:
        from patchd.promotion.report import render_html

        rep = component.report(candidate_id)
        if format == "json":
            return Response(rep.to_json(), media_type="application/json")
        return HTMLResponse(render_html(rep), headers={"Content-Security-Policy": _CSP})

    @router.post("/candidates", status_code=201)
    def evaluate(body: EvaluateBody, who: Principal = Depends(approve)) -> dict[str, Any]:
        return component.evaluate_run(body.run_id, body.model or default_model).to_dict()

    @router.post("/candidates/{candidate_id}/approve")
    def approve_candidate(
        candidate_id: str, body: ApproveBody, who: Principal = Depends(approve)
    ) -> dict[str, Any]:
        actor = actor_name(who.name, body.by)
        return component.approve(candidate_id, body.digest, actor, body.comment).to_dict()

    @router.post("/candidates/{candidate_id}/reject")
    def reject_candidate(
        candidate_id: str, body: RejectBody | None = None, who: Principal = Depends(approve)
    ) -> dict[str, Any]:
        reason = body.reason if body else ""
        actor = actor_name(who.name, body.by if body else None)
        return component.reject(candidate_id, actor, reason).to_dict()

    @router.post("/rollback")
    def rollback(body: RollbackBody | None = None, who: Principal = Depends(approve)) -> dict:
        model = (body.model if body else None) or default_model
        actor = actor_name(who.name, body.by if body else None)
        digest = component.rollback(model, actor, body.digest if body else None)
        return {"model": model, "production": digest}

    @router.get("/production", dependencies=[read])
    def production() -> dict[str, Any]:
        out = {}
        for model in component.registry.models():
            pointer = component.registry.pointer(model)
            out[model] = asdict(pointer) if pointer else None
        return {"production": out}

    return router


# The report is self-contained: inline CSS and data-URI images only, no scripts.
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'"
