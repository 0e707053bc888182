"""How ``patchd serve`` is composed: the shared :class:`Services` and the :class:`Component` base.

The daemon builds one :class:`Services` and hands it to every component (monitor, runs,
candidates, source adapters); components find each other by name through
:meth:`Services.component`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from patchd.exceptions import NotFoundError
from patchd.leader import Leadership

if TYPE_CHECKING:
    from apscheduler.schedulers.background import BackgroundScheduler
    from fastapi import APIRouter
    from prometheus_client import CollectorRegistry
    from prometheus_client.registry import Collector

    from patchd.config import Config
    from patchd.domain import EventBus
    from patchd.ingest.pipeline import IngestPipeline
    from patchd.store.backend import Store

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
    # wall-clock seconds; a test injects a fake one instead of sleeping past a TTL
    clock: Callable[[], float] = time.time
    # which replica does the once-only duties (patchd.leader); solo: this one, always
    leader: Leadership = field(default_factory=Leadership.solo)

    def component(self, name: str, kind: type[C]) -> C:
        found = self.components.get(name)
        if not isinstance(found, kind):
            raise NotFoundError("component", name)
        return found


class Component:
    """A part of ``patchd serve``. Built once with the shared :class:`Services`.

    ``start`` runs after the store is open and before the API answers; ``stop`` runs on shutdown
    (warm: finish what is in progress quickly). Neither may block for long.
    """

    name: str = "component"

    def __init__(self, services: Services) -> None:
        self.services = services

    def routers(self) -> Sequence[APIRouter]:
        return ()

    def collectors(self) -> Iterable[Collector]:
        return ()

    def start(self) -> None:
        """Register scheduler jobs, subscribe to domain events."""

    def stop(self) -> None:
        """Release resources; called once."""

    def reconfigure(self, config: Config) -> None:
        """Adopt a reloaded configuration (only its reloadable fields differ from the running
        one: see :data:`patchd.daemon.RELOADABLE`); the default keeps reading
        ``services.config``, which the daemon has already replaced."""
