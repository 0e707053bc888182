"""The approval pages as a serve component: off unless ``ui.enabled``.

Finds the monitor, runs and candidates components by name when a page is asked for (so the order
of :data:`patchd.daemon.COMPONENTS` does not matter and a serve without the runs component still
shows candidates), owns the login sessions and the Jinja2 environment.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cache
from typing import TYPE_CHECKING

from patchd.exceptions import NotFoundError
from patchd.monitor.component import MonitorComponent
from patchd.promotion.component import CandidatesComponent
from patchd.runs.artifacts import RunArtifacts
from patchd.runs.component import RunsComponent
from patchd.services import Component, Services
from patchd.ui.session import SessionStore, origin_of

if TYPE_CHECKING:
    from fastapi import APIRouter
    from jinja2 import Environment

    from patchd.config import MonitorConfig

log = logging.getLogger(__name__)


@cache
def _environment() -> Environment:
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(
        loader=PackageLoader("patchd.ui", "templates"),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env


class UiComponent(Component):
    name = "ui"

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        config = services.config
        self.settings = config.ui
        # several models: every page covers all of them (lists carry a model column, a
        # candidate's or run's page is its model's); ``model_name`` is the first, the default
        self.model_names = config.model_names
        self.model_name = self.model_names[0]
        self.artifacts_root = config.artifacts_root
        self.artifacts = RunArtifacts.from_config(config)  # fetches regions from a bucket
        self.sessions = SessionStore(config.ui.session_ttl_s)
        self.allowed_origins = origin_of(config.ui.public_url)

    def routers(self) -> Sequence[APIRouter]:
        if not self.settings.enabled:
            return ()
        from patchd.ui.routes import build_router

        return (build_router(self),)

    def start(self) -> None:
        if self.settings.enabled:
            api = self.services.config.api
            url = self.settings.public_url or f"http://{api.host}:{api.port}"
            log.info("approval pages at %s/ui (log in with a read or approve token)", url)

    def templates(self) -> Environment:
        return _environment()

    def monitor_config_of(self, model: str) -> MonitorConfig:
        return self.services.config.for_model(model).monitor

    def class_names_of(self, model: str) -> tuple[str, ...]:
        return tuple(self.services.config.for_model(model).model.class_names or ())

    def candidates(self, model: str | None = None) -> CandidatesComponent:
        name = model or self.model_name
        return self.services.component_for("candidates", name, CandidatesComponent)

    def runs(self, model: str | None = None) -> RunsComponent | None:
        try:
            return self.services.component_for("runs", model or self.model_name, RunsComponent)
        except NotFoundError:
            return None

    def monitor(self, model: str | None = None) -> MonitorComponent | None:
        name = model or self.model_name
        try:
            return self.services.component_for("monitor", name, MonitorComponent)
        except NotFoundError:
            return None
