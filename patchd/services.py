"""The shared context of ``patchd serve``: built once by the daemon and handed to every part."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from patchd.exceptions import NotFoundError

if TYPE_CHECKING:
    from apscheduler.schedulers.background import BackgroundScheduler
    from prometheus_client import CollectorRegistry

    from patchd.abc import Component
    from patchd.config import Config
    from patchd.domain import EventBus
    from patchd.ingest import IngestPipeline
    from patchd.store.db import Store

C = TypeVar("C", bound="Component")


@dataclass
class Services:
    config: Config
    store: Store
    bus: EventBus
    metrics: CollectorRegistry
    scheduler: BackgroundScheduler
    redis_url: str
    # always set by the daemon; a narrow unit test may leave it out
    ingest: IngestPipeline = field(default=None)  # type: ignore[assignment]
    components: dict[str, Component] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def component(self, name: str, kind: type[C]) -> C:
        found = self.components.get(name)
        if not isinstance(found, kind):
            raise NotFoundError("component", name)
        return found
