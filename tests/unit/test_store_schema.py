"""The SQLite and Postgres migration lists describe the same schema, and Postgres migrates once."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from patchd.config import build_config
from patchd.exceptions import ConfigError, StoreError
from patchd.store.postgres import PostgresStore, redact_url, to_native
from patchd.store.schema import MIGRATIONS, PG_MIGRATIONS


def _sqlite_columns(upto: int) -> dict[str, list[str]]:
    conn = sqlite3.connect(":memory:")
    for sql in MIGRATIONS[:upto]:
        conn.executescript(sql)
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    return {t: [r[1] for r in conn.execute(f"PRAGMA table_info({t})")] for t in sorted(tables)}


def _pg_columns(url: str, upto: int) -> dict[str, list[str]]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        for sql in PG_MIGRATIONS[:upto]:
            conn.execute(sql)  # type: ignore[arg-type]
        rows = conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = 'public' ORDER BY table_name, ordinal_position"
        ).fetchall()
    found: dict[str, list[str]] = {}
    for table, column in rows:
        found.setdefault(table, []).append(column)
    return found


def test_both_lists_have_the_same_length() -> None:
    assert len(MIGRATIONS) == len(PG_MIGRATIONS)


@pytest.mark.parametrize("upto", range(1, len(MIGRATIONS) + 1))
def test_each_migration_makes_the_same_tables_and_columns(upto: int, postgres_url: str) -> None:
    assert _pg_columns(postgres_url, upto) == _sqlite_columns(upto)


def test_two_replicas_opening_at_once_migrate_once(postgres_url: str) -> None:

    stores: list[PostgresStore] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            stores.append(PostgresStore.open(postgres_url))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert {s.schema_version for s in stores} == {len(PG_MIGRATIONS)}
    with stores[0].read() as conn:
        assert conn.execute("SELECT COUNT(*) FROM patchd_schema").fetchone()[0] == 1
    for s in stores:
        s.close()


def test_a_newer_schema_is_refused(postgres_url: str) -> None:

    PostgresStore.open(postgres_url).close()
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("UPDATE patchd_schema SET version = 99")
    with pytest.raises(StoreError, match="upgrade patchd"):
        PostgresStore.open(postgres_url)


def test_connection_refused_names_the_url_without_its_password(tmp_path: Path) -> None:

    with pytest.raises(StoreError) as info:
        PostgresStore.open("postgresql://patchd:s3cret@127.0.0.1:1/patchd")
    text = str(info.value)
    assert "postgresql://patchd:***@127.0.0.1:1/patchd" in text and "s3cret" not in text


def test_redact_url() -> None:
    assert redact_url("postgresql://u:pw@h:5/d") == "postgresql://u:***@h:5/d"
    assert redact_url("postgresql://u@h/d") == "postgresql://u@h/d"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("mysql://u@h/d", "postgresql://"),
        ("postgresql://u@h", "names no database"),
        ("postgresql://u@h:port/d", "port"),
    ],
)
def test_a_bad_store_url_is_a_config_error_naming_the_field(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match="store.url") as info:
        build_config({"store": {"url": url}})
    assert says in str(info.value)


def test_a_password_file_is_used(postgres_url: str, tmp_path: Path) -> None:

    secret = tmp_path / "pw"
    secret.write_text("any\n")  # trust auth accepts any password: the file must be readable
    PostgresStore.open(postgres_url, password_file=secret).close()
    with pytest.raises(StoreError, match="store.password_file"):
        PostgresStore.open(postgres_url, password_file=tmp_path / "missing")


def test_placeholders_become_postgres_native_outside_quotes_and_casts() -> None:
    native = to_native("SELECT ?, ?3, 'a?b:c', x::text FROM t WHERE a = :a AND b = :b OR c = :a")
    assert native.sql == "SELECT $1, $3, 'a?b:c', x::text FROM t WHERE a = $1 AND b = $2 OR c = $1"
    assert native.names == ("a", "b")
    assert native.bind({"b": 2, "a": 1, "unused": 3}) == [1, 2]
    assert to_native("SELECT ?").bind((5,)) == (5,) and to_native("SELECT 1").bind(()) is None


def test_named_parameters_round_trip_on_postgres(postgres_url: str) -> None:
    store = PostgresStore.open(postgres_url)
    try:
        with store.write() as conn:
            conn.execute("INSERT INTO kv (key, value, updated_at) VALUES (:k, :v, :t)",
                         {"k": "x", "v": "1", "t": 1.0})  # fmt: skip
            conn.executemany("INSERT INTO kv (key, value, updated_at) VALUES (:k, :v, :t)",
                             [{"k": "y", "v": "2", "t": 2.0}])  # fmt: skip
        with store.read() as conn:
            rows = conn.execute("SELECT key, value FROM kv ORDER BY key").fetchall()
        assert [tuple(r) for r in rows] == [("x", "1"), ("y", "2")]
    finally:
        store.close()


def _open_and_report(path: str, start: object, out: object) -> None:
    from patchd.store.db import Store

    start.wait()  # type: ignore[attr-defined]
    try:
        store = Store.open(Path(path))
        out.put(store.schema_version)  # type: ignore[attr-defined]
        store.close()
    except Exception as err:  # noqa: BLE001 - reported to the test
        out.put(repr(err))  # type: ignore[attr-defined]


def test_processes_opening_a_new_sqlite_file_at_once_migrate_it_once(tmp_path: Path) -> None:
    """Replicas sharing one SQLite file that start together: one migrates, the rest find it done."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    path = str(tmp_path / "shared.db")
    procs = [ctx.Process(target=_open_and_report, args=(path, start, out)) for _ in range(4)]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert results == [len(MIGRATIONS)] * 4
