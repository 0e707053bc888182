"""Operating serve itself (``admin`` scope): ``POST /v1/config/reload``.

The route re-reads the configuration file serve was started with and applies what is safe to
change while running (the monitor's thresholds, the gate); the answer lists what was applied
and what changed but needs a restart. An invalid file is refused with 400 and its errors, and
the running configuration stays as it was. ``SIGHUP`` to ``patchd serve`` does the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, HTTPException

from patchd.api.auth import Principal, require_scope
from patchd.exceptions import ConfigError


def admin_router(reload: Callable[[str], dict[str, Any]]) -> APIRouter:
    """``reload(who)`` re-reads the config and returns what happened (ConfigError: refused)."""
    router = APIRouter(prefix="/v1", tags=["admin"])
    admin = require_scope("admin")

    @router.post("/config/reload")
    def reload_config(who: Principal = Depends(admin)) -> dict[str, Any]:
        try:
            return reload(who.name)
        except ConfigError as err:
            message = f"configuration not reloaded, the running one is kept: {err}"
            raise HTTPException(400, message) from None

    return router
