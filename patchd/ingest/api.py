"""Ingest routes: ``POST /v1/predictions`` and ``POST /v1/labels`` (token scope ``ingest``).

Bodies are a JSON array, one JSON object, or NDJSON (``Content-Type: application/x-ndjson``).
The answer comes after the batch's transaction committed (acknowledged = durable)::

    200 {"accepted": 98, "duplicates": 1, "joined": 0, "pending": 0,
         "rejected": [{"index": 7, "reason": "missing_field", "message": "pred: is required"}]}

400 when the body is not JSON at all, 413 when too large, 429 + Retry-After when the ingest queue
is full, 503 while serve shuts down.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from patchd.api.auth import require_scope
from patchd.ingest.pipeline import BatchResult, IngestPipeline, ShuttingDownError
from patchd.ingest.records import split_body

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
    except ShuttingDownError as err:
        return JSONResponse({"error": str(err)}, status_code=503, headers={"Retry-After": "5"})
    if future is None:
        message = "the body is not a JSON array, a JSON object or NDJSON"
        return JSONResponse({"error": message, "reason": "malformed_json"}, status_code=400)
    result = await asyncio.wrap_future(future)
    return JSONResponse(result.to_json())


def _validate(
    pipeline: IngestPipeline, body: bytes, content_type: str, labels: bool
) -> Future[BatchResult] | None:
    records, errors = split_body(body, content_type)
    if errors and errors[0].index < 0:
        pipeline.stats.reject(HTTP_SOURCE, errors)
        return None
    if labels:
        return pipeline.labels_future(records, HTTP_SOURCE, errors=errors)
    return pipeline.predictions_future(records, HTTP_SOURCE, errors=errors)
