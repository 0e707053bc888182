"""The ``predictions`` and ``pending_labels`` tables: batched writes and the reads other parts use.

Writes (only :mod:`patchd.ingest.pipeline`'s writer thread calls them, inside ``store.write()``):
:func:`insert_predictions` (which joins waiting labels), :func:`insert_labels`.

Reads (monitor, pipeline; inside ``store.read()``):

- :func:`labeled_window` — the newest ``limit`` labeled events by ``labeled_at``, as numpy columns;
- :func:`recent_predictions` — the newest ``limit`` predictions by ``ts``, label-free (for drift);
- :func:`export_slice` — labeled events as schema-v1 JSONL (+ label), written atomically.

Label joining: a label whose prediction exists sets ``label``/``labeled_at`` in place; otherwise
it waits in ``pending_labels`` (at most ``room`` more, the rest are refused) and joins when the
prediction arrives: before a batch of predictions is inserted, its ids are looked up in
``pending_labels`` by primary key (or the few pending rows are read when fewer wait than the batch
holds); the rows are inserted with their label already set and the pending rows deleted by key. A
join costs O(batch x log n) and no second write of the row, never a scan of either table. A second
label for an already labeled id is a duplicate and is ignored.

``labeled_at`` is the stamp of the commit that attached the label (not the arrival time): the
ingest pipeline makes stamps strictly increase from one commit to the next, so a reader that pages
by ``labeled_at`` (the monitor's cursor) never misses a row committed after its last read.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from itertools import chain
from operator import itemgetter
from pathlib import Path

import numpy as np
import orjson

from patchd.ingest.records import Label, Prediction
from patchd.store.backend import Connection

_COLUMNS = Prediction._fields  # model .. label; labeled_at follows from label and the stamp
_LABEL_COLUMN = _COLUMNS.index("label")
if len(_COLUMNS) - 1 != _LABEL_COLUMN:  # _with_labels builds a labeled row by appending it
    raise ImportError("Prediction.label must be the last field")
# Columns usually equal across a batch (model, model_version, input_uri, embedding, source,
# ingested_at, label): bound once per statement when they are. Binding a value costs the sqlite3
# module ~0.5 us, about as much as SQLite's whole B-tree insert of the row.
_SHARED_COLUMNS = tuple(_COLUMNS.index(c) for c in (
    "model", "model_version", "input_uri", "embedding", "source", "ingested_at", "label"
))  # fmt: skip
ROWS_PER_STATEMENT = 256  # x (14 + 8) values at most: SQLite >= 3.32 binds 32766

_DROP_PENDING = "DELETE FROM pending_labels WHERE model = ? AND id = ?"
LOOKUP_CHUNK = 500  # ids per primary-key lookup statement
_LABEL = (
    "UPDATE predictions SET label = ?1, labeled_at = ?2 "
    "WHERE model = ?3 AND id = ?4 AND label IS NULL"
)


@dataclass(frozen=True)
class PredictionWrite:
    inserted: int
    duplicates: int
    joined: int  # pending labels that joined these predictions


@dataclass(frozen=True)
class LabelWrite:
    joined: int  # labels attached to an existing prediction
    pending: int  # labels stored until their prediction arrives
    duplicates: int  # labels for an id that already has one
    refused: int = 0  # labels for unknown ids past the pending cap (``room``)


def insert_predictions(
    conn: Connection, rows: Sequence[Prediction], stamp: float | None = None
) -> PredictionWrite:
    """Insert (ignoring duplicates by (model, id)), then join labels that were waiting.

    ``stamp`` is the ``labeled_at`` of every label this call attaches (the pipeline passes one
    strictly increasing stamp per commit, so readers can page by ``labeled_at``).
    """
    stamp = time.time() if stamp is None else float(stamp)
    if not rows:
        return PredictionWrite(0, 0, 0)
    waiting = pending_for(conn, rows)
    joined = 0
    if waiting:  # a prediction whose label came first is inserted labeled
        rows, joined = _with_labels(rows, waiting)
    inserted = _insert_rows(conn, rows, stamp)
    if waiting:
        conn.executemany(_DROP_PENDING, waiting.keys())
    return PredictionWrite(inserted, len(rows) - inserted, joined)


def _with_labels(
    rows: Sequence[Prediction], waiting: dict[tuple[str, str], int]
) -> tuple[list[Prediction], int]:
    """``rows`` with their waiting labels set (first occurrence of an id); how many were set."""
    out, used = [], set()
    for r in rows:
        key = (r.model, r.id)
        if r.label is None and key in waiting and key not in used:
            used.add(key)
            r = tuple.__new__(Prediction, (*r[:_LABEL_COLUMN], waiting[key]))  # label is last
        out.append(r)
    return out, len(used)


def _insert_rows(conn: Connection, rows: Sequence[Prediction], stamp: float) -> int:
    """Insert every row not yet stored (``labeled_at`` is ``stamp`` where the row has a label);
    how many were inserted. Postgres: COPY through a staging table (:func:`_copy_rows`).

    SQLite: ``INSERT OR IGNORE`` of many rows per statement.

    Columns whose value every row shares are bound once per statement, and each statement inserts
    :data:`ROWS_PER_STATEMENT` rows: one VM step and one GIL release per statement, not per row.
    The SQL depends only on which columns are shared and on the row count, so the connection's
    statement cache reuses it from one batch to the next. Rows after the last full statement take
    the one-row statement.
    """
    if conn.dialect == "postgres":
        return _copy_rows(conn, rows, stamp)
    assert isinstance(conn, sqlite3.Connection)
    shared = _shared_values(rows)
    bound = tuple(c for c in range(len(_COLUMNS)) if c not in shared)
    shared_columns, tail = tuple(shared), [*shared.values(), stamp]
    getter = itemgetter(*bound)  # id and ts are never shared: at least two columns, so tuples
    size = _rows_per_statement(conn, len(bound), len(tail))
    full = len(rows) // size * size
    inserted = 0
    if full:
        sql = _insert_sql(bound, shared_columns, size)
        chunks = (rows[i : i + size] for i in range(0, full, size))
        inserted += conn.executemany(
            sql, (list(chain(chain.from_iterable(map(getter, c)), tail)) for c in chunks)
        ).rowcount
    if full < len(rows):
        sql = _insert_sql(bound, shared_columns, 1)
        inserted += conn.executemany(sql, ([*getter(row), *tail] for row in rows[full:])).rowcount
    return inserted


def _copy_rows(conn: Connection, rows: Sequence[Prediction], stamp: float) -> int:
    """Postgres: COPY the rows (``labeled_at`` computed here) and insert the new ones."""
    from patchd.store.postgres import PgConnection, copy_predictions

    assert isinstance(conn, PgConnection)
    label = _LABEL_COLUMN
    full = ((*r, None if r[label] is None else stamp) for r in rows)
    return copy_predictions(conn, full, (*_COLUMNS, "labeled_at"))


def _rows_per_statement(conn: sqlite3.Connection, width: int, extra: int) -> int:
    """:data:`ROWS_PER_STATEMENT`, or fewer where SQLite binds fewer (999 before 3.32)."""
    limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    return max(1, min(ROWS_PER_STATEMENT, (limit - extra) // width))


@lru_cache(maxsize=64)
def _insert_sql(bound: tuple[int, ...], shared: tuple[int, ...], count: int) -> str:
    """``INSERT OR IGNORE ... VALUES`` of ``count`` rows.

    Parameters: the ``bound`` columns of row 0, of row 1, ...; then the ``shared`` columns; then
    the stamp.
    """
    width = len(bound)
    first_shared = count * width + 1
    stamp = f"?{first_shared + len(shared)}"
    rows = []
    for row in range(count):
        exprs = {c: f"?{row * width + k + 1}" for k, c in enumerate(bound)}
        exprs.update({c: f"?{first_shared + j}" for j, c in enumerate(shared)})
        values = [exprs[c] for c in range(len(_COLUMNS))]
        values.append(f"CASE WHEN {exprs[_LABEL_COLUMN]} IS NULL THEN NULL ELSE {stamp} END")
        rows.append(f"({', '.join(values)})")
    return (
        f"INSERT OR IGNORE INTO predictions ({', '.join(_COLUMNS)}, labeled_at) "
        f"VALUES {', '.join(rows)}"
    )


def _shared_values(rows: Sequence[Prediction]) -> dict[int, object]:
    """Column index -> value, for the shareable columns whose value is the same in all rows."""
    found: dict[int, object] = {}
    for column in _SHARED_COLUMNS:
        values = list(map(itemgetter(column), rows))
        first = values[0]
        if values.count(first) == len(values):
            found[column] = first
    return found


def pending_for(conn: Connection, rows: Sequence[Prediction]) -> dict[tuple[str, str], int]:
    """(model, id) -> label of the labels waiting for ``rows``' ids."""
    probe = conn.execute(
        "SELECT COUNT(*) FROM (SELECT 1 FROM pending_labels LIMIT ?) AS waiting", (len(rows),)
    ).fetchone()[0]
    if probe == 0:
        return {}
    if probe < len(rows):  # fewer pending labels than new rows: read them all (< len(rows))
        new = {(r.model, r.id) for r in rows}
        found = conn.execute("SELECT model, id, label FROM pending_labels").fetchall()
        return {(m, i): label for m, i, label in found if (m, i) in new}
    return {(m, i): label for m, i, label in _lookup_pending(conn, rows)}


