"""Candidate notifications in serve: ``CandidateEvaluated`` -> a webhook POST per configured hook.

The bus handler only reads the candidate and queues the notice (subscribers must be quick); one
daemon thread posts them, with ``retries`` and exponential backoff per webhook. A full queue drops
the notice with a warning (never an unbounded queue). With ``gate.auto_promote`` a passing
candidate is promoted at once, so no "awaiting approval" notice is sent for it.
Counted in ``patchd_notifications_total{format,result}`` (result: sent | failed | dropped).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable

import httpx
from prometheus_client import Counter
from prometheus_client.registry import Collector

from patchd.config import Config, WebhookConfig
from patchd.domain import CandidateEvaluated
from patchd.exceptions import PatchdError
from patchd.notify.message import EVENT_BY_VERDICT, Notice, body
from patchd.promotion.component import CandidatesComponent
from patchd.services import Component, Services

log = logging.getLogger(__name__)

QUEUE_MAX = 100
_STOP = object()


def candidate_url(config: Config, candidate_id: str) -> str:
    """The page a person opens: ``/ui/candidates/<id>``, or the report when the UI is off."""
    api = config.api
    base = (config.ui.public_url or f"http://{api.host}:{api.port}").rstrip("/")
    if config.ui.enabled:
        return f"{base}/ui/candidates/{candidate_id}"
    return f"{base}/v1/candidates/{candidate_id}/report"


class NotifyComponent(Component):
    name = "notify"

    def __init__(self, services: Services, backoff_s: float = 0.5) -> None:
        super().__init__(services)
        self.webhooks = list(services.config.notify.webhooks)
        self.backoff_s = backoff_s
        self.sent = Counter(
            "patchd_notifications",
            "Candidate notifications by webhook format and result",
            ["format", "result"],
            registry=None,
        )
        self._queue: queue.Queue[object] = queue.Queue(QUEUE_MAX)
        self._thread: threading.Thread | None = None

    def collectors(self) -> Iterable[Collector]:
        return (self.sent,)

    def start(self) -> None:
        if not self.webhooks:
            return
        self.services.bus.subscribe(CandidateEvaluated, self._on_evaluated)
        self._thread = threading.Thread(target=self._loop, name="patchd-notify", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            try:
                self._queue.put(_STOP, timeout=1.0)
            except queue.Full:
                pass
            self._thread.join(timeout=5.0)

    def _on_evaluated(self, event: CandidateEvaluated) -> None:
        kind = EVENT_BY_VERDICT.get(event.verdict)
        if kind is None:
            return
        if kind == "awaiting_approval" and self.services.config.gate.auto_promote:
            return
        hooks = [h for h in self.webhooks if kind in h.on]
        if not hooks:
            return
        try:
            candidates = self.services.component_for("candidates", event.model, CandidatesComponent)
            cand = candidates.get(event.candidate_id)
        except PatchdError as err:
            log.warning("notify: candidate %s not readable: %s", event.candidate_id, err)
            return
        notice = Notice(kind, cand, candidate_url(self.services.config, cand.id))
        for hook in hooks:
            try:
                self._queue.put_nowait((hook, notice))
            except queue.Full:
                log.warning("notify: queue full, %s notice of %s dropped", kind, cand.id)
                self.sent.labels(hook.format, "dropped").inc()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if not isinstance(item, tuple):  # _STOP
                return
            hook: WebhookConfig = item[0]
            notice: Notice = item[1]
            ok = self.post(hook, notice)
            self.sent.labels(hook.format, "sent" if ok else "failed").inc()

    def post(self, hook: WebhookConfig, notice: Notice) -> bool:
        """POST one notice to one webhook with retries; True when it answered 2xx."""
        payload = body(notice, hook.format)
        for attempt in range(hook.retries + 1):
            try:
                resp = httpx.post(hook.url, json=payload, timeout=hook.timeout_s)
                if resp.status_code < 300:
                    log.info(
                        "notify: %s of %s sent (%s, HTTP %d)",
                        notice.event,
                        notice.candidate.id,
                        hook.format,
                        resp.status_code,
                    )
                    return True
                why = f"HTTP {resp.status_code}"
            except httpx.HTTPError as err:
                why = f"{type(err).__name__}: {err}"
            log.warning(
                "notify: %s of %s attempt %d/%d failed: %s",
                notice.event,
                notice.candidate.id,
                attempt + 1,
                hook.retries + 1,
                why,
            )
            if attempt < hook.retries:
                time.sleep(self.backoff_s * 2**attempt)
        return False
