"""Ingest routes: ``POST /v1/predictions`` and ``POST /v1/labels`` (token scope ``ingest``).

Bodies are a JSON array, one JSON object, or NDJSON (``Content-Type: application/x-ndjson``).
The answer comes after the batch's transaction committed (acknowledged = durable)::

    200 {"accepted": 98, "duplicates": 1, "joined": 0, "pending": 0,
         "rejected": [{"index": 7, "reason": "missing_field", "message": "pred: is required"}]}

400 when the body is not JSON at all, 413 when too large (``api.max_body_bytes``) or holding more
than ``sources.max_events_per_request`` records (counted as ``too_many_events``), 429 +
Retry-After when the ingest queue is full, 503 + Retry-After while serve shuts down or when a disk
is full (nothing of the batch was written: retry it). Every other problem is a per-record
rejection in a 200 answer: ingest never answers 500.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from patchd.api.auth import require_scope
from patchd.exceptions import DiskFullError, StoreError
from patchd.ingest.pipeline import BatchResult, IngestPipeline, ShuttingDownError
from patchd.ingest.records import RecordError, split_body

HTTP_SOURCE = "http"


def ingest_router(pipeline: IngestPipeline) -> APIRouter:
    router = APIRouter(tags=["ingest"], dependencies=[Depends(require_scope("ingest"))])

    @router.post("/v1/predictions")
    async def post_predictions(request: Request) -> Response:
        return await _ingest(pipeline, request, labels=False)

    @router.post("/v1/labels")
    async def post_labels(request: Request) -> Response:
        return await _ingest(pipeline, request, labels=True)

    return router


async def _ingest(pipeline: IngestPipeline, request: Request, *, labels: bool) -> Response:
    body = await request.body()
    content_type = request.headers.get("content-type", "")
    try:
        future = await run_in_threadpool(_validate, pipeline, body, content_type, labels)
        if isinstance(future, RecordError):
            status = 413 if future.reason == "too_many_events" else 400
            return JSONResponse({"error": future.message, "reason": future.reason}, status)
        result = await asyncio.wrap_future(future)
    except (ShuttingDownError, DiskFullError, StoreError) as err:
        retry = "30" if isinstance(err, DiskFullError) else "5"
        body_json = {"error": str(err), "reason": "unavailable"}
        return JSONResponse(body_json, status_code=503, headers={"Retry-After": retry})
    return JSONResponse(result.to_json())


def _validate(
    pipeline: IngestPipeline, body: bytes, content_type: str, labels: bool
) -> Future[BatchResult] | RecordError:
    """The queued batch's future, or the one error that refuses the whole body (counted)."""
    containers, most = (
        body.count(b"[") + body.count(b"{"),
        pipeline.config.sources.max_json_containers,
    )
    if containers > most:
        message = (
            f"{containers} JSON arrays/objects in one body, over sources.max_json_containers={most}"
        )
        refused = RecordError(-1, "too_many_events", message)
        pipeline.stats.reject(HTTP_SOURCE, [refused])
        return refused
    records, errors = split_body(body, content_type)
    if errors and errors[0].index < 0:
        pipeline.stats.reject(HTTP_SOURCE, errors[:1])
        message = f"the body is not a JSON array, a JSON object or NDJSON ({errors[0].message})"
        return RecordError(-1, "malformed_json", message)
    limit = pipeline.config.sources.max_events_per_request
    if len(records) > limit:
        message = (
            f"{len(records)} records in one body, over sources.max_events_per_request={limit}; "
            "send smaller batches"
        )
        refused = RecordError(-1, "too_many_events", message)
        pipeline.stats.reject(HTTP_SOURCE, [refused])
        return refused
    if labels:
        return pipeline.labels_future(records, HTTP_SOURCE, errors=errors)
    return pipeline.predictions_future(records, HTTP_SOURCE, errors=errors)
