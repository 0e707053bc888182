"""How ``patchd serve`` is composed: the shared :class:`Services` and the :class:`Component` base.

The daemon builds one :class:`Services` and hands it to every component (monitor, runs,
candidates, source adapters); components find each other by name through
:meth:`Services.component`.

Several models (``models:``): a component whose class sets ``per_model`` is built once per
model, with :meth:`Services.for_model`: the same store, ingest, metrics registry and leader, but
that model's one-model config, a bus view that hands it only that model's domain events, and a
scheduler view whose job ids end in ``:<model>`` and whose jobs cannot take another model's
down (an exception is logged and counted in ``patchd_job_errors_total{model,job}``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar, cast

from patchd.exceptions import NotFoundError
from patchd.leader import Leadership

if TYPE_CHECKING:
    from apscheduler.schedulers.background import BackgroundScheduler
    from fastapi import APIRouter
    from prometheus_client import CollectorRegistry
    from prometheus_client.registry import Collector

    from patchd.config import Config
    from patchd.domain import DomainEvent, EventBus
    from patchd.ingest.pipeline import IngestPipeline
    from patchd.store.backend import Store

C = TypeVar("C", bound="Component")
E = TypeVar("E", bound="DomainEvent")

log = logging.getLogger(__name__)


class ModelBus:
    """One model's view of the shared bus: its subscribers see only that model's events."""

    def __init__(self, bus: EventBus, model: str) -> None:
        self.bus = bus
        self.model = model

    def subscribe(self, event_type: type[E], handler: Callable[[E], None]) -> None:
        model = self.model

        def mine(event: E) -> None:
            if getattr(event, "model", model) == model:
                handler(event)

        self.bus.subscribe(event_type, mine)

    def publish(self, event: DomainEvent) -> None:
        self.bus.publish(event)


class ModelScheduler:
    """One model's view of the scheduler: ``<id>:<model>`` job ids, errors kept to the job."""

    def __init__(
        self, scheduler: BackgroundScheduler, model: str, errors: Any, suffix: bool
    ) -> None:
        self.scheduler = scheduler
        self.model = model
        self.errors = errors  # a prometheus Counter labelled (model, job)
        self.suffix = suffix

    def job_id(self, job_id: str) -> str:
        return f"{job_id}:{self.model}" if self.suffix else job_id

    def add_job(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        job = kwargs.get("id") or getattr(func, "__name__", "job")
        if "id" in kwargs:
            kwargs["id"] = self.job_id(kwargs["id"])
        model, errors = self.model, self.errors

        def isolated(*a: Any, **kw: Any) -> Any:
            try:
                return func(*a, **kw)
            except Exception:
                errors.labels(model=model, job=job).inc()
                log.exception("model=%s: job %s failed; the other models go on", model, job)
                return None

        return self.scheduler.add_job(isolated, *args, **kwargs)

    def get_job(self, job_id: str) -> Any:
        return self.scheduler.get_job(self.job_id(job_id))

    def remove_job(self, job_id: str) -> None:
        self.scheduler.remove_job(self.job_id(job_id))

    @property
    def running(self) -> bool:
        return bool(self.scheduler.running)


def job_errors_counter() -> Any:
    """``patchd_job_errors_total{model,job}``: scheduler jobs of a model that raised."""
    from prometheus_client import Counter

    return Counter(
        "patchd_job_errors",
        "Scheduler jobs (monitor tick, drift, runs poll, candidates) that raised, per model",
        ["model", "job"],
        registry=None,
    )


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
    # the model a per-model view serves when several are configured (None: the one model)
    scoped_model: str | None = None

    def component(self, name: str, kind: type[C]) -> C:
        found = self.components.get(name)
        if not isinstance(found, kind):
            raise NotFoundError("component", name)
        return found

    def component_for(self, name: str, model: str, kind: type[C]) -> C:
        """A per-model component of ``model`` (registered as ``<name>:<model>`` when several
        models are configured, as ``name`` with one)."""
        found = self.components.get(f"{name}:{model}") or self.components.get(name)
        if not isinstance(found, kind):
            raise NotFoundError("component", f"{name} of model {model}")
        return found

    def for_model(self, view: Config, errors: Any) -> Services:
        """The services a per-model component of ``view``'s model is built with (see the
        module docstring); with one model configured, the same objects with that config."""
        model = view.model.name
        several = self.config.several_models
        scheduler = ModelScheduler(self.scheduler, model, errors, suffix=several)
        return replace(
            self,
            config=view,
            bus=cast("EventBus", ModelBus(self.bus, model)) if several else self.bus,
            scheduler=cast("BackgroundScheduler", scheduler),
            components={} if several else self.components,
            scoped_model=model if several else None,
        )


class Component:
    """A part of ``patchd serve``. Built once with the shared :class:`Services` (``per_model``:
    once per configured model, with :meth:`Services.for_model`).

    ``start`` runs after the store is open and before the API answers; ``stop`` runs on shutdown
    (warm: finish what is in progress quickly). Neither may block for long.
    """

    name: str = "component"
    per_model: bool = False  # built once per model (its routes under /v1/models/<model>/...)

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
