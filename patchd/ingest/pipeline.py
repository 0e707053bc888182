"""The ingest pipeline: validate in the caller's thread, write in one thread with group commit.

Every source (HTTP, the JSONL tailer, KServe/Seldon adapters) hands raw records to
:class:`IngestPipeline`. Records are validated where they arrive (per-record errors, valid ones
kept), queued in a bounded queue (counted in events; :class:`QueueFullError` when full), and
written by a single writer thread that commits everything queued in one transaction (group
commit). A caller learns its :class:`BatchResult` only after that transaction COMMITS, so an
acknowledged record is durable. Tail sources attach their file offsets to the same transaction.

Usage (a sync caller, e.g. a plugin's endpoint running in the threadpool)::

    result = services.ingest.submit_predictions(records, source="kserve")

An async caller awaits ``asyncio.wrap_future(pipeline.predictions_future(records, source))``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import orjson

from patchd.config import Config
from patchd.exceptions import PatchdError, QueueFullError, StoreError
from patchd.ingest.records import (
    InlineInput,
    Label,
    Prediction,
    RecordError,
    Validated,
    validate_each,
)
from patchd.ingest.routing import ModelRouter
from patchd.store import predictions as store_predictions
from patchd.store.backend import Store, put_kv

log = logging.getLogger(__name__)

PENDING_RECOUNT_S = 60.0  # the pending-label count is exact again after retention within this


class ShuttingDownError(PatchdError):
    """serve is stopping and takes no new records (HTTP 503)."""


@dataclass(frozen=True)
class BatchResult:
    """What happened to one submitted batch, known after its transaction committed."""

    accepted: int
    duplicates: int
    rejected: tuple[RecordError, ...] = ()
    joined: int = 0  # labels attached to predictions (either arrival order)
    pending: int = 0  # labels waiting for their prediction

    def to_json(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "joined": self.joined,
            "pending": self.pending,
            "rejected": [
                {"index": e.index, "reason": e.reason, "message": e.message} for e in self.rejected
            ],
        }


@dataclass(frozen=True)
class OffsetUpdate:
    """A tail source's read position, committed with the events read before it."""

    source: str
    path: str
    device: int
    inode: int
    offset: int


@dataclass
class _Work:
    source: str
    predictions: list[Prediction] = field(default_factory=list)
    labels: list[Label] = field(default_factory=list)
    errors: list[RecordError] = field(default_factory=list)
    offsets: Sequence[OffsetUpdate] = ()
    future: Future[BatchResult] = field(default_factory=Future)

    @property
    def size(self) -> int:
        return len(self.predictions) + len(self.labels)


class IngestStats:
    """Counters of committed work, read by the Prometheus collector at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ingested: Counter[str] = Counter()
        self.rejected: Counter[tuple[str, str]] = Counter()
        self.labels_joined = 0
        self.labels_pending = 0
        self.commits = 0
        self.inputs_dropped: Counter[tuple[str, str]] = Counter()  # prediction kept

    def reject(self, source: str, errors: Sequence[RecordError]) -> None:
        if errors:
            with self._lock:
                self.rejected.update((source, e.reason) for e in errors)

    def reject_unread(self, source: str, reason: str) -> None:
        """A message refused before it held any record (a logger CloudEvent that is not JSON,
        a truncated binary tail, ...): one rejection whatever it carried, never a record that
        ingest validates (and counts) itself."""
        with self._lock:
            self.rejected[(source, reason)] += 1

    def drop_input(self, source: str, reason: str) -> None:
        """An event's input was unusable and removed; the event itself goes on."""
        with self._lock:
            self.inputs_dropped[(source, reason)] += 1

    def dropped_inputs(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self.inputs_dropped)

    def committed(self, work: _Work, result: BatchResult) -> None:
        with self._lock:
            if work.predictions:
                self.ingested[work.source] += result.accepted
            if result.duplicates:
                self.rejected[(work.source, "duplicate")] += result.duplicates
            refused = len(result.rejected) - len(work.errors)  # found while writing
            if refused > 0:
                self.rejected[(work.source, "pending_full")] += refused
            self.labels_joined += result.joined
            self.labels_pending += result.pending

    def snapshot(self) -> tuple[dict[str, int], dict[tuple[str, str], int], int]:
        with self._lock:
            return dict(self.ingested), dict(self.rejected), self.labels_joined


