"""``PatchdLogger``: ship prediction events from a Python model server to ``patchd serve``.

Built for the request path: :meth:`PatchdLogger.log` is a bounded-deque append (no I/O, no
locks, no serialisation; well under 10 µs) that never blocks and never raises. A background
thread batches what was logged, serialises it and POSTs NDJSON to ``/v1/predictions`` (labels to
``/v1/labels``) over one keep-alive connection, using only the standard library.

Delivery, exactly:
- While patchd answers, every logged event is delivered (patchd de-duplicates retried batches
  by event id, so a batch resent after a lost response is not counted twice).
- When patchd is down or answers 5xx/429, the batch in flight is retried with exponential
  backoff (``backoff_s`` doubling up to ``max_backoff_s``) until patchd is back, and new events
  wait in the queue. Once ``max_queue`` events wait, further ``log()`` calls drop their event
  and count it (``stats().dropped_full``). Memory is bounded by ``max_queue + batch_size``.
- A batch patchd refuses for good (4xx other than 408/413/429: bad token, bad request) is
  dropped and counted (``dropped_failed``); per-record rejections are counted as ``rejected``.
  413 splits the batch. Nothing is ever raised into the caller.

Use one logger per process; after ``fork()`` the child starts its own sender thread.
"""

from __future__ import annotations

import atexit
import http.client
import json
import logging
import os
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

PREDICTIONS = "/v1/predictions"
LABELS = "/v1/labels"
LazyEvent = Callable[[], "dict[str, Any] | Iterable[dict[str, Any]] | None"]


@dataclass(frozen=True)
class ClientStats:
    """Counters since the logger started (events, not batches, unless named so)."""

    sent: int  # acknowledged by patchd (accepted or duplicate)
    rejected: int  # acknowledged but refused per record (validation errors)
    dropped_full: int  # log() found the queue full
    dropped_failed: int  # patchd refused the batch for good, or the event could not be built
    pending: int  # waiting in the queue or in the batch being sent
    batches: int
    retries: int  # failed attempts that were retried