def _lookup_pending(conn: Connection, rows: Sequence[Prediction]) -> list[tuple[str, str, int]]:
    """The pending labels of ``rows``' ids: primary-key lookups, :data:`LOOKUP_CHUNK` at a time."""
    by_model: dict[str, list[str]] = {}
    for r in rows:
        by_model.setdefault(r.model, []).append(r.id)
    hits: list[tuple[str, str, int]] = []
    for model, ids in by_model.items():
        for start in range(0, len(ids), LOOKUP_CHUNK):
            chunk = ids[start : start + LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT model, id, label FROM pending_labels WHERE model = ? AND id IN ({marks})"
            hits.extend(conn.execute(sql, (model, *chunk)))
    return hits


def insert_labels(
    conn: Connection,
    labels: Sequence[Label],
    stamp: float | None = None,
    room: int | None = None,
) -> LabelWrite:
    """Join labels to their predictions (``labeled_at = stamp``); keep the rest pending, at most
    ``room`` of them (None: no cap); labels past it are refused."""
    stamp = time.time() if stamp is None else stamp
    joined = conn.executemany(_LABEL, ((x.label, stamp, x.model, x.id) for x in labels)).rowcount
    if joined == len(labels):
        return LabelWrite(joined, 0, 0)
    present = _existing_ids(conn, labels)
    missing = [x for x in labels if (x.model, x.id) not in present]
    refused = 0
    if room is not None and len(missing) > max(room, 0):
        refused = len(missing) - max(room, 0)
        missing = missing[: max(room, 0)]
    pending = (
        conn.executemany(
            "INSERT INTO pending_labels (model, id, label, received_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (model, id) DO NOTHING",
            missing,
        ).rowcount
        if missing
        else 0
    )
    return LabelWrite(joined, pending, len(labels) - joined - pending - refused, refused)


def _existing_ids(conn: Connection, labels: Sequence[Label]) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    keys = sorted({(x.model, x.id) for x in labels})
    for start in range(0, len(keys), 400):
        chunk = keys[start : start + 400]
        where = " OR ".join(["(model = ? AND id = ?)"] * len(chunk))
        params = [v for key in chunk for v in key]
        found.update(conn.execute(f"SELECT model, id FROM predictions WHERE {where}", params))
    return found


@dataclass(frozen=True)
class LabeledWindow:
    """Labeled events as aligned numpy columns, oldest first (ordered by ``labeled_at``).

    ``cls`` is the true class (the label), ``pred`` the predicted one; ``confidence`` is NaN when
    the event had no probabilities; ``group_key`` holds ``"a=x,b=y"`` strings (``"all"`` when no
    group attributes are configured).
    """

    ids: np.ndarray  # object (str)
    ts: np.ndarray  # float64 unix seconds (prediction time)
    labeled_at: np.ndarray  # float64
    pred: np.ndarray  # int64
    label: np.ndarray  # int64
    confidence: np.ndarray  # float64
    group_key: np.ndarray  # object (str)

    @property
    def cls(self) -> np.ndarray:
        return self.label

    def __len__(self) -> int:
        return len(self.ts)


def labeled_window(
    conn: Connection, model: str, limit: int, since_ts: float | None = None
) -> LabeledWindow:
    """The newest ``limit`` labeled events of ``model`` (``labeled_at >= since_ts`` when given)."""
    sql = (
        "SELECT id, ts, labeled_at, pred, label, confidence, group_key FROM predictions "
        "WHERE model = ? AND label IS NOT NULL AND labeled_at >= ? "
        "ORDER BY labeled_at DESC LIMIT ?"
    )
    rows = conn.execute(sql, (model, since_ts or 0.0, limit)).fetchall()
    rows.reverse()
    cols = list(zip(*rows, strict=True)) if rows else [()] * 7
    return LabeledWindow(
        ids=np.array(cols[0], dtype=object),
        ts=np.array(cols[1], dtype=np.float64),
        labeled_at=np.array(cols[2], dtype=np.float64),
        pred=np.array(cols[3], dtype=np.int64),
        label=np.array(cols[4], dtype=np.int64),
        confidence=np.array([np.nan if c is None else c for c in cols[5]], dtype=np.float64),
        group_key=np.array(cols[6], dtype=object),
    )


@dataclass(frozen=True)
class RecentPredictions:
    """The newest predictions (labeled or not), oldest first, for drift detection."""

    ts: np.ndarray  # float64
    pred: np.ndarray  # int64
    confidence: np.ndarray  # float64, NaN when absent
    group_key: np.ndarray  # object (str)
    embeddings: np.ndarray | None  # float32 [N, D] when every row has one of the same size

    def __len__(self) -> int:
        return len(self.ts)


def recent_predictions(conn: Connection, model: str, limit: int) -> RecentPredictions:
    sql = (
        "SELECT ts, pred, confidence, group_key, embedding FROM predictions "
        "WHERE model = ? ORDER BY ts DESC LIMIT ?"
    )
    rows = conn.execute(sql, (model, limit)).fetchall()
    rows.reverse()
    cols = list(zip(*rows, strict=True)) if rows else [()] * 5
    return RecentPredictions(
        ts=np.array(cols[0], dtype=np.float64),
        pred=np.array(cols[1], dtype=np.int64),
        confidence=np.array([np.nan if c is None else c for c in cols[2]], dtype=np.float64),
        group_key=np.array(cols[3], dtype=object),
        embeddings=_stack_embeddings(cols[4]),
    )


def _stack_embeddings(blobs: Sequence[bytes | None]) -> np.ndarray | None:
    if not blobs or any(b is None for b in blobs) or len({len(b) for b in blobs}) != 1:  # type: ignore[arg-type]
        return None
    return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), -1)  # type: ignore[arg-type]


