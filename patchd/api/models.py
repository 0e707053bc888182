"""Model-scoped routes when one serve watches several models (``models:`` in the config).

Each per-model component's routes are served again under ``/v1/models/<model>/...``
(``/v1/groups`` -> ``/v1/models/skin/groups``). With several models the unprefixed form of a
model-scoped route answers 400 naming the models (it cannot know which one is meant), and a
``/v1/models/<name>/...`` path of a name no model has answers 404 naming the configured ones.
``GET /v1/models`` lists them. With one model the unprefixed routes stay what they were.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.routing import compile_path

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
                "/v1/models/<model>/... (or --model with the CLI)",
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