class IngestPipeline:
    """Bounded queue + single writer thread with group commit (see the module docstring)."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self.stats = IngestStats()
        # one parser per model; events route by their `model` field (patchd.ingest.routing)
        self.parser = ModelRouter(config, self._load_groups)
        self.max_queued = config.api.ingest_queue_max
        self.batch_size = config.store.batch_size
        self._queue: deque[_Work] = deque()
        self._queued = 0  # events waiting
        self._cond = threading.Condition()
        self._accepting = False
        self._stopping = False
        self._busy = False
        self._groups_versions = {k: cap.version for k, cap in self.parser.groups().items()}
        self._stamp = self._last_stamp()  # labeled_at of the newest label in the store
        self.max_pending_labels = config.store.max_pending_labels
        self._pending_labels = 0  # labels waiting in the store, recounted every PENDING_RECOUNT_S
        self._pending_counted = -PENDING_RECOUNT_S
        self._thread: threading.Thread | None = None
        self.on_commit: list[Callable[[int], None]] = []  # called with events written

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="patchd-ingest-writer", daemon=True)
        self._thread.start()
        log.info("ingest writer started (queue bound %d events)", self.max_queued)

    def stop_intake(self) -> None:
        """Refuse new records (HTTP 503); what is queued is still written. Signal-safe."""
        self._accepting = False  # a plain store: safe from a signal handler (no lock)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far is committed; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def stop(self, *, drain: bool = True, timeout: float = 30.0) -> None:
        """Warm (``drain``): write what is queued, then stop. Cold: fail what is queued."""
        self.stop_intake()
        with self._cond:
            self._stopping = True
            if not drain:
                self._fail_queued(ShuttingDownError("serve stopped before this batch was written"))
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("ingest writer did not stop within %.0fs", timeout)
        log.info("ingest writer stopped (%d commits)", self.stats.commits)

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def accepting(self) -> bool:
        return self._accepting

    # -- submission ------------------------------------------------------------------------
    def submit_predictions(self, records: Sequence[object], source: str) -> BatchResult:
        """Validate, queue and wait for the commit. Raises :class:`QueueFullError`."""
        return self.predictions_future(records, source).result()

    def submit_labels(self, records: Sequence[object], source: str) -> BatchResult:
        return self.labels_future(records, source).result()

    def predictions_future(
        self,
        records: Sequence[object],
        source: str,
        offsets: Sequence[OffsetUpdate] = (),
        errors: Sequence[RecordError] = (),
        first_index: int = 0,
    ) -> Future[BatchResult]:
        """Validate (per-record rejections), write the accepted records' inline inputs, queue.

        Raises :class:`QueueFullError`, :class:`ShuttingDownError` or :class:`DiskFullError`
        (an inline input could not be written: nothing of the batch is queued, a retry is safe).
        """
        planned: list[InlineInput] = []
        checked = validate_each(
            records,
            self.parser.planned,
            (source, time.time(), planned),
            first_index=first_index,
            errors=errors,
            planned=planned,
            max_inline_bytes=self.config.sources.max_inline_bytes_per_request,
        )
        if checked.inline:
            self._write_inputs(checked)
        work = _Work(source, checked.rows, offsets=offsets, errors=checked.errors)
        return self._submit(work)

    def _write_inputs(self, checked: Validated) -> None:
        """Write the inline inputs of the accepted rows; rows over the disk cap are rejected."""
        store = self.parser.input_store
        if not store.has_room(sum(len(x.data) for x in checked.inline)):
            refused = {x.uri for x in checked.inline}
            kept = [r for r in checked.rows if r.input_uri not in refused]
            message = "<artifacts>/inputs is full (sources.max_inputs_bytes); input refused"
            for _ in range(len(checked.rows) - len(kept)):
                checked.errors.append(RecordError(-1, "inputs_full", message))
            checked.rows[:] = kept
            checked.inline.clear()
            return
        store.write(checked.inline)

    def labels_future(
        self, records: Sequence[object], source: str, errors: Sequence[RecordError] = ()
    ) -> Future[BatchResult]:
        checked = validate_each(records, self.parser.label, (time.time(),), errors=errors)
        return self._submit(_Work(source, labels=checked.rows, errors=checked.errors))

    def _submit(self, work: _Work) -> Future[BatchResult]:
        work.errors.sort(key=lambda e: e.index)
        with self._cond:
            if not self._accepting:
                raise ShuttingDownError("serve is shutting down and takes no new records")
            if self._queued and self._queued + work.size > self.max_queued:
                self.stats.reject(work.source, [RecordError(-1, "queue_full", "")] * work.size)
                raise QueueFullError(retry_after=self._retry_after())
            self.stats.reject(work.source, work.errors)
            self._queue.append(work)
            self._queued += work.size
            self._cond.notify_all()
        return work.future

    def _retry_after(self) -> float:
        return max(1.0, min(30.0, self._queued / 100_000))

    # -- the writer thread ----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            self._commit(batch)
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _take(self) -> list[_Work]:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait(1.0)
            batch: list[_Work] = []
            size = 0
            while self._queue and (not batch or size + self._queue[0].size <= self.batch_size):
                work = self._queue.popleft()
                batch.append(work)
                size += work.size
            self._queued -= size
            self._busy = bool(batch)
            return batch

    def _commit(self, batch: list[_Work]) -> None:
        try:
            with self.store.write() as conn:
                # stamped inside the transaction: with several serve replicas on one SQLite
                # file, write transactions are serialised, so commits stay in stamp order
                stamp = self._stamp = max(time.time(), self._stamp + 1e-6)  # strictly increasing
                results = [self._apply(conn, work, stamp) for work in batch]
                self._persist_groups(conn)
        except Exception as err:  # a store failure fails this batch, never the writer
            log.exception("ingest commit of %d batches failed", len(batch))
            failure = StoreError(f"the store could not commit this batch: {err}")
            for work in batch:
                work.future.set_exception(failure)
            return
        self.stats.commits += 1
        written = 0
        for work, result in zip(batch, results, strict=True):
            self.stats.committed(work, result)
            written += result.accepted
            work.future.set_result(result)
        for hook in self.on_commit:
            hook(written)

    def _apply(self, conn: Any, work: _Work, stamp: float) -> BatchResult:
        errors = tuple(work.errors)
        if work.labels:
            room = self.max_pending_labels - self._count_pending(conn)
            lw = store_predictions.insert_labels(conn, work.labels, stamp, room)
            self._pending_labels += lw.pending
            if lw.refused:
                message = (
                    f"{self.max_pending_labels} labels already wait for their predictions "
                    "(store.max_pending_labels); label refused"
                )
                errors += (RecordError(-1, "pending_full", message),) * lw.refused
            result = BatchResult(
                lw.joined + lw.pending, lw.duplicates, errors, lw.joined, lw.pending
            )
        else:
            pw = (
                store_predictions.insert_predictions(conn, work.predictions)
                if work.predictions
                else None
            )
            inserted, dups, joined = (pw.inserted, pw.duplicates, pw.joined) if pw else (0, 0, 0)
            self._pending_labels -= joined
            result = BatchResult(inserted, dups, errors, joined)
        for off in work.offsets:
            conn.execute(
                'INSERT INTO source_offsets (source, path, device, inode, "offset", updated_at) '
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (source, path) DO UPDATE SET "
                'device = excluded.device, inode = excluded.inode, "offset" = excluded."offset", '
                "updated_at = excluded.updated_at",
                (off.source, off.path, off.device, off.inode, off.offset, time.time()),
            )
        return result

    def _count_pending(self, conn: Any) -> int:
        """Labels waiting in the store (a running count, recounted now and then: retention
        deletes old ones outside the writer)."""
        now = time.monotonic()
        if now - self._pending_counted >= PENDING_RECOUNT_S:
            self._pending_labels = store_predictions.count_pending(conn)
            self._pending_counted = now
        return self._pending_labels

    def _persist_groups(self, conn: Any) -> None:
        for key, cap in self.parser.groups().items():
            version = cap.version
            if version == self._groups_versions.get(key):
                continue
            value = orjson.dumps(cap.snapshot()).decode()
            put_kv(conn, key, value, time.time())
            self._groups_versions[key] = version

    def _last_stamp(self) -> float:
        """The newest ``labeled_at`` of any model this serve watches (stamps are per process)."""
        stamp = 0.0
        with self.store.read() as conn:
            for name in self.config.model_names:
                row = conn.execute(
                    "SELECT MAX(labeled_at) FROM predictions WHERE model = ? AND label IS NOT NULL",
                    (name,),
                ).fetchone()
                stamp = max(stamp, float(row[0] or 0.0))
        return stamp

    def _load_groups(self, key: str) -> dict[str, list[str]]:
        with self.store.read() as conn:
            row = conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return orjson.loads(row[0]) if row else {}

    def _fail_queued(self, err: Exception) -> None:
        while self._queue:
            work = self._queue.popleft()
            self._queued -= work.size
            work.future.set_exception(err)
