"""Store (WAL, migrations), event tables (dedup, label join both orders, reads), retention."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from patchd.config import build_config
from patchd.exceptions import StoreError
from patchd.ingest.records import EventParser, Label
from patchd.store import predictions as ev
from patchd.store.backend import open_store
from patchd.store.db import Store
from patchd.store.retention import Retention
from patchd.store.schema import MIGRATIONS


@pytest.fixture
def store(any_store: Store) -> Store:
    """The store under test: SQLite, then Postgres (tests/conftest.py ``any_store``)."""
    return any_store


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Store:
    s = Store.open(tmp_path / "db" / "patchd.db")
    yield s
    s.close()


def config(tmp_path: Path, **store_cfg: object):  # type: ignore[no-untyped-def]
    return build_config(
        {
            "state_dir": str(tmp_path),
            "model": {"name": "m"},
            "groups": {"attributes": ["g"]},
            "store": store_cfg,
        }
    )


def preds(tmp_path: Path, ids: list[str], ts: float = 1000.0, **extra: object) -> list:  # type: ignore[type-arg]
    parser = EventParser(config(tmp_path))
    return [
        parser.prediction({"id": i, "pred": 1, "ts": ts, "groups": {"g": "a"}, **extra}, "t")
        for i in ids
    ]


def test_open_migrates_every_table(store: Store) -> None:
    assert store.schema_version == len(MIGRATIONS)
    with store.read() as conn:
        for table in ("predictions", "pending_labels", "source_offsets", "runs", "candidates"):
            assert conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0
        assert conn.execute("SELECT gate, parent, note FROM candidates").fetchall() == []


def test_open_sets_wal_and_migrates(sqlite_store: Store) -> None:
    store = sqlite_store
    assert store.schema_version == len(MIGRATIONS)
    with store.read() as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"predictions", "pending_labels", "source_offsets", "runs", "candidates", "kv"} <= tables


def test_reopen_is_idempotent_and_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    Store.open(path).close()
    Store.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 5}")
    conn.close()
    with pytest.raises(StoreError, match="upgrade patchd"):
        Store.open(path)


def test_write_rolls_back_on_error(store: Store) -> None:
    with pytest.raises(RuntimeError), store.write() as conn:
        conn.execute("INSERT INTO kv VALUES ('x', '1', 0)")
        raise RuntimeError("boom")
    with store.read() as conn:
        assert conn.execute("SELECT COUNT(*) FROM kv").fetchone()[0] == 0


def test_readers_are_per_thread_and_see_commits(store: Store) -> None:
    with store.write() as conn:
        conn.execute("INSERT INTO kv VALUES ('x', '1', 0)")
    seen: list[int] = []

    def read() -> None:
        with store.read() as conn:
            seen.append(conn.execute("SELECT COUNT(*) FROM kv").fetchone()[0])

    threads = [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [1, 1, 1]
    with store.read() as conn, pytest.raises(Exception, match="(?i)read.only|readonly"):
        conn.execute("INSERT INTO kv VALUES ('y', '1', 0)")  # readers are query_only


def test_closed_store_refuses_use(tmp_path: Path) -> None:
    s = Store.open(tmp_path / "c.db")
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"), s.write():
        pass


def test_insert_dedups_by_model_and_id(store: Store, tmp_path: Path) -> None:
    with store.write() as conn:
        first = ev.insert_predictions(conn, preds(tmp_path, ["a", "b", "a"]))
        second = ev.insert_predictions(conn, preds(tmp_path, ["b", "c"]))
    assert (first.inserted, first.duplicates) == (2, 1)
    assert (second.inserted, second.duplicates) == (1, 1)
    with store.read() as conn:
        assert ev.count_predictions(conn, "m") == (3, 0)


def test_batches_after_a_replay_go_back_to_the_fast_insert(store: Store, tmp_path: Path) -> None:
    """Postgres copies a batch straight into the table and stages it only once it repeats
    stored ids; every batch stores exactly its new rows either way."""
    batches = [["a", "b"], ["b", "c"], ["c", "d"], ["e", "f"], ["g"]]
    with store.write() as conn:
        results = [ev.insert_predictions(conn, preds(tmp_path, ids)) for ids in batches]
        staged_next = getattr(conn, "expect_duplicates", False)
    assert [(r.inserted, r.duplicates) for r in results] == [(2, 0), (1, 1), (1, 1), (2, 0), (1, 0)]
    assert staged_next is False
    with store.read() as conn:
        assert ev.count_predictions(conn, "m") == (7, 0)


def test_label_after_prediction_joins_in_place(store: Store, tmp_path: Path) -> None:
    with store.write() as conn:
        ev.insert_predictions(conn, preds(tmp_path, ["a", "b"]))
        lw = ev.insert_labels(conn, [Label("m", "a", 0, 1.0), Label("m", "a", 1, 2.0)], stamp=50.0)
    assert (lw.joined, lw.pending, lw.duplicates) == (1, 0, 1)
    with store.read() as conn:
        row = conn.execute("SELECT label, labeled_at FROM predictions WHERE id='a'").fetchone()
    assert row == (0, 50.0)


def test_label_before_prediction_waits_then_joins(store: Store, tmp_path: Path) -> None:
    with store.write() as conn:
        lw = ev.insert_labels(conn, [Label("m", "early", 1, 5.0), Label("m", "early", 0, 6.0)])
        assert (lw.joined, lw.pending, lw.duplicates) == (0, 1, 1)
        pw = ev.insert_predictions(conn, preds(tmp_path, ["early", "other"]))
    assert (pw.inserted, pw.joined) == (2, 1)
    with store.read() as conn:
        assert conn.execute("SELECT label FROM predictions WHERE id='early'").fetchone() == (1,)
        assert ev.count_pending(conn) == 0
        assert ev.count_predictions(conn, "m") == (2, 1)


def test_many_pending_labels_join_by_lookup(store: Store, tmp_path: Path) -> None:
    labels = [Label("m", f"id{i}", i % 2, 1.0) for i in range(50)]
    with store.write() as conn:
        ev.insert_labels(conn, labels)
        pw = ev.insert_predictions(conn, preds(tmp_path, ["id3", "id4"]))  # 2 rows < 50 pending
    assert pw.joined == 2
    with store.read() as conn:
        assert ev.count_pending(conn) == 48


def test_labeled_window_and_recent_predictions(store: Store, tmp_path: Path) -> None:
    rows = preds(tmp_path, [f"e{i}" for i in range(6)], probs=[0.3, 0.7], embedding=[1.0, 2.0, 3.0])
    with store.write() as conn:
        ev.insert_predictions(conn, rows)
        for i in range(5):  # one commit stamp each
            ev.insert_labels(conn, [Label("m", f"e{i}", i % 2, 0.0)], stamp=100.0 + i)
    with store.read() as conn:
        win = ev.labeled_window(conn, "m", limit=3)
        since = ev.labeled_window(conn, "m", limit=10, since_ts=103.0)
        recent = ev.recent_predictions(conn, "m", limit=4)
    assert list(win.ids) == ["e2", "e3", "e4"]  # newest 3 by labeled_at, oldest first
    assert win.label.tolist() == [0, 1, 0] and win.cls.tolist() == win.label.tolist()
    assert win.pred.dtype == np.int64 and win.confidence.tolist() == pytest.approx([0.7] * 3)
    assert list(win.group_key) == ["g=a"] * 3
    assert len(since) == 2
    assert len(recent) == 4 and recent.embeddings is not None
    assert recent.embeddings.shape == (4, 3)


def test_empty_reads(store: Store) -> None:
    with store.read() as conn:
        assert len(ev.labeled_window(conn, "m", 10)) == 0
        assert ev.recent_predictions(conn, "m", 10).embeddings is None


def test_export_slice_writes_schema_v1_jsonl(store: Store, tmp_path: Path) -> None:
    with store.write() as conn:
        ev.insert_predictions(conn, preds(tmp_path, ["a", "b", "c"], probs=[0.25, 0.75]))
        ev.insert_labels(conn, [Label("m", "a", 1, 1.0), Label("m", "b", 0, 2.0)])
    out = tmp_path / "runs" / "r1" / "slice.jsonl"
    with store.read() as conn:
        assert ev.export_slice(conn, "m", out, limit=10) == 2
    lines = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert [x["id"] for x in lines] == ["b", "a"]
    assert lines[0] == {
        "schema": 1,
        "id": "b",
        "ts": "1970-01-01T00:16:40Z",
        "model": "m",
        "model_version": None,
        "pred": 1,
        "probs": [0.25, 0.75],
        "groups": {"g": "a"},
        "input": None,
        "embedding": None,
        "label": 0,
    }
    assert not list(out.parent.glob(".*tmp"))


def test_retention_age_and_cap_never_drop_what_an_open_run_uses(
    tmp_path: Path, backend_store_config: dict[str, object]
) -> None:
    cfg = config(tmp_path, retention_days=1.0, max_rows=1000, **backend_store_config)
    store = open_store(cfg)
    now = time.time()
    old, recent = now - 2.5 * 86400, now - 3600
    with store.write() as conn:
        ev.insert_predictions(conn, preds(tmp_path, [f"o{i}" for i in range(10)], ts=old))
        ev.insert_predictions(conn, preds(tmp_path, [f"r{i}" for i in range(1500)], ts=recent))
        ev.insert_labels(conn, [Label("m", "o0", 1, now), Label("m", "r0", 1, now)])
        conn.execute(
            "INSERT INTO runs (id, model, state, reason, recipe, job_ids, created_at, updated_at) "
            "VALUES ('run1', 'm', 'running', 'test', '{}', '{}', ?, ?)",
            (now - 2 * 86400, now),
        )
        ev.insert_labels(conn, [Label("m", "nopred", 1, old)])
    result = Retention(cfg, store).run(now)
    with store.read() as conn:
        ids = {r[0] for r in conn.execute("SELECT id FROM predictions")}
        assert ev.count_pending(conn) == 0
    assert result.deleted_by_age == 9  # o0 is labeled and inside the open run's protection
    assert "o0" in ids and "r0" in ids
    assert len(ids) == 1000  # the cap counts protected rows; unprotected ones went first
    with store.write() as conn:
        conn.execute("UPDATE runs SET state = 'succeeded'")
    Retention(cfg, store).run(now)
    with store.read() as conn:
        assert conn.execute("SELECT COUNT(*) FROM predictions WHERE id = 'o0'").fetchone()[0] == 0
    store.close()