_EXPORT = (
    "SELECT id, ts, model, model_version, pred, probs, groups, input_uri, embedding, label "
    "FROM predictions WHERE model = ? AND label IS NOT NULL ORDER BY labeled_at DESC LIMIT ?"
)


def export_slice(conn: Connection, model: str, path: Path, limit: int) -> int:
    """Write the newest ``limit`` labeled events as schema-v1 JSONL to ``path`` (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    count = 0
    with open(tmp, "wb") as fh:
        for row in conn.execute(_EXPORT, (model, limit)):
            fh.write(orjson.dumps(_event_json(row)) + b"\n")
            count += 1
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return count


def _event_json(row: tuple[object, ...]) -> dict[str, object]:
    ident, ts, model, version, pred, probs, groups, uri, emb, label = row
    return {
        "schema": 1,
        "id": ident,
        "ts": datetime.fromtimestamp(float(ts), UTC).isoformat().replace("+00:00", "Z"),  # type: ignore[arg-type]
        "model": model,
        "model_version": version,
        "pred": pred,
        "probs": _floats(probs),  # type: ignore[arg-type]
        "groups": orjson.loads(groups),  # type: ignore[arg-type]
        "input": {"uri": uri} if uri else None,
        "embedding": _floats(emb),  # type: ignore[arg-type]
        "label": label,
    }


def _floats(blob: bytes | None) -> list[float] | None:
    return None if blob is None else np.frombuffer(blob, dtype=np.float32).tolist()


def count_predictions(conn: Connection, model: str) -> tuple[int, int]:
    """(stored predictions, labeled ones) of ``model``."""
    total = conn.execute("SELECT COUNT(*) FROM predictions WHERE model = ?", (model,)).fetchone()[0]
    labeled = conn.execute(
        "SELECT COUNT(*) FROM predictions WHERE model = ? AND label IS NOT NULL", (model,)
    ).fetchone()[0]
    return int(total), int(labeled)


def count_pending(conn: Connection) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM pending_labels").fetchone()[0])