class _Failed(Exception):
    def __init__(self, retry: bool, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.retry = retry
        self.status = status


class PatchdLogger:
    """Non-blocking, bounded, batching event shipper (see the module docstring)."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8321",
        *,
        token: str | None = None,
        max_queue: int = 100_000,
        batch_size: int = 500,
        flush_interval_s: float = 0.2,
        timeout_s: float = 5.0,
        backoff_s: float = 0.1,
        max_backoff_s: float = 10.0,
        autostart: bool = True,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"patchd url must be http(s)://host[:port], got {url!r}")
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/")
        self._headers = {"Content-Type": "application/x-ndjson"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self.max_queue, self.batch_size = max_queue, batch_size
        self.flush_interval_s, self.timeout_s = flush_interval_s, timeout_s
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self._queue: deque[tuple[str, Any]] = deque()
        self._counts = {k: 0 for k in ("sent", "rejected", "failed", "batches", "retries")}
        self._dropped_full = 0
        self._drop_lock = threading.Lock()
        self._inflight = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: http.client.HTTPConnection | None = None
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _restart_in_child(ref))
        if autostart:
            self.start()

    # ------------------------------------------------------------------ request path
    def log(self, event: dict[str, Any]) -> bool:
        """Queue one schema-v1 prediction event; False (and counted) when the queue is full.

        The dict is serialised later by the sender thread: do not mutate it after logging.
        """
        if len(self._queue) >= self.max_queue:
            return self._drop()
        self._queue.append((PREDICTIONS, event))
        return True

    def log_lazy(self, build: LazyEvent) -> bool:
        """Queue a callable that the sender thread turns into event(s) (or None to skip).

        Adapters use it to keep response parsing off the request path.
        """
        if len(self._queue) >= self.max_queue:
            return self._drop()
        self._queue.append(("lazy", build))
        return True

    def label(self, id: str, label: int | str, model: str | None = None) -> bool:
        """Queue a late label for the prediction ``id``."""
        if len(self._queue) >= self.max_queue:
            return self._drop()
        record = (
            {"id": id, "label": label}
            if model is None
            else {"id": id, "label": label, "model": model}
        )
        self._queue.append((LABELS, record))
        return True

    def _drop(self) -> bool:
        with self._drop_lock:
            self._dropped_full += 1
        return False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="patchd-logger", daemon=True)
        self._thread.start()
        atexit.register(self.close, 2.0)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything logged so far was sent (or given up); True when empty."""
        deadline = time.monotonic() + timeout
        while self._queue or self._inflight:
            if time.monotonic() > deadline:
                return False
            self._wake.set()
            time.sleep(0.005)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Flush for up to ``timeout`` seconds, then stop the sender thread."""
        if self._thread is None:
            return
        self.flush(timeout)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=max(0.1, timeout))
        self._thread = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def stats(self) -> ClientStats:
        c = self._counts
        return ClientStats(
            sent=c["sent"],
            rejected=c["rejected"],
            dropped_full=self._dropped_full,
            dropped_failed=c["failed"],
            pending=len(self._queue) + self._inflight,
            batches=c["batches"],
            retries=c["retries"],
        )

    # ------------------------------------------------------------------ sender thread
    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            due = time.monotonic() - last >= self.flush_interval_s or self._wake.is_set()
            if not self._queue or (len(self._queue) < self.batch_size and not due):
                self._wake.wait(min(self.flush_interval_s, 0.05))
                continue
            self._wake.clear()
            last = time.monotonic()
            try:
                self._ship(self._take())
            except Exception:  # the sender thread must survive anything
                log.exception("patchd logger: unexpected error; batch dropped")

    def _take(self) -> dict[str, list[bytes]]:
        """Pop up to ``batch_size`` queued items and serialise them, by endpoint."""
        batch: dict[str, list[bytes]] = {PREDICTIONS: [], LABELS: []}
        queue, n = self._queue, 0
        self._inflight = min(len(queue), self.batch_size)  # before popping: flush() watches it
        while queue and n < self.batch_size:
            path, item = queue.popleft()
            for built in self._build(path, item):
                batch[built[0]].append(built[1])
                n += 1
        self._inflight = n
        return batch

    def _build(self, path: str, item: Any) -> list[tuple[str, bytes]]:
        try:
            if path == "lazy":
                made = item()
                events = [] if made is None else [made] if isinstance(made, dict) else list(made)
                return [(PREDICTIONS, _encode(e)) for e in events]
            return [(path, _encode(item))]
        except Exception as err:  # a user extractor or an unserialisable value
            self._counts["failed"] += 1
            log.warning("patchd logger: could not build an event: %s", err)
            return []

    def _ship(self, batch: dict[str, list[bytes]]) -> None:
        for path, lines in batch.items():
            if lines:
                self._deliver(path, lines)
        self._inflight = 0

    def _deliver(self, path: str, lines: list[bytes]) -> None:
        """Send until acknowledged or refused for good, backing off while patchd is away."""
        delay = self.backoff_s
        while True:
            try:
                self._post(path, lines)
                return
            except _Failed as err:
                if err.status == 413 and len(lines) > 1:
                    half = len(lines) // 2
                    self._deliver(path, lines[:half])
                    self._deliver(path, lines[half:])
                    return
                if not err.retry or (self._stop.is_set() and delay > self.max_backoff_s):
                    self._counts["failed"] += len(lines)
                    log.warning("patchd logger: %d events dropped: %s", len(lines), err)
                    return
                self._counts["retries"] += 1
                log.debug("patchd logger: %s; retrying in %.2fs", err, delay)
                self._stop.wait(delay * (0.5 + random.random()))  # full jitter, bounded
                delay = min(delay * 2, self.max_backoff_s) if not self._stop.is_set() else delay * 2

    def _post(self, path: str, lines: list[bytes]) -> None:
        body = b"\n".join(lines)
        try:
            conn = self._connection()
            conn.request("POST", self._prefix + path, body=body, headers=self._headers)
            resp = conn.getresponse()
            payload = resp.read()
        except (OSError, http.client.HTTPException) as err:
            self._reset()
            raise _Failed(True, f"patchd unreachable: {err!r}") from None
        status = resp.status
        if status >= 500 or status in (408, 429):
            raise _Failed(True, f"patchd answered {status}", status)
        if status >= 300:
            raise _Failed(
                status == 413, f"patchd refused the batch: {status} {payload[:200]!r}", status
            )
        self._account(len(lines), payload)

    def _account(self, n: int, payload: bytes) -> None:
        rejected = 0
        try:
            parsed = json.loads(payload) if payload else {}
            if isinstance(parsed, dict) and isinstance(parsed.get("rejected"), list):
                rejected = len(parsed["rejected"])
        except ValueError:
            pass
        self._counts["batches"] += 1
        self._counts["rejected"] += rejected
        self._counts["sent"] += n - rejected

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self.timeout_s)
        return self._conn

    def _reset(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def _after_fork(self) -> None:
        self._thread, self._conn, self._inflight = None, None, 0
        self._queue.clear()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._drop_lock = threading.Lock()
        self.start()


def _restart_in_child(ref: weakref.ReferenceType[PatchdLogger]) -> None:
    logger = ref()
    if logger is not None and logger._thread is not None:
        logger._after_fork()


def _encode(event: Any) -> bytes:
    return json.dumps(event, separators=(",", ":"), allow_nan=False).encode()
