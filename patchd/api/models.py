"""Model-scoped routes when one serve watches several models (``models:`` in the config).

Each per-model component's routes are served again under ``/v1/models/<model>/...``
(``/v1/groups`` -> ``/v1/models/skin/groups``). With one model the unprefixed routes stay what
they were. With several, :class:`ModelDispatch` sends an unprefixed model-scoped request to its
model's route when the request names the model: a ``model`` query parameter, the run or
candidate its path names (``/v1/runs/{run_id}``...: ids are unique across models), or a
``model`` field in a small JSON body (``POST /v1/runs``, ``/v1/rollback``); one that names none
answers 400 naming the models. A ``/v1/models/<name>/...`` path of a name no model has answers
404 naming the configured ones. ``GET /v1/models`` lists them.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Sequence
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from patchd.api.auth import require_scope
from patchd.api.client import scoped_path

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


def scoped_router(model: str, routers: Sequence[APIRouter]) -> APIRouter:
    """The routes of ``routers`` (one model's components) under ``/v1/models/<model>/``."""
    out = APIRouter()
    for router in routers:
        for route in router.routes:
            if not isinstance(route, APIRoute):
                continue
            moved = copy.copy(route)
            moved.path = scoped_path(model, route.path)
            moved.path_regex, moved.path_format, moved.param_convertors = compile_path(moved.path)
            out.routes.append(moved)
    return out


def models_router(names: Sequence[str], unscoped: Sequence[APIRoute]) -> APIRouter:
    """``GET /v1/models``, the 404 of an unknown model, and (several models) the 400 of the
    unprefixed model-scoped routes in ``unscoped``. Include it after the scoped routers."""
    router = APIRouter(tags=["models"])
    listed = ", ".join(names)
    # these answers name the models: only to a caller that may read
    read = [Depends(require_scope("read"))]

    @router.get("/v1/models", dependencies=read)
    def models() -> dict[str, list[str]]:
        return {"models": list(names)}

    @router.api_route(
        "/v1/models/{model}/{rest:path}",
        methods=METHODS,
        include_in_schema=False,
        dependencies=read,
    )
    def unknown(model: str, rest: str) -> JSONResponse:
        if model in names:
            return JSONResponse(
                {"error": f"no route /v1/{rest} for model {model!r}"}, status_code=404
            )
        return JSONResponse(
            {
                "error": f"unknown model {model[:64]!r}: this serve watches {listed}",
                "type": "NotFoundError",
                "models": list(names),
            },
            status_code=404,
        )

    def several() -> JSONResponse:
        return JSONResponse(
            {
                "error": f"several models are configured ({listed}): use "
                "/v1/models/<model>/..., ?model=<model>, or --model with the CLI",
                "type": "ConfigError",
                "models": list(names),
            },
            status_code=400,
        )

    for route in unscoped:
        router.add_api_route(
            route.path,
            several,
            methods=sorted(route.methods or ()),
            include_in_schema=False,
            dependencies=read,
        )
    return router


def model_scoped_routes(routers: Sequence[APIRouter]) -> list[APIRoute]:
    return [r for router in routers for r in router.routes if isinstance(r, APIRoute)]


# path parameters that name a record of one model, and the kind the resolver is asked for
ID_PARAMS = {"run_id": "run", "candidate_id": "candidate"}
MAX_PEEK_BYTES = 64 << 10  # a body read for its `model` field is at most this (else: not read)


class ModelDispatch:
    """ASGI middleware (several models): an unprefixed model-scoped request that names its model
    goes to ``/v1/models/<model>/...`` (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        routes: Sequence[APIRoute],
        resolve: Callable[[str, str], str | None],
    ) -> None:
        self.app = app
        self.routes = [(r.path_regex, set(r.methods or ())) for r in routes]
        self.resolve = resolve  # (kind, id) -> the model of that run / candidate, or None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/v1/models/"):
            await self.app(scope, receive, send)
            return
        match = self._match(scope)
        if match is None:
            await self.app(scope, receive, send)
            return
        model = self._from_query(scope) or self._from_path(match)
        if model is None and scope["method"] == "POST":
            body, receive = await _peek(scope, receive)
            model = _from_body(body)
        if model is None:
            await self.app(scope, receive, send)  # the 400 that names the models
            return
        path = scoped_path(model, scope["path"])
        await self.app({**scope, "path": path, "raw_path": path.encode()}, receive, send)

    def _match(self, scope: Scope) -> re.Match[str] | None:
        for regex, methods in self.routes:
            found = regex.match(scope["path"])
            if found is not None and scope["method"] in methods:
                return found
        return None

    @staticmethod
    def _from_query(scope: Scope) -> str | None:
        values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("model")
        return values[0] if values else None

    def _from_path(self, match: re.Match[str]) -> str | None:
        for param, kind in ID_PARAMS.items():
            ident = match.groupdict().get(param)
            if ident:
                return self.resolve(kind, ident)
        return None


async def _peek(scope: Scope, receive: Receive) -> tuple[bytes, Receive]:
    """The body (when small and JSON) and a ``receive`` that hands it on unchanged."""
    headers = dict(scope.get("headers") or [])
    length = headers.get(b"content-length", b"")
    json_body = headers.get(b"content-type", b"").startswith(b"application/json")
    if not json_body or not length.isdigit() or int(length) > MAX_PEEK_BYTES:
        return b"", receive
    messages: list[Message] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request" or not message.get("more_body", False):
            break
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")

    async def replay() -> Message:
        return messages.pop(0) if messages else await receive()

    return body, replay


def _from_body(body: bytes) -> str | None:
    try:
        doc = json.loads(body) if body else None
    except ValueError:
        return None
    model = doc.get("model") if isinstance(doc, dict) else None
    return model if isinstance(model, str) and model else None
