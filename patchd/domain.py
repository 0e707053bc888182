"""Domain events: frozen value objects that logging, metrics, the trigger and webhooks subscribe to.

Publish with :meth:`EventBus.publish`; subscribe per event type (or to :class:`DomainEvent` for
all). Subscribers run synchronously in the publisher's thread and must be quick; an exception in a
subscriber is logged and never reaches the publisher.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DomainEvent:
    ts: float = field(default_factory=time.time)


@dataclass(frozen=True, kw_only=True)
class CellEvent(DomainEvent):
    model: str
    cls: str  # class name
    group: str  # subgroup key, e.g. "bandage=yes"


@dataclass(frozen=True, kw_only=True)
class GroupDegraded(CellEvent):
    accuracy: float
    reference: float
    n: int
    reason: str  # "floor" | "reference"


@dataclass(frozen=True, kw_only=True)
class GroupRecovered(CellEvent):
    accuracy: float
    n: int


@dataclass(frozen=True, kw_only=True)
class GroupWarning(CellEvent):
    reason: str


@dataclass(frozen=True, kw_only=True)
class GroupEstimatedDegraded(CellEvent):
    """The label-free estimate (``cls``: predicted class or "*") fell below reference - margin."""

    estimate: float
    ci_high: float
    reference: float
    n: int


@dataclass(frozen=True, kw_only=True)
class DriftDetected(DomainEvent):
    model: str
    group: str
    feature: str  # "prediction" | "confidence" | "embedding" | "group_mix"
    score: float
    method: str


@dataclass(frozen=True, kw_only=True)
class PatchRequested(DomainEvent):
    model: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class RunQueued(DomainEvent):
    run_id: str
    model: str


@dataclass(frozen=True, kw_only=True)
class RunFinished(DomainEvent):
    run_id: str
    model: str
    # "succeeded" (a candidate) | "no_improvement" (incumbent kept) | "failed" | "cancelled" |
    # "abandoned"
    result: str


@dataclass(frozen=True, kw_only=True)
class CandidateEvaluated(DomainEvent):
    candidate_id: str
    model: str
    digest: str
    verdict: str  # "pass" | "fail" | "inconclusive"


@dataclass(frozen=True, kw_only=True)
class ModelPromoted(DomainEvent):
    model: str
    digest: str
    previous: str | None
    approved_by: str


@dataclass(frozen=True, kw_only=True)
class ModelRolledBack(DomainEvent):
    model: str
    digest: str
    rolled_back_from: str
    by: str


E = TypeVar("E", bound=DomainEvent)
Handler = Callable[[DomainEvent], None]


class EventBus:
    """In-process publish/subscribe for domain events (thread-safe)."""

    def __init__(self) -> None:
        self._subs: dict[type[DomainEvent], list[Handler]] = defaultdict(list)
        self._lock = threading.Lock()

    def subscribe(self, event_type: type[E], handler: Callable[[E], None]) -> None:
        with self._lock:
            self._subs[event_type].append(handler)  # type: ignore[arg-type]

    def publish(self, event: DomainEvent) -> None:
        with self._lock:
            handlers = [h for t, hs in self._subs.items() if isinstance(event, t) for h in hs]
        for handler in handlers:
            try:
                handler(event)
            except Exception:
                log.exception("event subscriber %r failed on %s", handler, type(event).__name__)
