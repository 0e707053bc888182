"""The sliding window of labeled events, kept in memory as numpy columns.

Each tick reads only the events labeled since the last tick (a ``(labeled_at, id)`` cursor) and
appends them; the window keeps the newest ``monitor.window`` events (and, when
``monitor.window_seconds`` is set, only those labeled within that many seconds). So a tick costs
O(new events) in SQLite and O(window) in numpy, never a full re-read.

Queries here are the monitor's own reads of the ``predictions`` table (schema v1); the table is
written only by :mod:`patchd.store.predictions`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from patchd.monitor import mined as minedmod
from patchd.monitor.groups import NO_GROUP, GroupSpace
from patchd.store.backend import Connection


@dataclass(frozen=True)
class Cursor:
    """The last labeled event the monitor has consumed (``labeled_at``, then ``id``)."""

    labeled_at: float = float("-inf")
    id: str = ""


@dataclass(frozen=True)
class LabeledEvents:
    """Labeled events in label order; ``group`` holds codes into a :class:`GroupIndex`."""

    ts: np.ndarray  # prediction time (float64, unix s)
    labeled_at: np.ndarray  # float64
    pred: np.ndarray  # int64
    label: np.ndarray  # int64
    confidence: np.ndarray  # float64, nan when the event had no probabilities
    group: np.ndarray  # int64 group codes

    def __len__(self) -> int:
        return len(self.label)

    @classmethod
    def empty(cls) -> LabeledEvents:
        f, i = np.zeros(0, np.float64), np.zeros(0, np.int64)
        return cls(f, f, i, i, f, i)

    def take(self, index: np.ndarray | slice) -> LabeledEvents:
        return LabeledEvents(
            self.ts[index],
            self.labeled_at[index],
            self.pred[index],
            self.label[index],
            self.confidence[index],
            self.group[index],
        )

    @staticmethod
    def concat(a: LabeledEvents, b: LabeledEvents) -> LabeledEvents:
        if len(a) == 0:
            return b
        return LabeledEvents(*(np.concatenate((getattr(a, f), getattr(b, f))) for f in _FIELDS))


_FIELDS = ("ts", "labeled_at", "pred", "label", "confidence", "group")


SKIP_REASONS = ("no_embedding", "other_width", "class_not_mined")


@dataclass
class GroupIndex:
    """Group name <-> integer code, bounded by the :class:`GroupSpace` it maps through."""

    space: GroupSpace
    mined: minedmod.MinedGroups | None = None  # adds the ``mined`` pseudo-group attribute
    names: list[str] = field(default_factory=list)
    _codes: dict[str, int] = field(default_factory=dict)
    _raw: dict[str, int] = field(default_factory=dict)  # raw ingest key -> code
    _canonical: dict[str, str] = field(default_factory=dict)  # raw ingest key -> canonical
    # labeled events left out of the mined attribute (``unknown``), by reason
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))

    def __post_init__(self) -> None:
        for name in self.space.known():
            if self.mined is None:
                self.code(name)
            else:
                for value in minedmod.VALUES:
                    self.code(with_mined(name, value))

    def code(self, canonical: str) -> int:
        found = self._codes.get(canonical)
        if found is None:
            found = self._codes[canonical] = len(self.names)
            self.names.append(canonical)
        return found

    def encode(self, raw_keys: np.ndarray | tuple[str, ...]) -> np.ndarray:
        """Raw ingest keys -> codes (each distinct key mapped once, then a dict lookup)."""
        memo = self._raw
        if len(memo) > 100_000:  # ingest caps the keys; this only bounds a misconfiguration
            memo.clear()
        for key in set(raw_keys) - memo.keys():
            memo[key] = self.code(self.space.canonical(str(key)))
        return np.fromiter((memo[k] for k in raw_keys), dtype=np.int64, count=len(raw_keys))

    def encode_events(
        self, raw_keys: tuple[str, ...], cls: np.ndarray, blobs: tuple, count: bool = False
    ) -> np.ndarray:
        """Codes of events: :meth:`encode`, plus the ``mined`` value from each event's embedding
        and class when mined groups are in use (``count``: add the skipped ones to ``skipped``)."""
        if self.mined is None:
            return self.encode(raw_keys)
        values = self._mined_values(np.asarray(cls, np.int64), blobs, count)
        memo = self._canonical
        if len(memo) > 100_000:
            memo.clear()
        for key in set(raw_keys) - memo.keys():
            memo[key] = self.space.canonical(str(key))
        pairs: dict[tuple[str, str], int] = {}
        out = np.empty(len(raw_keys), np.int64)
        for i, (key, value) in enumerate(zip(raw_keys, values, strict=True)):
            pair = (memo[key], value)
            code = pairs.get(pair)
            if code is None:
                code = pairs[pair] = self.code(with_mined(*pair))
            out[i] = code
        return out

    def _mined_values(self, cls: np.ndarray, blobs: tuple, count: bool) -> np.ndarray:
        mined = self.mined
        assert mined is not None
        width = mined.dim * 4
        out = np.full(len(blobs), minedmod.UNKNOWN, dtype=object)
        rows = np.asarray([i for i, b in enumerate(blobs) if b and len(b) == width], np.int64)
        if len(rows):
            x = np.frombuffer(b"".join(blobs[i] for i in rows), np.float32).reshape(-1, mined.dim)
            out[rows] = mined.assign(x, cls[rows])
        if count:
            missing = sum(1 for b in blobs if not b)
            self.skipped["no_embedding"] += missing
            self.skipped["other_width"] += len(blobs) - missing - len(rows)
            unplaced = (out[rows] == minedmod.UNKNOWN).sum() if len(rows) else 0
            self.skipped["class_not_mined"] += int(unplaced)
        return out


def with_mined(canonical: str, value: str) -> str:
    """A canonical group key with the ``mined`` attribute appended (alone when no attributes)."""
    part = f"{minedmod.ATTRIBUTE}={value}"
    return part if canonical == NO_GROUP else f"{canonical},{part}"


@dataclass
class Window:
    """The newest labeled events of one model (count and optional time bound)."""

    max_events: int
    max_age_s: float | None = None
    events: LabeledEvents = field(default_factory=LabeledEvents.empty)

    def append(self, new: LabeledEvents, now: float) -> None:
        events = LabeledEvents.concat(self.events, new)
        start = max(0, len(events) - self.max_events)
        if self.max_age_s is not None and len(events):
            start = max(start, int(np.searchsorted(events.labeled_at, now - self.max_age_s)))
        self.events = events.take(slice(start, None)) if start else events

    def since(self, epoch_ts: float) -> LabeledEvents:
        """Events whose prediction was made at or after ``epoch_ts`` (the current model's)."""
        if len(self.events) == 0 or epoch_ts <= self.events.ts.min():
            return self.events
        return self.events.take(self.events.ts >= epoch_ts)


_NEW_SQL = """
SELECT id, ts, labeled_at, pred, label, confidence, group_key, {embedding} FROM predictions
WHERE model = ? AND label IS NOT NULL AND labeled_at >= ? AND (labeled_at > ? OR id > ?)
ORDER BY labeled_at, id LIMIT ?
"""


def fetch_labeled(
    conn: Connection, model: str, cursor: Cursor, limit: int, groups: GroupIndex
) -> tuple[LabeledEvents, Cursor]:
    """Events labeled after ``cursor`` (oldest first, at most ``limit``) and the new cursor."""
    start = cursor.labeled_at if np.isfinite(cursor.labeled_at) else -1e300
    # the embedding is read only when the mined pseudo-groups need it
    sql = _NEW_SQL.format(embedding="embedding" if groups.mined is not None else "NULL")
    rows = conn.execute(sql, (model, start, start, cursor.id, limit)).fetchall()
    if not rows:
        return LabeledEvents.empty(), cursor
    return _columns(rows, groups), Cursor(float(rows[-1][2]), str(rows[-1][0]))


def newest_cursor(conn: Connection, model: str) -> Cursor:
    """The cursor of the newest labeled event (None: no labeled event yet)."""
    row = conn.execute(
        "SELECT labeled_at, id FROM predictions WHERE model = ? AND label IS NOT NULL "
        "ORDER BY labeled_at DESC, id DESC LIMIT 1",
        (model,),
    ).fetchone()
    return Cursor(float(row[0]), str(row[1])) if row else Cursor()


def newest_cursor_before(conn: Connection, model: str, limit: int) -> Cursor:
    """The cursor just before the newest ``limit`` labeled events (where a fresh monitor starts)."""
    row = conn.execute(
        "SELECT labeled_at, id FROM predictions WHERE model = ? AND label IS NOT NULL "
        "ORDER BY labeled_at DESC, id DESC LIMIT 1 OFFSET ?",
        (model, limit),
    ).fetchone()
    return Cursor(float(row[0]), str(row[1])) if row else Cursor()


def _columns(rows: list[tuple], groups: GroupIndex) -> LabeledEvents:
    _, ts, labeled_at, pred, label, conf, keys, emb = zip(*rows, strict=True)
    truth = np.asarray(label, np.int64)  # the accuracy cells' class: the true one
    return LabeledEvents(
        ts=np.asarray(ts, np.float64),
        labeled_at=np.asarray(labeled_at, np.float64),
        pred=np.asarray(pred, np.int64),
        label=np.asarray(label, np.int64),
        confidence=np.asarray(conf, np.float64),  # None -> nan
        group=groups.encode_events(keys, truth, emb, count=True),
    )


@dataclass(frozen=True)
class Traffic:
    """The newest predictions (labeled or not): the label-free view drift and shares use."""

    pred: np.ndarray
    confidence: np.ndarray
    group: np.ndarray  # codes
    embedding: np.ndarray | None  # float32 [n, d] for rows that carry one, else None
    embedding_group: np.ndarray | None  # codes of those rows
    label: np.ndarray | None = None  # int64, -1 where no label arrived yet (None: not read)
    embedding_rows: np.ndarray | None = None  # which rows ``embedding`` belongs to

    def __len__(self) -> int:
        return len(self.pred)

    def aligned_embedding(self) -> np.ndarray | None:
        """``[n, d]`` float64 with every row's embedding (nan where the row has none)."""
        if self.embedding is None or self.embedding_rows is None:
            return None
        out = np.full((len(self.pred), self.embedding.shape[1]), np.nan)
        out[self.embedding_rows] = self.embedding
        return out


def fetch_traffic(
    conn: Connection, model: str, limit: int, groups: GroupIndex, since_ts: float
) -> Traffic:
    rows = conn.execute(
        "SELECT pred, confidence, group_key, embedding, label FROM predictions "
        "WHERE model = ? AND ts >= ? ORDER BY ts DESC LIMIT ?",
        (model, since_ts if np.isfinite(since_ts) else -1e300, limit),
    ).fetchall()
    if not rows:
        z = np.zeros(0, np.int64)
        return Traffic(z, np.zeros(0), z, None, None, z, None)
    pred, conf, keys, emb, label = zip(*rows, strict=True)
    codes = groups.encode_events(keys, np.asarray(pred, np.int64), emb)
    matrix, keep = _embeddings(emb)
    return Traffic(
        np.asarray(pred, np.int64),
        np.asarray(conf, np.float64),
        codes,
        matrix,
        codes[keep] if keep is not None else None,
        np.asarray([-1 if x is None else x for x in label], np.int64),
        keep,
    )


_REFERENCE_SQL = """
SELECT pred, label, confidence, group_key, embedding FROM predictions
WHERE model = ? AND label IS NOT NULL AND ts >= ? ORDER BY labeled_at, id LIMIT ?
"""


def fetch_reference(
    conn: Connection, model: str, since_ts: float, limit: int, groups: GroupIndex
) -> tuple[LabeledEvents, np.ndarray | None]:
    """The first ``limit`` labeled events of the current model and their embeddings (aligned,
    nan where an event has none; None when none has one): what the estimate is calibrated on."""
    rows = conn.execute(
        _REFERENCE_SQL, (model, since_ts if np.isfinite(since_ts) else -1e300, limit)
    ).fetchall()
    if not rows:
        return LabeledEvents.empty(), None
    pred, label, conf, keys, emb = zip(*rows, strict=True)
    n = len(rows)
    zeros = np.zeros(n)
    events = LabeledEvents(
        zeros,
        zeros,
        np.asarray(pred, np.int64),
        np.asarray(label, np.int64),
        np.asarray(conf, np.float64),
        groups.encode_events(keys, np.asarray(pred, np.int64), emb),
    )
    matrix, keep = _embeddings(emb)
    if matrix is None or keep is None:
        return events, None
    aligned = np.full((n, matrix.shape[1]), np.nan)
    aligned[keep] = matrix
    return events, aligned


def _embeddings(blobs: tuple) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(float32 matrix of the rows that carry an embedding of the common width, their rows).

    The common width is the most frequent one (not the first row's: one odd event must not
    decide the width of every other)."""
    keep = [i for i, b in enumerate(blobs) if b]
    if not keep:
        return None, None
    widths, counts = np.unique([len(blobs[i]) for i in keep], return_counts=True)
    dim = int(widths[np.argmax(counts)]) // 4
    keep = [i for i in keep if len(blobs[i]) == dim * 4]  # ignore rows of another width
    matrix = np.frombuffer(b"".join(blobs[i] for i in keep), dtype=np.float32).reshape(-1, dim)
    return matrix, np.asarray(keep, np.int64)
