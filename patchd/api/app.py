"""The FastAPI application of ``patchd serve``: hardening middleware plus every part's routers.

- Host allow-list (``api.allowed_hosts``; guards against DNS rebinding): other Hosts get 400.
  The open, read-only probes (``/metrics``, ``/healthz``, ``/readyz``) answer any Host, because
  Prometheus and kubelet probes address the pod by its IP.
- Body size limit (``api.max_body_bytes``): 413, checked on Content-Length and while streaming.
- Routers: ingest and status (this package), then each component's ``routers()``.
- Errors: :class:`~patchd.exceptions.PatchdError` subclasses map to JSON errors with a status.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from patchd.api.metrics import patchd_version
from patchd.exceptions import (
    ConflictError,
    NotFoundError,
    NotLeaderError,
    PatchdError,
    QueueFullError,
    ValidationError,
)

OPEN_PROBES = frozenset({"/metrics", "/healthz", "/readyz"})


class HostAllowListMiddleware:
    """Answer 400 to requests whose Host header (port stripped) is not allow-listed."""

    def __init__(self, app: ASGIApp, allowed: Sequence[str]) -> None:
        self.app = app
        self.allowed = frozenset(h.lower() for h in allowed)
        self.any = "*" in self.allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.any and scope["path"] not in OPEN_PROBES:
            host = _host(scope)
            if host not in self.allowed:
                response = JSONResponse({"error": f"host {host!r} is not allowed"}, status_code=400)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _host(scope: Scope) -> str:
    for key, value in scope.get("headers", ()):
        if key == b"host":
            text = value.decode("latin-1").lower()
            if text.startswith("["):  # [::1]:8321; "[::1]evil" is not [::1]
                end = text.find("]") + 1
                rest = text[end:]
                ok = end > 0 and (not rest or (rest[0] == ":" and rest[1:].isdigit()))
                return text[:end] if ok else text
            return text.rsplit(":", 1)[0] if text.count(":") == 1 else text
    return ""


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 when a request body exceeds ``limit`` bytes (declared or streamed)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", ()):
            if key == b"content-length" and value.isdigit() and int(value) > self.limit:
                await self._reject(scope, receive, send)
                return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except BodyTooLarge:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body over {self.limit} bytes; send smaller batches (api.max_body_bytes)"
        await JSONResponse({"error": message, "reason": "too_large"}, status_code=413)(
            scope, receive, send
        )


_STATUS: tuple[tuple[type[PatchdError], int], ...] = (
    (QueueFullError, 429),
    (NotFoundError, 404),
    (ConflictError, 409),
    (ValidationError, 422),
)


async def _patchd_error(request: Request, exc: Exception) -> JSONResponse:
    status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 503)
    body: dict[str, Any] = {"error": str(exc), "type": type(exc).__name__}
    headers = {}
    if isinstance(exc, QueueFullError):
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    if isinstance(exc, ValidationError):
        body["reason"] = exc.reason
    if isinstance(exc, NotLeaderError):
        body.update(reason="not_leader", leader=exc.leader, leader_url=exc.leader_url)
        headers["Retry-After"] = "1"
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(
    routers: Sequence[APIRouter],
    *,
    allowed_hosts: Sequence[str],
    max_body_bytes: int,
    state: dict[str, Any] | None = None,
    middleware: Sequence[tuple[Any, dict[str, Any]]] = (),
) -> FastAPI:
    """Build the app; ``state`` items are set on ``app.state`` (tokens, services, daemon);
    ``middleware`` (class, options) runs inside the Host check and the body limit."""
    app = FastAPI(title="patchd", version=patchd_version(), docs_url="/docs", redoc_url=None)
    for key, value in (state or {}).items():
        setattr(app.state, key, value)
    app.add_exception_handler(PatchdError, _patchd_error)
    for router in routers:
        app.include_router(router)
    for cls, options in middleware:
        app.add_middleware(cls, **options)
    # Added last = outermost: the Host check runs before anything reads the body.
    app.add_middleware(BodyLimitMiddleware, limit=max_body_bytes)
    app.add_middleware(HostAllowListMiddleware, allowed=list(allowed_hosts))
    return app
