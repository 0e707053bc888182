"""The big-batch insert (shared columns as literals, many rows a statement) equals the plain one."""

from __future__ import annotations

from array import array
from pathlib import Path

import pytest

from patchd.events import Prediction
from patchd.store import events as ev
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
        _row(i % 90, label=None if i % 2 else i % 3, version="v'1", source="it's", now=now)
        for i in range(100)  # ids repeat after 90: in-batch duplicates
    ]
    shared = [_row(i, label=1, version=None, source="http", now=now) for i in range(80, 200)]
    varied = [
        _row(i, label=None, version=f"v{i % 2}", source="tl", now=now + i) for i in range(150, 217)
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


def _plain(conn: object, rows: list[Prediction], stamp: float) -> ev.PredictionWrite:
    inserted = 0
    for row in rows:  # batches of one row take the plain statement
        inserted += ev.insert_predictions(conn, [row], stamp=stamp).inserted  # type: ignore[arg-type]
    return ev.PredictionWrite(inserted, len(rows) - inserted, 0)


def test_lean_batch_insert_stores_exactly_what_the_plain_insert_stores(tmp_path: Path) -> None:
    assert all(len(b) >= ev.INLINE_MIN_ROWS for b in _batches())
    assert any(len(b) % ev.ROWS_PER_STATEMENT for b in _batches())  # a remainder statement too
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
    assert len(got) == 217  # in-batch and cross-batch duplicates ignored
    labeled = [r for r in got if r[13] is not None]
    assert labeled and all(r[14] in (2000.0, 2001.0) for r in labeled)


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        (None, "NULL"),
        (3, "3"),
        (0.1, "0.1"),
        ("it's", "'it''s'"),
        (b"\x00\xff", "x'00ff'"),
        (float("nan"), None),
        ("nul\x00", None),
    ],
)
def test_sql_literals_are_exact_or_refused(value: object, literal: str | None) -> None:
    assert ev._sql_literal(value) == literal
