"""The batch insert (shared columns bound once, many rows a statement) equals a plain insert."""

from __future__ import annotations

import sqlite3
from array import array
from pathlib import Path

from patchd.ingest.records import Prediction
from patchd.store import predictions as ev
from patchd.store.db import Store


def _row(i: int, *, label: int | None, version: str | None, source: str, now: float) -> Prediction:
    probs = array("f", [0.25, 0.75] if i % 3 else [0.5, 0.5]).tobytes()
    emb = array("f", [float(i)]).tobytes() if i % 7 == 0 else None
    return Prediction(
        "m", f"id-{i}", 1000.0 + i / 7, version, i & 1, 0.75, probs, f"g={i % 4}",
        f'{{"g":"{i % 4}"}}', None, emb, source, now, label,
    )  # fmt: skip


def _batches() -> list[list[Prediction]]:
    now = 1795000000.123456789
    mixed = [
        _row(i % 540, label=None if i % 2 else i % 3, version="v'1", source="it's", now=now)
        for i in range(600)  # ids repeat after 540: in-batch duplicates
    ]
    shared = [_row(i, label=1, version=None, source="http", now=now) for i in range(80, 680)]
    varied = [
        _row(i, label=None, version=f"v{i % 2}", source="tl", now=now + i) for i in range(650, 917)
    ]
    return [mixed, shared, varied]


def _insert_all(store: Store, *, lean: bool) -> tuple[list[tuple[object, ...]], list[int]]:
    counts = []
    for n, rows in enumerate(_batches()):
        with store.write() as conn:
            if lean:
                result = ev.insert_predictions(conn, rows, stamp=2000.0 + n)
            else:
                result = _plain(conn, rows, stamp=2000.0 + n)
        counts.append(result)
    with store.read() as conn:
        stored = conn.execute("SELECT * FROM predictions ORDER BY model, id").fetchall()
    return stored, counts


_PLAIN = (
    "INSERT OR IGNORE INTO predictions (model, id, ts, model_version, pred, confidence, probs, "
    "group_key, groups, input_uri, embedding, source, ingested_at, label, labeled_at) VALUES "
    "(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, "
    "CASE WHEN ?14 IS NULL THEN NULL ELSE ?15 END)"
)


def _plain(conn: sqlite3.Connection, rows: list[Prediction], stamp: float) -> ev.PredictionWrite:
    """The reference: one plain statement per row, every value bound."""
    before = conn.total_changes
    conn.executemany(_PLAIN, [(*row, stamp) for row in rows])
    inserted = conn.total_changes - before
    return ev.PredictionWrite(inserted, len(rows) - inserted, 0)


def test_lean_batch_insert_stores_exactly_what_the_plain_insert_stores(tmp_path: Path) -> None:
    assert any(len(b) >= ev.ROWS_PER_STATEMENT for b in _batches())  # full statements
    assert any(len(b) % ev.ROWS_PER_STATEMENT for b in _batches())  # and one-row ones
    lean, plain = Store.open(tmp_path / "lean.db"), Store.open(tmp_path / "plain.db")
    try:
        got, got_counts = _insert_all(lean, lean=True)
        want, want_counts = _insert_all(plain, lean=False)
    finally:
        lean.close()
        plain.close()
    assert [(c.inserted, c.duplicates) for c in got_counts] == [
        (c.inserted, c.duplicates) for c in want_counts
    ]
    assert got == want
    assert len(got) == 917  # in-batch and cross-batch duplicates ignored
    labeled = [r for r in got if r[13] is not None]
    assert labeled and all(r[14] in (2000.0, 2001.0) for r in labeled)


def test_the_sql_does_not_depend_on_values_so_statements_are_reused(tmp_path: Path) -> None:
    """Batches that differ only in values (arrival time, stamp, ids) reuse the prepared SQL."""
    store = Store.open(tmp_path / "s.db")
    size = ev.ROWS_PER_STATEMENT + 3
    try:
        for n in range(4):
            rows = [
                _row(n * size + i, label=None, version=None, source="http", now=1e9 + n)
                for i in range(size)
            ]
            with store.write() as conn:
                ev.insert_predictions(conn, rows, stamp=2000.0 + n)
            if n == 0:
                misses = ev._insert_sql.cache_info().misses
        assert ev._insert_sql.cache_info().misses == misses
    finally:
        store.close()


def test_an_older_sqlite_parameter_limit_gives_smaller_statements(tmp_path: Path) -> None:
    """SQLite before 3.32 binds at most 999 parameters a statement: the insert fits under it."""
    store = Store.open(tmp_path / "s.db")
    now = 1795000000.0
    rows = [  # nothing shared: 14 values a row, 256 rows would need 3,584 parameters
        _row(i, label=i % 2 or None, version=f"v{i}", source=f"s{i % 2}", now=now + i)
        for i in range(600)
    ]
    try:
        with store.write() as conn:
            conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
            result = ev.insert_predictions(conn, rows, stamp=2000.0)
        with store.read() as conn:
            count = conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]
    finally:
        store.close()
    assert (result.inserted, result.duplicates, count) == (600, 0, 600)
