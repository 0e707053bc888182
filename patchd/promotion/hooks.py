"""Promotion hooks: tell model servers that production changed.

On every promotion or rollback serve POSTs ``{"event", "model", "digest", "previous"}`` to each
``registry.hooks.reload_urls`` (retries with exponential backoff) and/or runs
``registry.hooks.command`` (an argv list, never a shell) with ``PATCHD_EVENT``, ``PATCHD_MODEL``,
``PATCHD_DIGEST``, ``PATCHD_PREVIOUS`` and ``PATCHD_WEIGHTS`` in its environment. Hooks run on a
background thread; a failure is logged and counted (``patchd_hook_failures_total{kind}``) and
never undoes the promotion: servers that watch ``production.json`` reload anyway.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry, Counter

from patchd.config import HookConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HookEvent:
    event: str  # "promoted" | "rolled_back"
    model: str
    digest: str
    previous: str | None
    weights_path: Path


class HookRunner:
    """Runs the configured hooks for a :class:`HookEvent`, asynchronously by default."""

    def __init__(
        self, config: HookConfig, metrics: CollectorRegistry | None = None, backoff_s: float = 0.5
    ) -> None:
        self.config = config
        self.backoff_s = backoff_s
        self.failures = Counter(
            "patchd_hook_failures_total",
            "Promotion hooks that failed after all retries, by kind",
            ["kind"],
            registry=metrics,
        )
        self.calls = Counter(
            "patchd_hook_calls_total", "Promotion hooks run, by kind", ["kind"], registry=metrics
        )
        self._threads: list[threading.Thread] = []

    @property
    def configured(self) -> bool:
        return bool(self.config.reload_urls or self.config.command)

    def fire(self, event: HookEvent) -> threading.Thread | None:
        """Run the hooks on a daemon thread; returns it (tests join it)."""
        if not self.configured:
            return None
        thread = threading.Thread(target=self.run, args=(event,), name="patchd-hooks", daemon=True)
        thread.start()
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        return thread

    def join(self, timeout: float = 30.0) -> None:
        for thread in list(self._threads):
            thread.join(timeout)

    def run(self, event: HookEvent) -> bool:
        """Run every hook now; True when all succeeded."""
        ok = all([self._post(url, event) for url in self.config.reload_urls])
        if self.config.command:
            ok = self._command(event) and ok
        return ok

    def _post(self, url: str, event: HookEvent) -> bool:
        self.calls.labels("http").inc()
        body = {
            "event": event.event,
            "model": event.model,
            "digest": event.digest,
            "previous": event.previous,
        }
        for attempt in range(self.config.retries + 1):
            try:
                resp = httpx.post(url, json=body, timeout=self.config.timeout_s)
                if resp.status_code < 300:
                    log.info(
                        "hook %s: %s %s answered %d",
                        url,
                        event.event,
                        event.digest[:12],
                        resp.status_code,
                    )
                    return True
                why = f"HTTP {resp.status_code}"
            except httpx.HTTPError as err:
                why = f"{type(err).__name__}: {err}"
            log.warning(
                "hook %s attempt %d/%d failed: %s", url, attempt + 1, self.config.retries + 1, why
            )
            if attempt < self.config.retries:
                time.sleep(self.backoff_s * 2**attempt)
        self.failures.labels("http").inc()
        return False

    def _command(self, event: HookEvent) -> bool:
        self.calls.labels("command").inc()
        env = {
            **{k: v for k, v in os.environ.items() if k != "PATCHD_TOKEN"},  # no secrets
            "PATCHD_EVENT": event.event,
            "PATCHD_MODEL": event.model,
            "PATCHD_DIGEST": event.digest,
            "PATCHD_PREVIOUS": event.previous or "",
            "PATCHD_WEIGHTS": str(event.weights_path),
        }
        try:
            done = subprocess.run(
                self.config.command,
                env=env,
                timeout=self.config.timeout_s,
                capture_output=True,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            log.warning("hook command %s failed: %s", self.config.command, err)
            self.failures.labels("command").inc()
            return False
        if done.returncode != 0:
            log.warning(
                "hook command %s exited %d: %s",
                self.config.command,
                done.returncode,
                done.stderr.decode(errors="replace")[-500:],
            )
            self.failures.labels("command").inc()
            return False
        return True
