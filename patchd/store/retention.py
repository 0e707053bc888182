"""Retention of the ``predictions`` and ``pending_labels`` tables (age and row cap).

Rule, applied every ``store.retention_interval_s`` by serve's scheduler:

1. Age: predictions with ``ts`` older than ``store.retention_days`` are deleted; so are pending
   labels received longer ago than that or than ``store.pending_label_ttl_s`` (their prediction
   never came).
2. Cap: when more than ``store.max_rows`` predictions remain, the oldest (by ``ts``) go.
3. Protection: while a patch run is open (``runs.state`` in requested/queued/running), no
   *labeled* prediction with ``ts >= min(created_at of open runs) - W`` is deleted by either
   rule, where ``W`` is ``monitor.window_seconds`` or, when the window is count-based, the whole
   retention period. Unlabeled rows are not protected (runs only use labeled events). The row cap
   can therefore be exceeded while a run is open; it is enforced again once the run ends.

4. Inline inputs: files under ``<artifacts>/inputs`` that no prediction refers to any more (their
   rows were deleted, or their batch never committed) are removed once older than
   :data:`INPUT_GRACE_S` (a batch still queued keeps its files).

Deletes run in chunks of ``CHUNK`` rows per transaction so that ingestion is never blocked for
long (the writer lock is released between chunks).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from patchd.config import Config
from patchd.store.backend import Store

log = logging.getLogger(__name__)

CHUNK = 20_000
INPUT_GRACE_S = 600.0
INF = float("inf")
OPEN_RUN_STATES = ("requested", "queued", "running", "awaiting_labels")
_DELETE = (
    "DELETE FROM predictions WHERE model = ?1 AND id IN ("
    "SELECT id FROM predictions WHERE model = ?1 AND ts < ?2 "
    "AND (label IS NULL OR ts < ?3) ORDER BY ts LIMIT ?4)"
)


@dataclass(frozen=True)
class RetentionResult:
    deleted_by_age: int
    deleted_by_cap: int
    pending_expired: int
    protected_from: float | None
    inputs_removed: int = 0  # labeled events at/after this ts were kept for an open run


class Retention:
    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store

    def run(self, now: float | None = None) -> RetentionResult:
        now = time.time() if now is None else now
        cutoff = now - self.config.store.retention_days * 86400.0
        protected = self.protected_from(cutoff)
        keep_labeled = protected if protected is not None else float("inf")
        by_age = by_cap = 0
        for model in self._models():
            by_age += self._delete(model, cutoff, keep_labeled)
            by_cap += self._cap(model, keep_labeled)
        with self.store.write() as conn:
            pending_cutoff = max(cutoff, now - self.config.store.pending_label_ttl_s)
            expired = conn.execute(
                "DELETE FROM pending_labels WHERE received_at < ?", (pending_cutoff,)
            ).rowcount
        removed = self.sweep_inputs(now)
        result = RetentionResult(by_age, by_cap, expired, protected, removed)
        if by_age or by_cap or expired or removed:
            log.info("retention: %s", result)
        return result

    def protected_from(self, cutoff: float) -> float | None:
        """The ts from which labeled events are kept for open runs (None: no open run)."""
        marks = ",".join("?" * len(OPEN_RUN_STATES))
        with self.store.read() as conn:
            row = conn.execute(
                f"SELECT MIN(created_at) FROM runs WHERE state IN ({marks})", OPEN_RUN_STATES
            ).fetchone()
        if row[0] is None:
            return None
        window = self.config.monitor.window_seconds
        if window is None:
            window = self.config.store.retention_days * 86400.0
        return float(row[0]) - window

    def sweep_inputs(self, now: float) -> int:
        """Remove inline-input files no prediction refers to (older than INPUT_GRACE_S)."""
        root = self.config.artifacts_root / "inputs"
        try:
            old = [p for p in root.iterdir() if p.is_file() and _mtime(p) < now - INPUT_GRACE_S]
        except FileNotFoundError:
            return 0
        if not old:
            return 0
        prefix = root.as_uri() + "/"
        with self.store.read() as conn:
            used = {
                r[0]
                for r in conn.execute(
                    "SELECT input_uri FROM predictions WHERE substr(input_uri, 1, ?) = ?",
                    (len(prefix), prefix),
                )
            }
        removed = 0
        for path in old:
            if path.as_uri() not in used:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def _models(self) -> list[str]:
        with self.store.read() as conn:
            return [r[0] for r in conn.execute("SELECT DISTINCT model FROM predictions")]

    def _delete(self, model: str, before_ts: float, keep_labeled: float, limit: float = INF) -> int:
        """Delete up to ``limit`` oldest rows with ts < before_ts (labeled: ts < keep_labeled)."""
        deleted = 0
        while deleted < limit:
            chunk = int(min(CHUNK, limit - deleted))
            with self.store.write() as conn:
                n = conn.execute(_DELETE, (model, before_ts, keep_labeled, chunk)).rowcount
            deleted += n
            if n < chunk:
                break
        return deleted

    def _cap(self, model: str, keep_labeled: float) -> int:
        with self.store.read() as conn:
            total = conn.execute(
                "SELECT COUNT(*) FROM predictions WHERE model = ?", (model,)
            ).fetchone()[0]
        excess = total - self.config.store.max_rows
        return self._delete(model, INF, keep_labeled, excess) if excess > 0 else 0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")
